"""A dropped SSH transport (paramiko EOFError) becomes an OSError: pyinfra fails that host alone."""

from __future__ import annotations

from typing import Any

import pytest

from gemma4_fleet.connection import connection_lost_fails_the_host, install

pytestmark = pytest.mark.unit


class Transport:
    def __init__(self, error: BaseException | None) -> None:
        self.error = error

    def run_shell_command(self, command: str, **kwargs: Any) -> tuple[bool, str]:
        if self.error is not None:
            raise self.error
        return True, command


def test_eof_becomes_connection_reset_and_other_errors_pass() -> None:
    connection_lost_fails_the_host(Transport, ("run_shell_command",))
    connection_lost_fails_the_host(Transport, ("run_shell_command",))  # idempotent
    assert Transport(None).run_shell_command("true") == (True, "true")
    with pytest.raises(ConnectionResetError, match="SSH connection lost") as lost:
        Transport(EOFError()).run_shell_command("true")
    assert isinstance(lost.value, OSError)  # what pyinfra's _run_host_op catches per host
    assert isinstance(lost.value.__cause__, EOFError)
    with pytest.raises(ValueError):
        Transport(ValueError("other")).run_shell_command("true")


def test_pyinfra_catches_oserror_per_host_and_the_ssh_connector_is_wrapped() -> None:
    import inspect

    from pyinfra.api import operations
    from pyinfra.connectors.ssh import SSHConnector

    # The premise: pyinfra fails one host on OSError from a command (not on EOFError).
    assert "except (TimeoutError, OSError, SSHException)" in inspect.getsource(operations)
    install()
    for name in ("run_shell_command", "put_file", "get_file"):
        assert getattr(getattr(SSHConnector, name), "_g4f_connection_lost_is_oserror", False)
