"""pyipc benchmarks (not tests): each case runs a server and a client in separate
processes, for pyipc (native, pure) and for other ways to do the same IPC.

Run them with ``pyipc bench`` (``--quick``, ``--repeats N``, ``--cases ...``) from a
source checkout; see :mod:`bench.main`.
"""
