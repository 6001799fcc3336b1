"""The pyinfra patches keep pyinfra's results: a lost host fails alone, sockets send at once,
and operation order is the one pyinfra's own stack walk gives."""

from __future__ import annotations

import inspect
import socket
import sys
from types import SimpleNamespace
from typing import Any

import pytest

from gemma4_fleet.pyinfra_patches import (
    install,
    operation_order_from_frames,
    send_without_delay,
    wrap_connection_methods,
)

pytestmark = pytest.mark.unit


class Transport:
    def __init__(self, error: BaseException | None) -> None:
        self.error = error

    def run_shell_command(self, command: str, **kwargs: Any) -> tuple[bool, str]:
        if self.error is not None:
            raise self.error
        return True, command


def test_eof_becomes_connection_reset_and_other_errors_pass() -> None:
    wrap_connection_methods(Transport, ("run_shell_command",))
    wrap_connection_methods(Transport, ("run_shell_command",))  # idempotent
    assert Transport(None).run_shell_command("true") == (True, "true")
    with pytest.raises(ConnectionResetError, match="SSH connection lost") as lost:
        Transport(EOFError()).run_shell_command("true")
    assert isinstance(lost.value, OSError)  # what pyinfra's _run_host_op catches per host
    assert isinstance(lost.value.__cause__, EOFError)
    with pytest.raises(ValueError):
        Transport(ValueError("other")).run_shell_command("true")


def test_pyinfra_catches_oserror_per_host_and_the_ssh_connector_is_wrapped() -> None:
    from pyinfra.api import operations
    from pyinfra.connectors.ssh import SSHConnector

    # The premise: pyinfra fails one host on OSError from a command (not on EOFError).
    assert "except (TimeoutError, OSError, SSHException)" in inspect.getsource(operations)
    install()
    for name in ("run_shell_command", "put_file", "get_file"):
        assert getattr(getattr(SSHConnector, name), "_g4f_connection_wrapped", False)


def _connector(sock: Any) -> SimpleNamespace:
    transport = SimpleNamespace(sock=sock)
    return SimpleNamespace(client=SimpleNamespace(get_transport=lambda: transport))


def test_a_tcp_socket_gets_nodelay_and_anything_else_is_left_alone() -> None:
    left, right = socket.socketpair(socket.AF_UNIX)  # not TCP: setsockopt fails, ignored
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        assert tcp.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
        send_without_delay(_connector(tcp))
        assert tcp.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        send_without_delay(_connector(left))
        send_without_delay(_connector(object()))  # a ProxyCommand has no setsockopt
        send_without_delay(SimpleNamespace(client=None))  # not connected yet
    finally:
        for s in (left, right, tcp):
            s.close()


def _nested(depth: int, state: Any) -> tuple[list[int], list[int]]:
    """Both walks from the same frame: one line, so the caller's line number is the same."""
    if depth:
        return _nested(depth - 1, state)
    from pyinfra.api.util import get_operation_order_from_stack as pyinfras

    return pyinfras(state), operation_order_from_frames(state)


@pytest.mark.parametrize("deploy_file", [__file__, None, "/not/on/the/stack.py"])
@pytest.mark.parametrize("cli", [True, False])
def test_operation_order_matches_pyinfras_stack_walk(
    deploy_file: str | None, cli: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pyinfra

    monkeypatch.setattr(pyinfra, "is_cli", cli)
    state = SimpleNamespace(current_deploy_filename=deploy_file, current_op_file_number=7)
    theirs, ours = _nested(3, state)
    assert ours == theirs
    if deploy_file != "/not/on/the/stack.py":
        assert len(theirs) >= 4 + cli  # this file's nested frames are in it


def test_install_replaces_the_stack_walk_and_caches_argument_names() -> None:
    from pyinfra.api.arguments import AllArguments

    install()
    operation, facts, arguments = (
        sys.modules[f"pyinfra.api.{name}"] for name in ("operation", "facts", "arguments")
    )
    assert operation.get_operation_order_from_stack is operation_order_from_frames
    assert facts.all_global_arguments is arguments.all_global_arguments
    from typing import get_type_hints

    assert arguments.all_global_arguments() == list(get_type_hints(AllArguments).items())
