/*
 * pong: a libIPC client in C, built against zig/libipc.h.
 *
 *   RUNDIR=/path/to/rundir ./pong SERVICE MESSAGE...
 *
 * Connects to SERVICE (run dir from env RUNDIR, else /tmp/.libipc-run), sends
 * each MESSAGE, reads its echo and prints it. Exits 0 when every echo matched
 * what was sent. Uses only libIPC's original functions, so the same source
 * builds against libIPC itself.
 *
 * Build: python -m ziglang cc -Izig examples/c/pong.c -Lzig-out/lib -lipc -o pong
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "libipc.h"

/* A negative code from libIPC means failure; this library says how large a
 * buffer a message needs instead of dropping it (see ipc_read_fd below). */
#define BUFFER_TOO_SMALL (-11)

/* Read one message from fd into *buf (grown when too small); its length in *len. */
static int read_message(void *ctx, int fd, char **buf, size_t *cap, size_t *len)
{
    for (;;) {
        *len = *cap;
        int rc = ipc_read_fd(ctx, fd, *buf, len);
        if (rc != BUFFER_TOO_SMALL)
            return rc;
        char *bigger = realloc(*buf, *len);
        if (bigger == NULL)
            return -1;
        *buf = bigger;
        *cap = *len;
    }
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: %s SERVICE [MESSAGE...]\n", argv[0]);
        return 2;
    }
    const char *service = argv[1];
    void *ctx = NULL;
    if (ipc_context_init(&ctx) != 0) {
        fprintf(stderr, "pong: cannot create a context\n");
        return 1;
    }
    int fd = -1;
    if (ipc_connect_service(ctx, &fd, service, (uint16_t)strlen(service)) != 0) {
        fprintf(stderr, "pong: cannot connect to service %s\n", service);
        ipc_context_deinit(&ctx);
        return 1;
    }
    size_t cap = 4096;
    char *buf = malloc(cap);
    int status = buf == NULL ? 1 : 0;
    for (int i = 2; i < argc && status == 0; i++) {
        size_t sent = strlen(argv[i]);
        size_t len = 0;
        if (ipc_write(ctx, fd, argv[i], (uint32_t)sent) != 0) {
            fprintf(stderr, "pong: cannot send message %d\n", i - 1);
            status = 1;
        } else if (read_message(ctx, fd, &buf, &cap, &len) != 0) {
            fprintf(stderr, "pong: no echo for message %d\n", i - 1);
            status = 1;
        } else if (len != sent || memcmp(buf, argv[i], len) != 0) {
            fprintf(stderr, "pong: echo %d differs (%zu bytes sent, %zu received)\n", i - 1, sent, len);
            status = 1;
        } else {
            printf("echo: %.*s\n", (int)(len > 200 ? 200 : len), buf);
        }
    }
    free(buf);
    ipc_close_all(ctx);
    ipc_context_deinit(&ctx);
    return status;
}
