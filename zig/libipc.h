/*
 * libipc.h: the C ABI of pyipc's Zig core.
 *
 * It keeps libIPC's functions, names, signatures and enum values, so a C program
 * written for libIPC builds against this library unchanged, and adds what pyipc
 * needs: error codes and text, batched events, limits, peer credentials and fd
 * passing. pyipc's cffi wrapper reads the declarations between the CFFI markers
 * below, so this file is the only copy of them: keep those lines plain C that
 * cffi's parser accepts (no preprocessor directives, no comments inside).
 *
 * Return values: 0 on success, a negative IPC_E_* code on failure (libIPC
 * returned -1; testing "!= 0" or "< 0" works with both). After a failure,
 * ipc_last_error(ctx) gives the message, the same text the pure-Python backend
 * puts in its exception, and ipc_last_errno(ctx) the errno of the OS error that
 * caused it (0 when none did). ipc_context_init() has no context to ask when it
 * fails: IPC_E_NO_MEMORY when out of memory, else IPC_E_GENERIC, and errno says
 * why (EMFILE, ENFILE, ...). IPC_E_TIMEOUT: a blocking call's
 * timeout expired; IPC_E_INTERRUPTED: a blocking call was interrupted by a signal.
 * IPC_E_NETWORK: ipc_connect() through ipcd was refused with a reason (ipcd's
 * "ne CODE TEXT": remote unreachable, daemon missing, ...), in ipc_last_error();
 * a refusal coded norule or noservice is IPC_E_SERVICE_NOT_FOUND.
 *
 * Limits: ipc_context_set_limits(ctx, max_message_size, max_queue_size,
 * max_connections) takes max_message_size from 1 to 2^32-1, max_queue_size
 * from max_message_size + 4 to 2^63-1 and max_connections from 1 to 2^31-1;
 * out of range it changes nothing and returns IPC_E_GENERIC, whose text
 * names the bound ("max_queue_size must be at most 9223372036854775807").
 *
 * Payloads handed out by ipc_wait_events() and ipc_read_lent() point into
 * memory the context owns; they stay valid until the next wait call or
 * ipc_read_lent() call, or ipc_context_deinit(), on that context.
 *
 * Batches: ipc_write_many(ctx, fd, payloads, lengths, count) is ipc_write() of
 * `count` messages whose payloads lie back to back at `payloads` (sizes in
 * `lengths`), gathered into few system calls; every size is checked before
 * anything is sent. ipc_write_many_ptrs() is the same with one pointer per
 * payload (large payloads are written from where they are, not copied).
 * ipc_check_write(ctx, fd, len) makes ipc_write()'s checks of fd and of a
 * payload of `len` bytes, in its order, and writes nothing: for sizes a
 * uint32_t cannot carry (its failure then says what ipc_write() would).
 * ipc_read_into() is ipc_read_fd(), except that a message of 64 KiB or more
 * that fits the buffer is read from the socket straight into it. ipc_read_many(ctx, fd, buffer, buflen, lengths, capacity,
 * count) blocks like ipc_read_fd() until fd has a message, then copies fd's
 * next messages, at least one and at most `capacity`, back to back into
 * `buffer` (*buflen bytes, less than 4 GiB), their sizes into `lengths` (*count
 * messages). When the first does not fit, it stays queued and the call
 * returns IPC_E_BUFFER_TOO_SMALL with *buflen set to its size. One context belongs to one thread at a
 * time; the only call another thread may make is ipc_wakeup(ctx), which makes
 * a wait in progress in ipc_wait_events() return (with no event if none came;
 * ipc_wait_event() goes on waiting).
 *
 * Signals and timeouts: by default a blocking call goes on waiting through a
 * signal (libIPC's behaviour). After ipc_context_interruptible(ctx, 1), a
 * signal ends it with IPC_E_INTERRUPTED, having consumed nothing: call it
 * again. (With busy_poll on, such a context also returns IPC_E_INTERRUPTED,
 * nothing consumed, when a busy_poll spin ends without data, before it
 * sleeps, so that Python's signal handlers run then: call it again.)
 * In such a context ipc_wakeup(ctx) from another thread also ends a
 * blocking read (ipc_read_fd, ipc_read, ipc_read_many, ipc_read_into,
 * ipc_read_lent) with IPC_E_INTERRUPTED, nothing consumed, so that the thread
 * can do what the other one asked before it reads again. A write stopped in
 * the middle of a frame has queued the rest of that
 * frame, which goes out before anything else on the connection; then
 * ipc_write_count(ctx) tells how many of the call's messages were written or
 * so begun (the others were not sent): call again with those left out. A
 * binding whose own calls can run in between (a signal handler that writes)
 * keeps the count with ipc_set_write_count(ctx, n) after them.
 * ipc_context_call_timeout(ctx, usec) bounds every blocking call from then on
 * (negative: no bound): IPC_E_TIMEOUT, with the same guarantees.
 * ipc_connect_service and ipc_connect are blocking calls too: a service whose
 * listen backlog is full holds the connect until it accepts, the call
 * timeout passes (IPC_E_TIMEOUT, "connect to service NAME timed out"; a zero
 * timeout makes one attempt) or, in an interruptible context, a signal comes
 * (IPC_E_INTERRUPTED: nothing was made, call it again); a signal in another
 * context connects again (an interrupted Unix connect is never left half
 * done). ipc_connect through ipcd has one deadline for all it does: the
 * connect to ipcd, the request and the answer.
 * ipc_send_fd(sock, fd, payload, len) and ipc_receive_fd(sock, &fd, buffer,
 * &buflen) are libIPC's raw fd-passing helpers (no framing): receive blocks
 * for the next bytes and the fd sent with them (-1 when none; a NULL &fd:
 * a received fd is closed, not leaked). At the end of the stream receive
 * returns IPC_OK with *buflen 0 and no fd: a loop waiting for an fd stops
 * there. SCM_RIGHTS needs a byte to travel with: send with an empty payload
 * sends one NUL byte, which the receiver gets (*buflen 1). A stream
 * socket keeps no boundaries, so a buffer smaller than what was sent gets its
 * first bytes and the rest comes with the next call: give it a buffer as
 * large as the largest payload. An empty or NULL buffer is refused
 * (IPC_E_BUFFER_TOO_SMALL) before anything is read; a NULL payload with a
 * length is refused, as by every call that takes one (IPC_E_GENERIC).
 * Indices: a connection that ends (ERROR, DISCONNECTION) keeps its slot, as
 * its fd number, until the next wait or its close: ipc_close(ctx, index) and
 * ipc_read(ctx, index) on its events reach it (IPC_E_CONNECTION_CLOSED for
 * the read), never a client accepted in the same round, which gets another.
 * ipc_linger(ctx, fd, usec) sends what is scheduled for fd (every fd when fd
 * is -1) for at most usec (0: one attempt that does not wait): 0 when all
 * went out, else IPC_E_TIMEOUT (or IPC_E_INTERRUPTED). Its rounds read and accept (those events wait as
 * usual); inside a switching callback it only writes, waiting for room on
 * the lingering fds alone (nothing is read or accepted, no other callback
 * runs; a queue whose write fails is left to the loop, which reports it).
 * ipc_scheduled_fds() lists the fds that still have
 * scheduled messages and their counts (up to `capacity`; returns how many
 * there are). In a forked child, ipc_close_fd, ipc_close_all and
 * ipc_context_deinit close the child's copies of the fds only: the parent's
 * socket files, locks and poller are left alone. ipc_after_fork_in_child(ctx),
 * called in the child right after fork (pyipc does, at fork), puts /dev/null
 * on the child's copies of the services' lock fds and of the listening and
 * connected sockets (not external fds, the poller or ipc_context_fd's fd):
 * a child that never closes them no longer keeps the parent's service name
 * locked nor its closed connections open; the numbers stay taken until the
 * child closes them. In the process that made ctx it does nothing.
 *
 * Batched scheduling: ipc_schedule_many(ctx, fds, payloads, lengths, count,
 * done) is ipc_schedule() of `count` messages in order, the i-th to fds[i],
 * payloads back to back at `payloads`; it stops at the first failure and sets
 * *done (when not NULL) to how many were queued. ipc_schedule_room(ctx, fd,
 * len, room) makes ipc_schedule()'s checks of fd and of a `len`-byte payload,
 * in its order, all but the queue bound, and sets *room to the bytes (frame
 * headers of 4 included) fd's send queue takes before it is full.
 * ipc_schedule_pinned(ctx, fd, payload, len, token) is ipc_schedule() without
 * the copy: the core writes the payload from the caller's memory, which must
 * stay allocated and unchanged until ipc_unpinned(ctx, tokens, capacity)
 * hands `token` back (the frame is written, or its connection ended; tokens
 * oldest first, at most `capacity`, returns how many). ipc_context_deinit
 * releases every pin.
 * ipc_context_read_wakeup(ctx, on): in an interruptible context, whether
 * ipc_wakeup() ends a blocking read too (on, the default; the reads then poll
 * the wake-up pipe) or not (off: they wait in the kernel, which is quicker).
 *
 * Another event loop: ipc_context_fd(ctx) returns one fd (or a negative
 * IPC_E_* code: the poll(2) backend has none) that is readable, level-
 * triggered, while ipc_wait_events() with a zero call timeout would return
 * something: a ready fd of the context, events already queued, a due timer
 * (counted, for a zero-timeout wait, from the last wait that returned events
 * or from ipc_context_timer), scheduled data that can now be written. Watch
 * it for reading; when readable, call ipc_wait_events() with
 * ipc_context_call_timeout(ctx, 0) until it returns IPC_E_TIMEOUT (nothing
 * ready: it may, rarely, be readable with nothing to return). The context
 * owns the fd: do not close it; ipc_close_all() closes it (the next call
 * makes a new one).
 *
 * Switching extension (pyipc; for protocol daemons such as a WebSocket or
 * TLS gateway): an `in` callback may return CB_MORE: its payload is forwarded
 * as with CB_NO_ERROR, and `in` is called again without waiting for the fd to
 * be readable (it holds input already read), at most 64 calls per fd and
 * round (pyipc.MAX_MORE_PER_ROUND), the rest in the next rounds; while the
 * peer's queue is over max_queue_size the calls wait, as reading does; while
 * calls are due, ipc_context_fd() is readable. From
 * `out`, CB_MORE is an error. ipc_switch_send(ctx, fd, data, len) queues raw
 * bytes (not framed) for switched fd `fd`, written in order with the rest of
 * its output; IPC_E_QUEUE_FULL when fd's queue is over max_queue_size already
 * (the state in which its peer is not read) or `len` alone is larger, except
 * from fd's own `out` callback (forwarding, held back by back-pressure).
 * ipc_switch_end(ctx, fd, reason, reason_len) ends the switch of fd: an
 * ERROR event with `reason` (UTF-8, 1 to 1024 bytes; NULL for none: an
 * empty one is refused, IPC_E_GENERIC) for fd,
 * then each side stops being read, writes what is queued for it, and is
 * closed with a DISCONNECTION event. Both take an fd that is switched
 * (IPC_E_UNKNOWN_FD otherwise; IPC_E_CONNECTION_CLOSED for an fd whose switch
 * already ended). ipc_add_switch refuses such an fd too, still writing what
 * is queued for it or with its write failed (IPC_E_CONNECTION_CLOSED): its
 * end would close the new partner. ipc_context_switch_events(ctx, 0) stops the SWITCH_RX and
 * SWITCH_TX events of what is relayed from then on (1: reported again, the
 * default); ERROR and DISCONNECTION are always reported. The calls may be
 * made from inside a switching callback. Reads and waits may not
 * (ipc_read_fd, ipc_read, ipc_read_many, ipc_read_into, ipc_read_lent,
 * ipc_wait_event, ipc_wait_events: IPC_E_GENERIC, "cannot read inside a
 * switch callback" or "cannot wait ..."; ipc_linger only writes there): the
 * loop that called it is still decoding what it read, into the buffers a
 * read would use. ipc_context_deinit(&ctx) there closes everything at once
 * and sets ctx to NULL; the context is freed when the call that ran the
 * callback (ipc_wait_event, ipc_wait_events, ipc_linger) returns, which it
 * does at once with IPC_E_GENERIC (there is no context left to ask why).
 */
