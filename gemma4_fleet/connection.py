"""A host whose SSH connection drops mid-run fails alone; the other hosts finish.

pyinfra treats OSError from a command as that host's failure, but paramiko reports a transport
that died under it (a host powered off, a cable pulled) as EOFError, which pyinfra does not catch:
the whole run stops with a traceback for every host (pyinfra issue #1220). The deploys re-raise it
as ConnectionResetError, an OSError, so only the lost host is marked failed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

_WRAPPED = "_g4f_connection_lost_is_oserror"


def connection_lost_fails_the_host(cls: type, methods: tuple[str, ...]) -> None:
    """Make `methods` of `cls` raise ConnectionResetError where paramiko raises EOFError."""
    for name in methods:
        original: Callable[..., Any] = getattr(cls, name)
        if getattr(original, _WRAPPED, False):
            continue

        @functools.wraps(original)
        def wrapper(self: Any, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
            try:
                return _original(self, *args, **kwargs)
            except EOFError as exc:
                raise ConnectionResetError("SSH connection lost (host down?)") from exc

        setattr(wrapper, _WRAPPED, True)
        setattr(cls, name, wrapper)


def install() -> None:
    """Apply it to pyinfra's SSH connector (idempotent)."""
    from pyinfra.connectors.ssh import SSHConnector

    connection_lost_fails_the_host(SSHConnector, ("run_shell_command", "put_file", "get_file"))
