"""Progress lines for long host commands (CUDA builds, model downloads) in pyinfra's output.

pyinfra shows a command's output only when it has ended (live only with `-vvv`), so a
20-minute build would print nothing. `run_with_progress` runs the command as usual and, while it
runs, reads the command's own log on the host every `interval` seconds over a second channel of
the same connection, and logs one line per look: ninja's `[n/m]` step or curl's progress meter,
turned into a percent. Nothing is printed when nothing moved.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any

import gevent
from pyinfra import logger
from pyinfra.api import FunctionCommand, QuoteString, StringCommand

# Seconds between two progress lines (G4F_PROGRESS_INTERVAL overrides it, e.g. in tests).
DEFAULT_INTERVAL_S = 20.0
# How much of the log's end is read per look: a few ninja lines or curl meter updates.
_TAIL_BYTES = 4096

_NINJA_STEP = re.compile(r"^\[(\d+)/(\d+)\]", re.MULTILINE)
# curl's meter: % Total % Received % Xferd Dload Upload Total Spent Left Current
_CURL_METER = re.compile(
    r"^\s*(\d{1,3})\s+(\S+)\s+\d{1,3}\s+(\S+)\s+\d{1,3}\s+\S+\s+(\S+)\s+\S+\s+"
    r"(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s*$"
)


def interval_s() -> float:
    try:
        return max(1.0, float(os.environ.get("G4F_PROGRESS_INTERVAL", DEFAULT_INTERVAL_S)))
    except ValueError:
        return DEFAULT_INTERVAL_S


def ninja_progress(log_tail: str) -> str | None:
    """`[n/m]` of ninja's last step as "step n/m (p%)"; None before ninja started."""
    steps = _NINJA_STEP.findall(log_tail)
    if not steps:
        return None
    done, total = (int(x) for x in steps[-1])
    percent = 100 * done // total if total else 0
    return f"step {done}/{total} ({percent}%)"


def curl_progress(meter: str) -> str | None:
    """curl's last progress-meter update (they are separated by CR) as "p% of SIZE (...)"."""
    updates = [u for u in re.split(r"[\r\n]+", meter) if u.strip()]
    for update in reversed(updates):
        match = _CURL_METER.match(update)
        if match is None:
            continue
        percent, total, received, speed, _total_t, _spent, left, _current = match.groups()
        if total == "0":  # size not known (yet): bytes only
            return f"{received}B received ({speed}B/s)"
        eta = "" if left.startswith("-") else f", {left} left"
        return f"{percent}% of {total}B ({received}B, {speed}B/s{eta})"
    return None


Parser = Callable[[str], str | None]


def _look(host: Any, log_path: str, connector_arguments: dict[str, Any]) -> str:
    """The end of the log on the host ("" when it is not there yet)."""
    ok, output = host.run_shell_command(
        StringCommand("tail", "-c", str(_TAIL_BYTES), QuoteString(log_path), "2>/dev/null"),
        print_output=False,
        print_input=False,
        **connector_arguments,
    )
    return "\n".join(output.stdout_lines) if ok else ""


class ProgressCommand(FunctionCommand):
    """Executed like a StringCommand (same connector arguments: _sudo, _timeout, ...)."""

    def __init__(self, command: StringCommand, what: str, log_path: str, parse: Parser) -> None:
        super().__init__(_run, (command, what, log_path, parse), {})
        self.command = command
        self.what = what
        self.log_path = log_path

    def execute(self, state: Any, host: Any, connector_arguments: dict[str, Any]) -> bool:
        return _run(state, host, dict(connector_arguments), *self.args)


def _run(
    state: Any,
    host: Any,
    connector_arguments: dict[str, Any],
    command: StringCommand,
    what: str,
    log_path: str,
    parse: Parser,
) -> bool:
    runner = gevent.spawn(
        host.run_shell_command,
        command,
        print_output=state.print_output,
        print_input=state.print_input,
        **connector_arguments,
    )
    every = interval_s()
    last = None
    while True:
        runner.join(timeout=every)
        if runner.ready():
            break
        line = parse(_look(host, log_path, connector_arguments))
        if line is not None and line != last:
            host.log_styled(f"{what}: {line}", log_func=logger.info)
            last = line
    ok, output = runner.get()
    if not ok:
        for line in output.stdout_lines + output.stderr_lines:
            host.log_styled(line, fg="red", log_func=logger.error)
    return bool(ok)


def with_progress(
    command: StringCommand, what: str, log_path: str, parse: Parser
) -> ProgressCommand:
    """`command`, run by pyinfra as usual, with a progress line about every `interval_s()`.

    + what: what is running ("llama.cpp build 0c1e57098bba-1a2b3c4d")
    + log_path: the file on the host the command writes its progress to
    + parse: the log's end -> a short progress text, or None when there is none yet
    """
    return ProgressCommand(command, what, log_path, parse)