#ifndef LIBIPC
#define LIBIPC

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* CFFI-BEGIN */
enum event_types {
    ERROR = 0,
    CONNECTION = 1,
    DISCONNECTION = 2,
    MESSAGE_RX = 3,
    MESSAGE_TX = 4,
    TIMER = 5,
    EXTERNAL = 6,
    SWITCH_RX = 7,
    SWITCH_TX = 8
};

enum cb_event_types {
    CB_NO_ERROR = 0,
    CB_ERROR = 1,
    CB_FD_CLOSING = 2,
    CB_IGNORE = 3,
    CB_MORE = 4
};

enum ipc_error_codes {
    IPC_OK = 0,
    IPC_E_GENERIC = -1,
    IPC_E_SERVICE_BUSY = -2,
    IPC_E_SERVICE_NOT_FOUND = -3,
    IPC_E_INVALID_NAME = -4,
    IPC_E_RUNDIR = -5,
    IPC_E_MESSAGE_TOO_LARGE = -6,
    IPC_E_QUEUE_FULL = -7,
    IPC_E_CONNECTION_CLOSED = -8,
    IPC_E_UNKNOWN_FD = -9,
    IPC_E_CONNECTION_LIMIT = -10,
    IPC_E_BUFFER_TOO_SMALL = -11,
    IPC_E_NO_MEMORY = -12,
    IPC_E_INTERRUPTED = -13,
    IPC_E_TIMEOUT = -14,
    IPC_E_NETWORK = -15
};

