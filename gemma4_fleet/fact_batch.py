"""Many fact reads in one round trip per host: a no-op converge is almost all fact reads.

pyinfra runs every fact read as its own SSH command, about 10 ms of CPU on the host and the
controller each, and a no-op converge of this deploy is ~25 of them per host. Instead, the facts
a host was asked last time are read in one command at the start of the run: each fact's own
command in a subshell, its output handed to its own `process()`. A value read that way answers
`host.get_fact` for the same fact and arguments until the first command of an operation runs
on that host; from then on every read goes to the host, as in plain pyinfra.

Which facts to read comes from the previous run of the same deploy on the same host
(`$G4F_CACHE/fact-reads/`, only the reads made before the host changed). A first run, a new
deploy or a fact whose read fails in the batch reads as plain pyinfra does: the batch can make a
run faster, never different.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import os
import secrets
import tempfile
import weakref
from pathlib import Path
from typing import Any

from paramiko import SSHException
from pyinfra.api import FactBase, State, StringCommand
from pyinfra.api.facts import _MISSING_COMMAND_MARKER
from pyinfra.api.host import Host
from pyinfra.api.state import StateStage

from gemma4_fleet.common import cache_dir

_WRAPPED = "_g4f_fact_batch"
# Where a remembered fact may come from (the record is a file: it names no other module).
FACT_MODULES = ("gemma4_fleet.", "pyinfra.facts.")
# The fact's `requires_command` is not on the host: pyinfra gives default() while preparing.
MISSING_COMMAND = object()


class _HostReads:
    """One host's batch: values read at the start, reads to remember, whether it changed."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self.asked: dict[str, tuple[str, dict[str, Any]]] = {}  # key -> (fact path, kwargs)
        self.changed = False


class _Run:
    """One pyinfra run of one deploy file."""

    def __init__(self, deploy: str) -> None:
        self.deploy = deploy
        self.hosts: dict[str, _HostReads] = {}


_runs: weakref.WeakKeyDictionary[State, _Run] = weakref.WeakKeyDictionary()


def _of(host: Host) -> _HostReads | None:
    """The host's batch, once the deploy has prefetched for this run (else plain pyinfra)."""
    run = _runs.get(host.state)
    return None if run is None else run.hosts.setdefault(host.name, _HostReads())


def batchable(cls: Any, kwargs: dict[str, Any]) -> bool:
    """A plain fact (one command, no preconditions, the default shell) with JSON arguments."""
    if not (isinstance(cls, type) and issubclass(cls, FactBase)):
        return False
    if getattr(cls, "check_preconditions", None) is not FactBase.check_preconditions:
        return False
    if getattr(cls, "shell_executable", None):
        return False
    if any(name.startswith("_") for name in kwargs):  # global arguments (_sudo, ...)
        return False
    try:
        json.dumps(kwargs)
    except (TypeError, ValueError):
        return False
    return True


def read_key(cls: type, kwargs: dict[str, Any]) -> str:
    return json.dumps([f"{cls.__module__}:{cls.__qualname__}", kwargs], sort_keys=True)


def _plain_connection(host: Host) -> bool:
    """The current operation runs its commands as the SSH user (no sudo/su/doas/env/chdir)."""
    args = host.current_op_global_arguments or {}
    return not any(
        args.get(name) for name in ("_sudo", "_su_user", "_doas", "_chdir", "_env", "_sudo_user")
    )


def _fact_command(fact: FactBase[Any], kwargs: dict[str, Any]) -> StringCommand:
    """The fact's command as pyinfra's get_fact builds it (with its `requires_command` guard)."""
    command = fact.command(**kwargs) if callable(fact.command) else fact.command
    required = fact.requires_command(**kwargs)
    if not required:
        return StringCommand(command)
    return StringCommand(
        *("if", "command", "-v", required, ">/dev/null", "2>&1;", "then", "(", command, ");"),
        *("else", "echo", f"'{_MISSING_COMMAND_MARKER}';", "fi"),
    )


def _takes(fact: FactBase[Any], kwargs: dict[str, Any]) -> bool:
    """Whether the fact builds its command from these arguments (a record written by an older
    version may name arguments the fact no longer takes)."""
    try:
        _fact_command(fact, kwargs)
    except (TypeError, ValueError, KeyError):
        return False
    return True


def batch_command(reads: list[tuple[FactBase[Any], dict[str, Any]]], mark: str) -> StringCommand:
    """Each fact's command in its own subshell (a `cd` or `exit` stays there), then a line
    `<mark> <index> <exit status>`; stderr is dropped (pyinfra processes stdout only)."""
    parts: list[Any] = []
    for index, (fact, kwargs) in enumerate(reads):
        parts += ["(", _fact_command(fact, kwargs), "\n)", "2>/dev/null;"]
        parts += ["printf", f"'\\n{mark} {index} %s\\n'", '"$?";']
    return StringCommand(*parts)


