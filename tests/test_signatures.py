"""Both backends' classes have the public API of pyipc.Context, with the
same signatures (inspect.signature: parameter names, kinds, defaults and
annotations), as pyzmq derives its backends from one public_api list."""

from __future__ import annotations

import inspect

import pytest

import pyipc
from pyipc._backend import load

#: Every public attribute of the base class: its methods and properties.
PUBLIC = sorted(name for name in dir(pyipc.Context) if not name.startswith("_")
                and (callable(getattr(pyipc.Context, name))
                     or isinstance(getattr(pyipc.Context, name), property)))


def test_the_public_api_is_listed():
    assert {"write", "read", "wait_event", "timer", "linger", "busy_poll",
            "close_all", "read_typed"} <= set(PUBLIC)


def _signature(obj: object) -> inspect.Signature:
    """obj's signature; self is compared by name alone (the pure backend's
    parts annotate it with the class they are mixed into, for type checkers)."""
    sig = inspect.signature(obj)   # type: ignore[arg-type]
    params = list(sig.parameters.values())
    if params and params[0].name == "self":
        params[0] = params[0].replace(annotation=inspect.Parameter.empty)
    return sig.replace(parameters=params)


def _same(base: object, ours: object, where: str) -> None:
    assert _signature(ours) == _signature(base), \
        f"{where}: {_signature(ours)} != {_signature(base)}"


@pytest.mark.parametrize("name", PUBLIC)
def test_signature_matches_the_base_class(backend, name):
    cls = load(backend)
    base, ours = inspect.getattr_static(pyipc.Context, name), inspect.getattr_static(cls, name)
    where = f"{cls.__name__}.{name}"
    if isinstance(base, property):
        assert isinstance(ours, property), where
        for part in ("fget", "fset", "fdel"):
            if getattr(base, part) is None:
                assert getattr(ours, part) is None, f"{where}.{part}"
            else:
                _same(getattr(base, part), getattr(ours, part), f"{where}.{part}")
        return
    _same(getattr(pyipc.Context, name), getattr(cls, name), where)


def test_a_differing_signature_is_seen():
    """The comparison is not vacuous: a parameter renamed is a difference."""
    def read(self, fd: int, timeout_s=None) -> bytes:    # noqa: ANN001
        raise NotImplementedError
    with pytest.raises(AssertionError):
        _same(pyipc.Context.read, read, "read")


def test_each_backend_has_no_other_public_method(backend):
    cls = load(backend)
    extra = {name for name in dir(cls) if not name.startswith("_")} - set(dir(pyipc.Context))
    assert extra == set()


#: The public methods (not properties): called with too many arguments below.
METHODS = [name for name in PUBLIC if not isinstance(getattr(pyipc.Context, name), property)]


@pytest.mark.parametrize("name", METHODS)
def test_a_call_with_wrong_arguments_names_context_on_both_backends(ctx_factory, name):
    """Python's TypeError for a call with wrong arguments names the method as
    the caller knows it, Context.NAME, on both backends: it named the
    backend's class or mixin (NativeContext.read(), Reading.read()), so the
    same mistake gave two texts."""
    with pytest.raises(TypeError, match=rf"^Context\.{name}\(\) (takes|got)"):
        getattr(ctx_factory(), name)(*range(20))


def test_read_without_its_fd_says_the_same_on_both_backends(ctx_factory):
    with pytest.raises(TypeError) as caught:
        ctx_factory().read()           # type: ignore[call-arg]
    assert str(caught.value) == "Context.read() missing 1 required positional argument: 'fd'"


def test_the_constructor_shows_its_parameters(backend):
    """inspect.signature(pyipc.Context) (help(), IDEs), and the backend's
    class's, is __init__'s without self: it was (*args, **kwargs), __new__'s."""
    for cls in (pyipc.Context, load(backend)):
        assert list(inspect.signature(cls).parameters) == [
            "rundir", "max_message_size", "backend", "max_queue_size", "max_connections",
            "linger"], cls