struct ipc_event {
    int32_t type;
    int32_t fd;
    int64_t index;
    const char *message;
    uint32_t message_len;
    const char *error;
};

int ipc_context_init(void **ctx);
int ipc_service_init(void *ctx, int *servicefd, const char *service_name, uint16_t service_name_len);
int ipc_connect_service(void *ctx, int *servicefd, const char *service_name, uint16_t service_name_len);
void ipc_context_deinit(void **ctx);
int ipc_write(void *ctx, int servicefd, char *mcontent, uint32_t mlen);
int ipc_schedule(void *ctx, int servicefd, const char *mcontent, uint32_t mlen);
int ipc_read_fd(void *ctx, int fd, char *buffer, size_t *buflen);
int ipc_read(void *ctx, size_t index, char *buffer, size_t *buflen);
int ipc_wait_event(void *ctx, char *t, size_t *index, int *originfd, char *buffer, size_t *buflen);
void ipc_context_timer(void *ctx, int timer);
int ipc_close_fd(void *ctx, int fd);
int ipc_close(void *ctx, size_t index);
int ipc_close_all(void *ctx);
void ipc_after_fork_in_child(void *ctx);
int ipc_add_external(void *ctx, int newfd);
int ipc_add_switch(void *ctx, int fd1, int fd2);
int ipc_set_switch_callbacks(void *ctx, int fd,
    enum cb_event_types (*in)(int orig, char *payload, uint32_t *mlen),
    enum cb_event_types (*out)(int dest, const char *payload, uint32_t mlen));
