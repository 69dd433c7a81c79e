/*
 * wait_modes.c: what the way a process waits for a socket costs a round trip.
 *
 * Two processes ping-pong a 68-byte frame over a socketpair, 20,000 times;
 * the mode says how each side waits for the answer:
 *   0  a blocking read() (what the C floor and raw Python sockets do)
 *   1  poll() then read() on a non-blocking socket (an event loop's way)
 *   2  epoll_wait() then read() on a non-blocking socket
 *   3  O_NONBLOCK cleared (fcntl), a blocking read(), O_NONBLOCK set again
 *      (what pyipc's blocking calls did before its sockets stayed blocking)
 *   4  an io_uring RECV submitted and waited for in one io_uring_enter()
 *      (a completion-based loop: no readiness wait, no separate read)
 *   5  epoll_wait() with timeout 0, again and again for up to 50 us with a
 *      sched_yield() between, then epoll_wait() that sleeps, then read()
 *      (the event loop's wait with pyipc's busy_poll = 50)
 * With "split" as second argument the two processes are pinned to CPUs 0
 * and 1 (as `pyipc bench` places its peers by default); without it the
 * scheduler places them. Prints the mean round trip in microseconds. Not part
 * of `pyipc bench`: it explains a choice (README, Benchmarks). Linux only.
 *
 *   python -m ziglang cc -O2 -o /tmp/wait_modes bench/c/wait_modes.c
 *   for m in 0 1 2 3 4 5; do /tmp/wait_modes $m split; done
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <sched.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <linux/io_uring.h>

enum { FRAME = 68, ROUNDS = 20000 };

static int mode;
static int epoll_fd = -1;

/* Mode 4: one io_uring with its rings mapped; one RECV in flight at a time. */
static int ring_fd = -1;
static unsigned *sq_tail, *sq_mask, *sq_array, *cq_head, *cq_tail, *cq_mask;
static struct io_uring_sqe *sqes;
static struct io_uring_cqe *cqes;

static void *map_ring(size_t size, off_t offset) {
    void *p = mmap(0, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, ring_fd, offset);
    if (p == MAP_FAILED) { perror("mmap io_uring"); exit(2); }
    return p;
}

static void ring_setup(void) {
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    ring_fd = (int)syscall(__NR_io_uring_setup, 4, &p);
    if (ring_fd < 0) { perror("io_uring_setup"); exit(2); }
    char *sq = map_ring(p.sq_off.array + p.sq_entries * sizeof(unsigned), IORING_OFF_SQ_RING);
    char *cq = map_ring(p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe),
                        IORING_OFF_CQ_RING);
    sqes = map_ring(p.sq_entries * sizeof(struct io_uring_sqe), IORING_OFF_SQES);
    sq_tail = (unsigned *)(sq + p.sq_off.tail);
    sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
    sq_array = (unsigned *)(sq + p.sq_off.array);
    cq_head = (unsigned *)(cq + p.cq_off.head);
    cq_tail = (unsigned *)(cq + p.cq_off.tail);
    cq_mask = (unsigned *)(cq + p.cq_off.ring_mask);
    cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
}

/* Submit one RECV and wait for its completion in the same system call. */
static ssize_t ring_recv(int fd, char *buf, size_t len) {
    unsigned tail = *sq_tail, slot = tail & *sq_mask;
    struct io_uring_sqe *sqe = &sqes[slot];
    memset(sqe, 0, sizeof *sqe);
    sqe->opcode = IORING_OP_RECV;
    sqe->fd = fd;
    sqe->addr = (unsigned long)buf;
    sqe->len = (unsigned)len;
    sq_array[slot] = slot;
    __atomic_store_n(sq_tail, tail + 1, __ATOMIC_RELEASE);
    if (syscall(__NR_io_uring_enter, ring_fd, 1, 1, IORING_ENTER_GETEVENTS, NULL, 0) < 0) {
        perror("io_uring_enter");
        exit(2);
    }
    unsigned head = *cq_head;   /* min_complete=1: the completion is there */
    ssize_t res = cqes[head & *cq_mask].res;
    __atomic_store_n(cq_head, head + 1, __ATOMIC_RELEASE);
    if (res < 0) {              /* e.g. -EINVAL: a kernel without IORING_OP_RECV */
        fprintf(stderr, "io_uring recv: %s\n", strerror((int)-res));
        exit(2);
    }
    return res;
}

static long long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000LL + t.tv_nsec;
}

static void wait_readable(int fd) {
    struct epoll_event e;
    if (mode == 5) {                        /* busy_poll: 50 us without sleeping */
        long long end = now_ns() + 50000;
        while (now_ns() < end) {
            if (epoll_wait(epoll_fd, &e, 1, 0) > 0) return;
            sched_yield();
        }
        epoll_wait(epoll_fd, &e, 1, -1);
    } else if (mode == 1) {
        struct pollfd p = {fd, POLLIN, 0};
        poll(&p, 1, -1);
    } else if (mode == 2) {
        epoll_wait(epoll_fd, &e, 1, -1);
    }
}

/* One whole frame; exits the process at EOF (the other side is done). */
static void read_frame(int fd, char *buf) {
    size_t got = 0;
    if (mode == 3) fcntl(fd, F_SETFL, 0);
    while (got < FRAME) {
        wait_readable(fd);
        ssize_t n = mode == 4 ? ring_recv(fd, buf + got, FRAME - got)
                              : read(fd, buf + got, FRAME - got);
        if (n > 0) got += (size_t)n;
        else if (n == 0) exit(0);
    }
    if (mode == 3) fcntl(fd, F_SETFL, O_NONBLOCK);
}

int main(int argc, char **argv) {
    mode = argc > 1 ? atoi(argv[1]) : 0;
    int sv[2];
    if (mode < 0 || mode > 5 || socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0) {
        fprintf(stderr, "usage: wait_modes 0|1|2|3|4|5 [split]\n");
        return 2;
    }
    char buf[FRAME] = {0};
    pid_t pid = fork();
    if (argc > 2 && strcmp(argv[2], "split") == 0) {
        cpu_set_t cpus;                     /* the echo side on CPU 1, the timer on 0 */
        CPU_ZERO(&cpus);
        CPU_SET(pid == 0 ? 1 : 0, &cpus);
        if (sched_setaffinity(0, sizeof cpus, &cpus) != 0) perror("sched_setaffinity");
    }
    int fd = pid == 0 ? sv[1] : sv[0];
    close(pid == 0 ? sv[0] : sv[1]);
    if (mode == 1 || mode == 2 || mode == 3 || mode == 5) fcntl(fd, F_SETFL, O_NONBLOCK);
    if (mode == 4) ring_setup();
    if (mode == 2 || mode == 5) {
        epoll_fd = epoll_create1(0);
        struct epoll_event e = {EPOLLIN, {.fd = fd}};
        epoll_ctl(epoll_fd, EPOLL_CTL_ADD, fd, &e);
    }
    if (pid == 0) {                         /* the echo side */
        for (;;) {
            read_frame(fd, buf);
            if (write(fd, buf, FRAME) != FRAME) return 1;
        }
    }
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (int i = 0; i < ROUNDS; i++) {
        if (write(fd, buf, FRAME) != FRAME) return 1;
        read_frame(fd, buf);
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    double us = ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / ROUNDS / 1000;
    printf("mode %d: %.1f us per round trip\n", mode, us);
    fflush(stdout);
    close(fd);
    wait(NULL);
    return 0;
}
