"""Where the deploys change how pyinfra works, and why. Each patch keeps pyinfra's results.

- A host whose SSH connection drops mid-run fails alone; the other hosts finish. pyinfra treats
  OSError from a command as that host's failure, but paramiko reports a transport that died
  under it (a host powered off, a cable pulled) as EOFError, which pyinfra does not catch: the
  whole run stops with a traceback for every host (pyinfra issue #1220). It is re-raised as
  ConnectionResetError, an OSError.
- Commands don't wait for delayed ACKs. paramiko leaves Nagle's algorithm on, and every command
  is a few small SSH packets, so each waited for the host's delayed ACK: about 40 ms a command
  on any network. The socket gets TCP_NODELAY before each command.
- Operation order without reading source files. pyinfra orders operations by the line numbers
  of the deploy code's call stack, taken with `inspect.stack()`, which reads every frame's
  source line and searches `sys.modules` for its module: most of the controller's CPU in a
  no-op converge. The same line numbers come from the frames themselves.
- Global argument names once. pyinfra evaluates the type hints of its global arguments at
  every operation and fact call; they never change within a run.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import socket
import sys
from collections.abc import Callable
from typing import Any

_WRAPPED = "_g4f_connection_wrapped"


def send_without_delay(connector: Any) -> None:
    """Turn Nagle's algorithm off on the connector's TCP socket (a proxied one has none)."""
    client = getattr(connector, "client", None)
    transport = client.get_transport() if client is not None else None
    sock = getattr(transport, "sock", None)
    # Not connected yet, or a ProxyCommand/jump-host channel: nothing to tune.
    with contextlib.suppress(AttributeError, OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[union-attr]


def wrap_connection_methods(cls: type, methods: tuple[str, ...]) -> None:
    """Wrap `methods` of `cls`: no send delay; ConnectionResetError where paramiko has EOFError."""
    for name in methods:
        original: Callable[..., Any] = getattr(cls, name)
        if getattr(original, _WRAPPED, False):
            continue

        @functools.wraps(original)
        def wrapper(self: Any, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
            send_without_delay(self)
            try:
                return _original(self, *args, **kwargs)
            except EOFError as exc:
                raise ConnectionResetError("SSH connection lost (host down?)") from exc

        setattr(wrapper, _WRAPPED, True)
        setattr(cls, name, wrapper)


def operation_order_from_frames(state: Any) -> list[int]:
    """pyinfra's `get_operation_order_from_stack`, reading frames instead of source files."""
    import pyinfra
    from pyinfra.api.util import PYINFRA_INSTALL_DIR

    frames = []
    frame = sys._getframe(0)  # this frame stands in for pyinfra's own: the search below ends on it
    while frame is not None:
        frames.append(frame)
        frame = frame.f_back  # type: ignore[assignment]
    frames.reverse()
    start = 0
    if state.current_deploy_filename:  # the first frame in it, else (like pyinfra) the last
        start = next(
            (
                i
                for i, f in enumerate(frames)
                if f.f_code.co_filename == state.current_deploy_filename
            ),
            len(frames) - 1,
        )
    line_numbers = [state.current_op_file_number] if pyinfra.is_cli else []
    line_numbers.extend(
        frame.f_lineno
        for frame in frames[start:-1]
        if not frame.f_code.co_filename.startswith(PYINFRA_INSTALL_DIR)
    )
    return line_numbers


def install() -> None:
    """Apply the patches to pyinfra (idempotent)."""
    from pyinfra.connectors.ssh import SSHConnector

    wrap_connection_methods(SSHConnector, ("run_shell_command", "put_file", "get_file"))
    # By module path: `pyinfra.api.operation` is also the name of the decorator.
    arguments, facts, operation = (
        importlib.import_module(f"pyinfra.api.{name}")
        for name in ("arguments", "facts", "operation")
    )
    vars(operation)["get_operation_order_from_stack"] = operation_order_from_frames
    if getattr(arguments.all_global_arguments, _WRAPPED, False):
        return
    names = tuple(arguments.all_global_arguments())

    def all_global_arguments() -> list[tuple[str, type]]:
        return list(names)

    setattr(all_global_arguments, _WRAPPED, True)
    for module in (arguments, facts):  # facts.py imported the name itself
        vars(module)["all_global_arguments"] = all_global_arguments
