/*
 * floor.c: the unbatched floor. The same framing as pyipc (4-byte big-endian
 * length, then the payload) over a Unix stream socket, one write() per message,
 * blocking I/O, no library.
 *
 *   floor server rtt|oneway|events PATH N SIZE [busy]   (prints READY once listening)
 *   floor client rtt|oneway|events PATH N SIZE [busy]   (prints {"seconds": S})
 *
 * rtt: the client sends a message and waits for its echo, N times (after a
 * warm-up of 200). oneway: the client sends N messages; the server answers the
 * last one with a 1-byte message (events is oneway: this program is the
 * one-write-per-message peer of pyipc's per-message event workload).
 * busy: both sockets are non-blocking and every read and write spins until it
 * can go on: the floor of a busy-polled round trip (pyipc's busy_poll).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <errno.h>
#include <fcntl.h>
#include <time.h>
#include <unistd.h>

#define WARMUP 200

static void die(const char *what) { perror(what); exit(1); }

/* Set by "busy": the sockets are non-blocking and EAGAIN means try again now. */
static int busy;

static void make_busy(int fd) {
    if (busy && fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) < 0) die("fcntl");
}

static void write_all(int fd, const uint8_t *p, size_t n) {
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && busy && errno == EAGAIN) continue;
        if (w < 0) die("write");
        p += w;
        n -= (size_t)w;
    }
}

/* One frame built once: header + payload, written with one write(). */
static uint8_t *make_frame(const uint8_t *payload, uint32_t len) {
    uint8_t *f = malloc((size_t)len + 4);
    if (!f) die("malloc");
    f[0] = len >> 24; f[1] = len >> 16; f[2] = len >> 8; f[3] = len;
    if (len) memcpy(f + 4, payload, len);
    return f;
}

/* A receive buffer that yields whole frames. */
struct reader { int fd; uint8_t *buf; size_t cap, start, end; };

static int next_frame(struct reader *r, const uint8_t **payload, uint32_t *len) {
    for (;;) {
        size_t have = r->end - r->start;
        if (have >= 4) {
            const uint8_t *h = r->buf + r->start;
            uint32_t n = (uint32_t)h[0] << 24 | (uint32_t)h[1] << 16 | (uint32_t)h[2] << 8 | h[3];
            if (have >= 4 + (size_t)n) {
                *payload = h + 4;
                *len = n;
                r->start += 4 + (size_t)n;
                return 1;
            }
        }
        if (r->start > 0) {
            memmove(r->buf, r->buf + r->start, have);
            r->start = 0;
            r->end = have;
        }
        ssize_t got = read(r->fd, r->buf + r->end, r->cap - r->end);
        if (got < 0 && busy && errno == EAGAIN) continue;
        if (got <= 0) return 0;
        r->end += (size_t)got;
    }
}

static double clock_of(clockid_t which) {
    struct timespec ts;
    clock_gettime(which, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double now(void) { return clock_of(CLOCK_MONOTONIC); }

/* CPU time of this process (the Python clients report it too). */
static double cpu_now(void) { return clock_of(CLOCK_PROCESS_CPUTIME_ID); }

static struct sockaddr_un address(const char *path) {
    struct sockaddr_un a = {0};
    a.sun_family = AF_UNIX;
    strncpy(a.sun_path, path, sizeof a.sun_path - 1);
    return a;
}

static void serve(int rtt, const char *path, long n) {
    struct sockaddr_un a = address(path);
    int ls = socket(AF_UNIX, SOCK_STREAM, 0);
    if (ls < 0 || bind(ls, (struct sockaddr *)&a, sizeof a) < 0 || listen(ls, 16) < 0) die("listen");
    printf("READY\n");
    fflush(stdout);
    int fd = accept(ls, NULL, NULL);
    if (fd < 0) die("accept");
    make_busy(fd);
    struct reader r = {fd, malloc(4 << 20), 4 << 20, 0, 0};
    uint8_t *out = malloc((2 << 20) + 8);
    const uint8_t *p;
    uint32_t len;
    long count = 0;
    while (next_frame(&r, &p, &len)) {
        if (rtt) {
            out[0] = len >> 24; out[1] = len >> 16; out[2] = len >> 8; out[3] = len;
            memcpy(out + 4, p, len);
            write_all(fd, out, (size_t)len + 4);
        } else if (++count == n) {
            uint8_t ack[5] = {0, 0, 0, 1, 'k'};
            write_all(fd, ack, 5);
        }
    }
}

static void client(int rtt, const char *path, long n, uint32_t size) {
    struct sockaddr_un a = address(path);
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof a) < 0) die("connect");
    make_busy(fd);
    uint8_t *payload = malloc(size + 1);
    for (uint32_t i = 0; i < size; i++) payload[i] = (uint8_t)i;
    uint8_t *frame = make_frame(payload, size);
    struct reader r = {fd, malloc(4 << 20), 4 << 20, 0, 0};
    const uint8_t *p;
    uint32_t len;
    double start, cpu;
    if (rtt) {
        for (int i = 0; i < WARMUP; i++) {
            write_all(fd, frame, (size_t)size + 4);
            if (!next_frame(&r, &p, &len)) die("echo");
        }
        start = now();
        cpu = cpu_now();
        for (long i = 0; i < n; i++) {
            write_all(fd, frame, (size_t)size + 4);
            if (!next_frame(&r, &p, &len)) die("echo");
        }
    } else {
        start = now();
        cpu = cpu_now();
        for (long i = 0; i < n; i++) write_all(fd, frame, (size_t)size + 4);
        if (!next_frame(&r, &p, &len)) die("ack");
    }
    printf("{\"seconds\": %.9f, \"cpu\": %.9f}\n", now() - start, cpu_now() - cpu);
}

int main(int argc, char **argv) {
    if (argc != 6 && !(argc == 7 && strcmp(argv[6], "busy") == 0)) {
        fprintf(stderr, "usage: floor server|client rtt|oneway|events PATH N SIZE [busy]\n");
        return 2;
    }
    busy = argc == 7;
    int rtt = strcmp(argv[2], "rtt") == 0;
    long n = atol(argv[4]);
    if (strcmp(argv[1], "server") == 0) serve(rtt, argv[3], n);
    else client(rtt, argv[3], n, (uint32_t)atol(argv[5]));
    return 0;
}
