"""Facts read in one batch give what each read alone gives, and serve reads only while the host
is unchanged. The batch runs in a real `sh`, as on a host; expected values come from running
each fact's own command alone and its own process()."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pyinfra.api import FactBase, StringCommand
from pyinfra.api.state import StateStage
from pyinfra.connectors.util import CommandOutput, OutputLine
from pyinfra.facts.server import LinuxDistribution

from gemma4_fleet import fact_batch
from gemma4_fleet.facts import FileDigests, NvidiaGpus

pytestmark = pytest.mark.unit


class Lines(FactBase[list[str]]):
    """Prints `text` as is (no newline added): the batch must not join it with its mark."""

    def command(self, text: str) -> StringCommand:
        return StringCommand("printf", "%s", shlex.quote(text))

    def process(self, output: list[str]) -> list[str]:
        return output


class Fails(FactBase[str]):
    def command(self) -> str:
        return "echo partial; exit 3"


class Relative(FactBase[str]):
    """Reads a relative path: a `cd` in an earlier fact must not move it."""

    def command(self, relative: str) -> StringCommand:
        return StringCommand("cat", shlex.quote(relative))

    def process(self, output: list[str]) -> str:
        return "\n".join(output)


def sh(command: str, cwd: Path) -> CommandOutput:
    done = subprocess.run(["sh", "-c", command], cwd=cwd, capture_output=True, text=True)
    lines = done.stdout.split("\n")
    if lines[-1] == "":
        lines.pop()  # as pyinfra reads it: one line per newline, none for no output
    return CommandOutput([OutputLine("stdout", line) for line in lines])


def alone(fact: FactBase[Any], kwargs: dict[str, Any], cwd: Path) -> Any:
    """The fact read by itself (its command with pyinfra's guard, its process())."""
    out = sh(fact_batch._fact_command(fact, kwargs).get_raw_value(), cwd).stdout_lines
    return fact.process(out) if out else fact.default()


def test_each_fact_in_the_batch_reads_as_it_reads_alone(tmp_path: Path) -> None:
    (tmp_path / "unit").write_text("a\n")
    (tmp_path / "note").write_text("relative\n")
    reads: list[tuple[FactBase[Any], dict[str, Any]]] = [
        (LinuxDistribution(), {}),  # cd /etc inside
        (Relative(), {"relative": "note"}),
        (FileDigests(), {"paths": [str(tmp_path / "unit"), str(tmp_path / "none")]}),
        (Lines(), {"text": "no newline at the end"}),
        (Lines(), {"text": "blank line kept\n\n"}),
        (Lines(), {"text": ""}),
    ]
    values = fact_batch.parse_batch(
        sh(fact_batch.batch_command(reads, "MARK").get_raw_value(), tmp_path).stdout_lines,
        reads,
        "MARK",
    )
    assert sorted(values) == list(range(len(reads)))
    for index, (fact, kwargs) in enumerate(reads):
        assert values[index] == alone(fact, kwargs, tmp_path), type(fact).__name__
    assert values[1] == "relative"
    assert values[3] == ["no newline at the end"]
    assert values[4] == ["blank line kept", ""]


def test_a_failed_read_is_left_to_pyinfra_and_a_missing_binary_is_marked(tmp_path: Path) -> None:
    reads: list[tuple[FactBase[Any], dict[str, Any]]] = [
        (Fails(), {}),
        (Lines(), {"text": "after"}),
    ]
    if not shutil.which("nvidia-smi"):
        reads.append((NvidiaGpus(), {}))
    command = fact_batch.batch_command(reads, "MARK").get_raw_value()
    values = fact_batch.parse_batch(sh(command, tmp_path).stdout_lines, reads, "MARK")
    assert 0 not in values  # pyinfra reads it again and reports the failure itself
    assert values[1] == ["after"]
    if len(reads) == 3:
        assert values[2] is fact_batch.MISSING_COMMAND


@pytest.mark.parametrize(
    ("cls", "kwargs", "ok"),
    [
        (FileDigests, {"paths": ["/a"]}, True),
        (FileDigests, {"paths": ["/a"], "_sudo": True}, False),  # a global argument
        (FileDigests, {"paths": [object()]}, False),  # not JSON
        (str, {}, False),  # not a fact
    ],
)
def test_batchable(cls: Any, kwargs: dict[str, Any], ok: bool) -> None:
    assert fact_batch.batchable(cls, kwargs) is ok


class RunState(SimpleNamespace):
    """What prefetch needs of a pyinfra State (a weak-referenceable key, as State is)."""

    __hash__ = object.__hash__


class LocalHost:
    """A host whose commands run in a local sh (enough for prefetch), with real reads counted."""

    def __init__(self, state: Any, cwd: Path) -> None:
        self.state, self.name, self.cwd = state, "box1", cwd
        self.current_op_global_arguments: dict[str, Any] = {}

    def run_shell_command(self, command: StringCommand, **kwargs: Any) -> tuple[bool, Any]:
        return True, sh(command.get_raw_value(), self.cwd)


def test_reads_are_served_until_the_host_changes_and_remembered_for_next_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("G4F_CACHE", str(tmp_path / "cache"))
    real: list[tuple[str, dict[str, Any]]] = []

    def pyinfra_read(host: Any, cls: Any, *args: Any, **kwargs: Any) -> Any:
        real.append((cls.__name__, kwargs))
        return ["read from the host"]

    monkeypatch.setattr(fact_batch, "_PYINFRA_GET_FACT", pyinfra_read)
    monkeypatch.setattr(fact_batch, "FACT_MODULES", (__name__,))  # this file's facts
    state = RunState(
        current_stage=StateStage.Prepare, print_fact_output=False, print_fact_input=False
    )
    (tmp_path / "cache").mkdir()
    host: Any = LocalHost(state, tmp_path)

    # First run: nothing remembered, so every read goes to the host; the reads are remembered.
    fact_batch.prefetch(host, "deploys/job.py")
    assert fact_batch.get_fact(host, Lines, (), {"text": "x"}) == ["read from the host"]
    fact_batch.get_fact(host, Lines, (), {"text": "y"})
    fact_batch.remember()
    saved = json.loads((tmp_path / "cache/fact-reads/job/box1.json").read_text())
    assert saved == [[f"{__name__}:Lines", {"text": "x"}], [f"{__name__}:Lines", {"text": "y"}]]

    # Next run: both in one command, served without a real read until the host changes.
    state2 = RunState(**vars(state))
    host2: Any = LocalHost(state2, tmp_path)
    real.clear()
    fact_batch.prefetch(host2, "deploys/job.py")
    assert fact_batch.get_fact(host2, Lines, (), {"text": "x"}) == ["x"]
    assert real == []
    host2.current_op_global_arguments = {"_sudo": True}  # another user: a real read
    assert fact_batch.get_fact(host2, Lines, (), {"text": "x"}) == ["read from the host"]
    host2.current_op_global_arguments = {}
    fact_batch.host_changed(host2)
    assert fact_batch.get_fact(host2, Lines, (), {"text": "y"}) == ["read from the host"]
    assert real == [("Lines", {"text": "x"}), ("Lines", {"text": "y"})]


def test_a_remembered_read_the_fact_no_longer_takes_is_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A record written by an older version (here: an argument Lines does not take) must not
    stop the run: that read is left out of the batch, the others are served."""
    monkeypatch.setenv("G4F_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fact_batch, "FACT_MODULES", (__name__,))
    record = tmp_path / "cache/fact-reads/job/box1.json"
    record.parent.mkdir(parents=True)
    lines = f"{__name__}:Lines"
    record.write_text(json.dumps([[lines, {"text": "x"}], [lines, {"packages": ["a"]}]]))
    state = RunState(
        current_stage=StateStage.Prepare, print_fact_output=False, print_fact_input=False
    )
    host: Any = LocalHost(state, tmp_path)
    fact_batch.prefetch(host, "deploys/job.py")
    monkeypatch.setattr(fact_batch, "_PYINFRA_GET_FACT", lambda *a, **k: ["read from the host"])
    assert fact_batch.get_fact(host, Lines, (), {"text": "x"}) == ["x"]


def test_without_a_prefetch_every_read_is_pyinfras(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(
        fact_batch, "_PYINFRA_GET_FACT", lambda host, cls, *a, **k: calls.append(cls.__name__)
    )
    host: Any = LocalHost(RunState(), tmp_path)
    fact_batch.get_fact(host, Lines, (), {"text": "x"})
    fact_batch.host_changed(host)  # nothing to mark
    assert calls == ["Lines"]


def test_an_executed_command_marks_its_host_changed(monkeypatch: pytest.MonkeyPatch) -> None:
    marked: list[str] = []
    monkeypatch.setattr(fact_batch, "host_changed", lambda host: marked.append(host.name))

    class Command:
        def execute(self, state: Any, host: Any, connector_arguments: Any) -> str:
            return f"ran on {host.name}"

    fact_batch._mark_on_execute(Command)
    assert Command().execute(None, SimpleNamespace(name="box1"), {}) == "ran on box1"
    assert marked == ["box1"]


def test_install_hooks_pyinfra_once() -> None:
    from pyinfra.api import command
    from pyinfra.api.host import Host

    fact_batch.install()
    hooked = (Host.get_fact, command.StringCommand.execute)
    fact_batch.install()
    assert (Host.get_fact, command.StringCommand.execute) == hooked
    assert getattr(Host.get_fact, "_g4f_fact_batch", False)