def parse_batch(
    lines: list[str], reads: list[tuple[FactBase[Any], dict[str, Any]]], mark: str
) -> dict[int, Any]:
    """index -> value for each fact whose command succeeded and whose output processed, or
    MISSING_COMMAND; the others (failed, unprocessable) are left to a real read."""
    values: dict[int, Any] = {}
    section: list[str] = []
    for line in lines:
        if not line.startswith(f"{mark} "):
            section.append(line)
            continue
        _, index_text, status = line.split(" ")
        if section and section[-1] == "":
            section.pop()  # the newline printed before the mark
        index = int(index_text)
        fact = reads[index][0]
        if status == "0" and section == [_MISSING_COMMAND_MARKER]:
            values[index] = MISSING_COMMAND
        elif status == "0":
            with contextlib.suppress(Exception):  # pyinfra's own read reports it properly
                values[index] = fact.process(section) if section else fact.default()
        section = []
    return values


def prefetch(host: Host, deploy: str) -> None:
    """Read, in one command, the facts this deploy asked of this host last time (a failed
    batch leaves every read to pyinfra, which reports a lost host as usual)."""
    run = _runs.setdefault(host.state, _Run(Path(deploy).stem))
    reads: list[tuple[FactBase[Any], dict[str, Any]]] = []
    for path, kwargs in _remembered(run.deploy, host.name):
        module, _, name = path.partition(":")
        if not module.startswith(FACT_MODULES):
            continue
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
        if batchable(cls, kwargs) and _takes(fact := cls(), kwargs):
            reads.append((fact, kwargs))
    if not reads:
        return
    mark = f"G4F-FACT-{secrets.token_hex(8)}"
    state = host.state
    try:
        status, output = host.run_shell_command(
            batch_command(reads, mark),
            print_output=state.print_fact_output,
            print_input=state.print_fact_input,
        )
    except (OSError, TimeoutError, SSHException):
        return
    values = run.hosts.setdefault(host.name, _HostReads()).values
    for index, value in parse_batch(output.stdout_lines, reads, mark).items() if status else ():
        fact, kwargs = reads[index]
        values[read_key(type(fact), kwargs)] = value


def get_fact(host: Host, cls: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Host.get_fact, answered from the batch while the host is unchanged."""
    reads = _of(host)
    if (
        reads is None
        or reads.changed
        or args
        or not _plain_connection(host)
        or not batchable(cls, kwargs)
    ):
        return _PYINFRA_GET_FACT(host, cls, *args, **kwargs)
    key = read_key(cls, kwargs)
    reads.asked[key] = (f"{cls.__module__}:{cls.__qualname__}", kwargs)
    value = reads.values.get(key, None)
    if value is MISSING_COMMAND and host.state.current_stage != StateStage.Execute:
        return cls().default()
    if key in reads.values and value is not MISSING_COMMAND:
        return value
    return _PYINFRA_GET_FACT(host, cls, *args, **kwargs)


def host_changed(host: Host) -> None:
    """An operation runs a command on the host: its batch no longer describes it."""
    reads = _of(host)
    if reads is not None:
        reads.changed = True


# --- what to read: the previous run's reads, per deploy and host ---------------------------------


def _record_path(deploy: str, host_name: str) -> Path:
    return cache_dir() / "fact-reads" / Path(deploy).stem / f"{host_name}.json"


def _remembered(deploy: str, host_name: str) -> list[tuple[str, dict[str, Any]]]:
    try:
        data = json.loads(_record_path(deploy, host_name).read_text())
        return [(str(path), dict(kwargs)) for path, kwargs in data]
    except (OSError, ValueError, TypeError):
        return []


def remember() -> None:
    """Save each host's reads made before it changed (atomically: a cut run leaves the old)."""
    for run in list(_runs.values()):
        for name, reads in run.hosts.items():
            if not reads.asked:
                continue
            try:
                path = _record_path(run.deploy, name)
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{name}.")
                with os.fdopen(fd, "w") as fh:
                    json.dump(list(reads.asked.values()), fh)
                os.replace(tmp, path)
            except OSError:  # a full or read-only cache: the next run reads as plain pyinfra
                continue


# --- hooks into pyinfra --------------------------------------------------------------------------

_PYINFRA_GET_FACT = Host.get_fact


def install() -> None:
    """Serve Host.get_fact from the batch; mark a host changed when an operation runs a command
    on it; save this run's reads when the process ends. Idempotent."""
    from pyinfra.api import command

    if not getattr(Host.get_fact, _WRAPPED, False):

        def hooked_get_fact(self: Host, name_or_cls: Any, *args: Any, **kwargs: Any) -> Any:
            return get_fact(self, name_or_cls, args, kwargs)

        setattr(hooked_get_fact, _WRAPPED, True)
        Host.get_fact = hooked_get_fact
        for cls in (
            command.StringCommand,
            command.FileUploadCommand,
            command.FileDownloadCommand,
            command.FunctionCommand,
            command.RsyncCommand,
        ):
            _mark_on_execute(cls)
        atexit.register(remember)


def _mark_on_execute(cls: type) -> None:
    original = cls.execute  # type: ignore[attr-defined]

    def execute(self: Any, state: State, host: Host, connector_arguments: Any) -> Any:
        host_changed(host)
        return original(self, state, host, connector_arguments)

    cls.execute = execute  # type: ignore[attr-defined]
