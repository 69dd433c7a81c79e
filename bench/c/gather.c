/*
 * gather.c: what writing many small frames costs, by how they are gathered.
 *
 * One process writes 4,000 batches of 512 frames (a 4-byte header and a
 * 64-byte payload each) into a Unix socketpair; a child reads them away.
 *   0  one writev() per batch, two iovecs per frame (header, payload):
 *      what pyipc's write_many did before zig/gather.zig
 *   1  the frames copied into one buffer, one writev() of one iovec per batch:
 *      what it does now for payloads up to 1 KiB
 * Prints the time per frame. Not part of `pyipc bench`: it explains a choice
 * (zig/gather.zig, README Benchmarks). Run both on one CPU for the software's
 * cost alone:
 *
 *   python -m ziglang cc -O2 -o /tmp/gather bench/c/gather.c
 *   for m in 0 1; do taskset -c 0 /tmp/gather $m; done
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

enum { FRAMES = 512, PAYLOAD = 64, FRAME = PAYLOAD + 4, BATCHES = 4000 };

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static void header(uint8_t *h) {            /* big-endian PAYLOAD */
    h[0] = 0, h[1] = 0, h[2] = 0, h[3] = PAYLOAD;
}

/* Every byte of iov[0..count], however the kernel splits it. */
static void writev_all(int fd, struct iovec *iov, int count) {
    while (count > 0) {
        ssize_t w = writev(fd, iov, count);
        if (w < 0) { perror("writev"); exit(1); }
        while (count > 0 && (size_t)w >= iov->iov_len) w -= (ssize_t)iov->iov_len, iov++, count--;
        if (count > 0) iov->iov_base = (char *)iov->iov_base + w, iov->iov_len -= (size_t)w;
    }
}

int main(int argc, char **argv) {
    int mode = argc > 1 ? atoi(argv[1]) : -1;
    int sv[2];
    if ((mode != 0 && mode != 1) || socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0) {
        fprintf(stderr, "usage: gather 0|1\n");
        return 2;
    }
    if (fork() == 0) {                      /* the reader */
        close(sv[0]);
        static char sink[1 << 20];
        while (read(sv[1], sink, sizeof sink) > 0) continue;
        return 0;
    }
    close(sv[1]);
    static char payloads[FRAMES * PAYLOAD], joined[FRAMES * FRAME];
    static uint8_t headers[FRAMES][4];
    static struct iovec iov[2 * FRAMES];
    memset(payloads, 'x', sizeof payloads);
    double start = now();
    for (int b = 0; b < BATCHES; b++) {
        if (mode == 0) {
            for (int k = 0; k < FRAMES; k++) {
                header(headers[k]);
                iov[2 * k] = (struct iovec){headers[k], 4};
                iov[2 * k + 1] = (struct iovec){payloads + k * PAYLOAD, PAYLOAD};
            }
            writev_all(sv[0], iov, 2 * FRAMES);
        } else {
            for (int k = 0; k < FRAMES; k++) {
                header((uint8_t *)joined + k * FRAME);
                memcpy(joined + k * FRAME + 4, payloads + k * PAYLOAD, PAYLOAD);
            }
            iov[0] = (struct iovec){joined, sizeof joined};
            writev_all(sv[0], iov, 1);
        }
    }
    double ns = (now() - start) / ((double)BATCHES * FRAMES) * 1e9;
    printf("mode %d: %.1f ns per frame\n", mode, ns);
    close(sv[0]);
    wait(NULL);
    return 0;
}