void ipc_context_switch_events(void *ctx, int on);
int ipc_switch_send(void *ctx, int fd, const char *data, size_t len);
int ipc_switch_end(void *ctx, int fd, const char *reason, size_t reason_len);

const char *ipc_last_error(void *ctx);
int ipc_context_set_rundir(void *ctx, const char *rundir, size_t rundir_len);
int ipc_context_set_limits(void *ctx, uint32_t max_message_size, uint64_t max_queue_size, uint32_t max_connections);
int ipc_context_busy_poll(void *ctx, uint32_t usec);
int ipc_connect(void *ctx, int *fd, const char *service_name, uint16_t service_name_len);
int ipc_wait_events(void *ctx, struct ipc_event *events, size_t capacity, size_t *count);
int ipc_write_many(void *ctx, int fd, const char *payloads, const uint32_t *lengths, size_t count);
int ipc_write_many_ptrs(void *ctx, int fd, const char *const *payloads, const uint32_t *lengths, size_t count);
int ipc_check_write(void *ctx, int fd, uint64_t len);
int ipc_read_many(void *ctx, int fd, char *buffer, size_t *buflen, uint32_t *lengths, size_t capacity, size_t *count);
int ipc_read_lent(void *ctx, int fd, const char **message, size_t *len);
int ipc_read_into(void *ctx, int fd, char *buffer, size_t *buflen);
size_t ipc_pending_events(void *ctx);
int ipc_wakeup(void *ctx);
int ipc_peer_credentials(void *ctx, int fd, int32_t *pid, uint32_t *uid, uint32_t *gid);
int ipc_add_connection(void *ctx, int fd);
int ipc_pause_reading(void *ctx, int fd, int on);
int ipc_queued_messages(void *ctx, int fd, size_t *count, int *peer_fd, size_t *peer_count);
void ipc_context_interruptible(void *ctx, int on);
void ipc_context_call_timeout(void *ctx, int64_t usec);
size_t ipc_write_count(void *ctx);
void ipc_set_write_count(void *ctx, size_t count);
int ipc_linger(void *ctx, int fd, int64_t usec);
size_t ipc_scheduled_fds(void *ctx, int *fds, size_t *counts, size_t capacity);
int ipc_send_fd(int sock, int fd_to_pass, const char *payload, uint32_t payload_len);
int ipc_receive_fd(int sock, int *received_fd, char *buffer, size_t *buflen);
int ipc_last_errno(void *ctx);
int ipc_context_fd(void *ctx);
int ipc_schedule_many(void *ctx, const int *fds, const char *payloads, const uint32_t *lengths, size_t count, size_t *done);
int ipc_schedule_room(void *ctx, int fd, uint64_t len, uint64_t *room);
int ipc_schedule_pinned(void *ctx, int fd, const char *mcontent, uint32_t mlen, uint64_t token);
size_t ipc_unpinned(void *ctx, uint64_t *tokens, size_t capacity);
void ipc_context_read_wakeup(void *ctx, int on);
/* CFFI-END */

#endif
