"""The pure-Python backend, one module per concern, each named like its twin
in the Zig core (zig/*.zig) where it has one:

- context.py: PureContext and its event loop (context.zig)
- conn_table.py: the managed fds and their slots (conn_table.zig)
- send_queue.py: schedule() and the queues the loop flushes (send_queue.zig)
- framing.py: the length-prefixed frames and their decoder (framing.zig)
- poller.py: readiness, epoll or `selectors` (poller*.zig)
- blocking.py: how a blocking call waits (blocking.zig)
- io.py: the blocking reads and writes, and the loop's reads
- switching.py: switched pairs of fds and their callbacks (switching.zig)
- services.py: services, connections, foreign fds, peer credentials
- fdpass.py: connect() through ipcd (fdpass.zig)
- closing.py: close(), close_all(), connections that end
- syscalls.py: system calls that need care (sys.zig)
- state.py: what these parts use of each other, for the type checker only

The events it has not returned yet wait in one queue, pyipc._events.EventQueue.
"""
