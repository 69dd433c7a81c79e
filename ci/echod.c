/*
 * echod: a tiny libIPC echo service in C, the other half of examples/c/pong.c,
 * so that ci/wheels can exercise a built libipc (also under qemu-user) with no
 * Python on the target architecture.
 *
 *   RUNDIR=/path/to/rundir ./echod SERVICE
 *
 * Listens on SERVICE, echoes every message back to its sender, and exits 0 when
 * its first client has disconnected after sending at least one message.
 * Exits 1 on any failure, or after 60 s without an event.
 *
 * Build: python -m ziglang cc -Izig ci/echod.c -Lzig-out/lib -lipc -o echod
 */
#include <stdio.h>
#include <string.h>

#include "libipc.h"

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s SERVICE\n", argv[0]);
        return 2;
    }
    void *ctx = NULL;
    if (ipc_context_init(&ctx) != 0) {
        fprintf(stderr, "echod: cannot create a context\n");
        return 1;
    }
    int service = -1;
    if (ipc_service_init(ctx, &service, argv[1], (uint16_t)strlen(argv[1])) != 0) {
        fprintf(stderr, "echod: service_init: %s\n", ipc_last_error(ctx));
        ipc_context_deinit(&ctx);
        return 1;
    }
    ipc_context_timer(ctx, 60000);
    printf("echod: listening on %s\n", argv[1]);
    fflush(stdout);

    struct ipc_event events[64];
    size_t count = 0;
    long echoed = 0;
    int status = -1;
    while (status < 0) {
        if (ipc_wait_events(ctx, events, 64, &count) != 0) {
            fprintf(stderr, "echod: wait_events: %s\n", ipc_last_error(ctx));
            status = 1;
            break;
        }
        for (size_t i = 0; i < count && status < 0; i++) {
            struct ipc_event *ev = &events[i];
            switch (ev->type) {
            case MESSAGE_RX:
                if (ipc_write(ctx, ev->fd, (char *)ev->message, ev->message_len) != 0) {
                    fprintf(stderr, "echod: write: %s\n", ipc_last_error(ctx));
                    status = 1;
                }
                echoed++;
                break;
            case DISCONNECTION:
                status = echoed > 0 ? 0 : 1;
                break;
            case ERROR:
                fprintf(stderr, "echod: error on fd %d: %s\n", ev->fd, ev->error ? ev->error : "?");
                break;
            case TIMER:
                fprintf(stderr, "echod: no event for 60 s\n");
                status = 1;
                break;
            default:
                break;
            }
        }
    }
    printf("echod: echoed %ld message(s)\n", echoed);
    ipc_close_all(ctx);
    ipc_context_deinit(&ctx);
    return status;
}
