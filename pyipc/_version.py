"""The version of pyipc, in one place: pyproject.toml reads it (`dynamic`),
`pyipc.__version__` and `pyipc --version` show it."""

#: The name of the distribution on the package index (`pip install pyipc-zig`);
#: the import name stays `pyipc`.
DISTRIBUTION = "pyipc-zig"

__version__ = "0.1.0"
