/*
 * core.c: pyipc's Zig core driven from C through libipc.h, without Python.
 *
 *   core server rtt|oneway RUNDIR N SIZE   (prints READY once listening)
 *   core client rtt|oneway RUNDIR N SIZE   (prints {"seconds": S})
 *
 * Server: ipc_wait_events in a loop; round trips are echoed with ipc_write.
 * Client: ipc_write + ipc_read_fd per round trip; one-way messages are
 * ipc_schedule()d with at most 8 MiB in flight, counted back by MESSAGE_TX,
 * except large ones (64 KiB and more): ipc_write, straight from the caller's
 * buffer (the same choices as bench/peer_pyipc.py).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "libipc.h"

#define WARMUP 200
#define WINDOW_BYTES (8 << 20)
#define BATCH 1024
#define WRITE_FROM (64 << 10)

static void check(void *ctx, int rc, const char *what) {
    if (rc < 0) {
        fprintf(stderr, "core: %s: %s\n", what, ipc_last_error(ctx));
        exit(1);
    }
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void *context(const char *rundir) {
    void *ctx = NULL;
    if (ipc_context_init(&ctx) != 0) exit(1);
    check(ctx, ipc_context_set_rundir(ctx, rundir, strlen(rundir)), "rundir");
    return ctx;
}

static void serve(int rtt, const char *rundir, long n) {
    void *ctx = context(rundir);
    int sfd;
    check(ctx, ipc_service_init(ctx, &sfd, "bench", 5), "service_init");
    printf("READY\n");
    fflush(stdout);
    static struct ipc_event evs[BATCH];
    size_t count;
    long received = 0;
    for (;;) {
        check(ctx, ipc_wait_events(ctx, evs, BATCH, &count), "wait_events");
        for (size_t i = 0; i < count; i++) {
            struct ipc_event *ev = &evs[i];
            if (ev->type == MESSAGE_RX) {
                if (rtt) check(ctx, ipc_write(ctx, ev->fd, (char *)ev->message, ev->message_len), "write");
                else if (++received == n) check(ctx, ipc_write(ctx, ev->fd, "k", 1), "ack");
            } else if (ev->type == DISCONNECTION) {
                ipc_context_deinit(&ctx);
                return;
            }
        }
    }
}

/* Returns 1 when the receiver's acknowledgement already came among the events
 * (it can arrive in the same batch as the last MESSAGE_TX). */
static int send_window(void *ctx, int fd, const char *payload, uint32_t size, long n) {
    long window = WINDOW_BYTES / ((long)size + 4);
    if (window < 1) window = 1;
    static struct ipc_event evs[BATCH];
    long sent = 0, done = 0;
    int acked = 0;
    size_t count;
    while (done < n) {
        while (sent < n && sent - done < window) {
            check(ctx, ipc_schedule(ctx, fd, payload, size), "schedule");
            sent++;
        }
        check(ctx, ipc_wait_events(ctx, evs, BATCH, &count), "wait_events");
        for (size_t i = 0; i < count; i++) {
            done += evs[i].type == MESSAGE_TX;
            acked |= evs[i].type == MESSAGE_RX;
        }
    }
    return acked;
}

static void client(int rtt, const char *rundir, long n, uint32_t size) {
    void *ctx = context(rundir);
    int fd;
    check(ctx, ipc_connect_service(ctx, &fd, "bench", 5), "connect");
    char *payload = malloc(size + 1);
    for (uint32_t i = 0; i < size; i++) payload[i] = (char)i;
    size_t cap = (size_t)size + 64;
    char *buf = malloc(cap);
    size_t len;
    double start;
    if (rtt) {
        for (long i = 0; i < WARMUP + n; i++) {
            if (i == WARMUP) start = now();
            check(ctx, ipc_write(ctx, fd, payload, size), "write");
            len = cap;
            check(ctx, ipc_read_fd(ctx, fd, buf, &len), "read");
        }
    } else {
        start = now();
        int acked = 0;
        if (size >= WRITE_FROM)
            for (long i = 0; i < n; i++) check(ctx, ipc_write(ctx, fd, payload, size), "write");
        else
            acked = send_window(ctx, fd, payload, size, n);
        len = cap;
        if (!acked) check(ctx, ipc_read_fd(ctx, fd, buf, &len), "read ack");
    }
    printf("{\"seconds\": %.9f}\n", now() - start);
    ipc_context_deinit(&ctx);
}

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: core server|client rtt|oneway RUNDIR N SIZE\n");
        return 2;
    }
    int rtt = strcmp(argv[2], "rtt") == 0;
    long n = atol(argv[4]);
    if (strcmp(argv[1], "server") == 0) serve(rtt, argv[3], n);
    else client(rtt, argv[3], n, (uint32_t)atol(argv[5]));
    return 0;
}
