"""The host scripts verify.py and prune.py on a temp directory tree and a stand-in systemd.

The fleet tests run the same files on real hosts under real systemd; here each branch of their
logic is driven on its own.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from gemma4_fleet.host_scripts import prune, smoke_check, verify
from gemma4_fleet.render import exec_start, systemd_escape

pytestmark = pytest.mark.unit
UNIT = "llama-server-x.service"
SMOKE = "llama-smoke-x.service"
HOSTILE = "x; whoami\n$HOME %h \"q\" 'q' \\"


class StandInSystemd(verify.Systemd):
    """Answers `systemctl show` from a table and records every other call."""

    def __init__(self, states: list[str] | None = None, smoke_ok: bool = True) -> None:
        self.states = states or ["activating"]
        self.smoke_ok = smoke_ok
        self.calls: list[tuple[str, ...]] = []

    def show(self, unit: str, prop: str) -> str:
        if prop == "NRestarts":
            return "0"
        return self.states.pop(0) if len(self.states) > 1 else self.states[0]

    def run(self, *args: str) -> bool:
        self.calls.append(args)
        return not (args[0] == "start" and not self.smoke_ok)

    def journal(self, unit: str) -> None:
        self.calls.append(("journal", unit))


@pytest.fixture
def units(tmp_path: Path) -> Path:
    (tmp_path / "system").mkdir()
    (tmp_path / "system" / UNIT).write_text("[Service]\nExecStart=/new\n")
    (tmp_path / "system" / SMOKE).write_text("[Service]\nExecStart=/smoke-new\n")
    return tmp_path


def _argv(root: Path, *extra: str) -> list[str]:
    return [
        "--unit",
        UNIT,
        "--health-url",
        "http://127.0.0.1:9/health",
        "--timeout",
        "5",
        "--lkg-dir",
        str(root / "lkg"),
        "--units-dir",
        str(root / "system"),
        *extra,
    ]


def _save_lkg(root: Path) -> None:
    (root / "lkg").mkdir()
    (root / "lkg" / UNIT).write_text("[Service]\nExecStart=/old\n")
    (root / "lkg" / SMOKE).write_text("[Service]\nExecStart=/smoke-old\n")


def test_accepted_unit_becomes_last_known_good(units: Path) -> None:
    systemd = StandInSystemd()
    code = verify.main(
        _argv(units, "--smoke-unit", SMOKE, "--report", "/nonexistent"),
        systemd,
        probe=lambda url: True,
        sleep=lambda s: None,
    )
    assert code == 0
    assert (units / "lkg" / UNIT).read_text() == "[Service]\nExecStart=/new\n"
    assert (units / "lkg" / SMOKE).read_text() == "[Service]\nExecStart=/smoke-new\n"
    assert systemd.calls == [("start", SMOKE)]


def test_unhealthy_unit_is_rolled_back(units: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _save_lkg(units)
    probes = iter([False, False, True])  # two failed waits for the new unit, then the old one
    systemd = StandInSystemd(states=["activating", "failed"])
    code = verify.main(
        _argv(units, "--smoke-unit", SMOKE), systemd, probe=lambda url: next(probes),
        sleep=lambda s: None,
    )  # fmt: skip
    assert code == 1
    assert (units / "system" / UNIT).read_text() == "[Service]\nExecStart=/old\n"
    assert (units / "system" / SMOKE).read_text() == "[Service]\nExecStart=/smoke-old\n"
    assert systemd.calls == [("journal", UNIT), ("daemon-reload",), ("restart", UNIT)]
    assert re.fullmatch(
        rf"{re.escape(UNIT)}: no /health 200 within 5 s \(failed\); "
        r"rolled back to last-known-good, serving again \d+\.\d s after the restart\n",
        capsys.readouterr().err,
    )


def test_failed_smoke_check_names_the_reports_reasons(
    units: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = smoke_check.Report(instance="x", url="http://127.0.0.1:8080", status="fail")
    report.reasons = ["tokens/s 3.1 below min_tps 50", "acceptance 0.10 below 0.5"]
    path = units / "x.json"
    path.write_text(json.dumps(smoke_check.report_to_dict(report)))
    systemd = StandInSystemd(smoke_ok=False)
    code = verify.main(
        _argv(units, "--smoke-unit", SMOKE, "--report", str(path)),
        systemd,
        probe=lambda url: True,
        sleep=lambda s: None,
    )
    assert code == 1
    assert capsys.readouterr().err == (
        f"{UNIT}: smoke check failed: tokens/s 3.1 below min_tps 50; acceptance 0.10 below 0.5; "
        "no last-known-good to roll back to\n"
    )
    assert not (units / "lkg").exists()


def test_a_live_unit_that_is_the_last_known_good_is_left_alone(
    units: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (units / "lkg").mkdir()
    (units / "lkg" / UNIT).write_bytes((units / "system" / UNIT).read_bytes())
    systemd = StandInSystemd(states=["inactive"])
    assert verify.main(_argv(units), systemd, probe=lambda url: False, sleep=lambda s: None) == 1
    assert systemd.calls == [("journal", UNIT)]
    assert capsys.readouterr().err.endswith("the live unit is the last-known-good one\n")


class _Health(BaseHTTPRequestHandler):
    codes: ClassVar[list[int]] = []

    def do_GET(self) -> None:
        self.send_response(self.codes.pop(0) if len(self.codes) > 1 else self.codes[0])
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/health"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_loading_503_is_waited_out_on_a_real_socket(health_server: str) -> None:
    _Health.codes = [503, 503, 200]
    waits: list[float] = []
    assert verify.healthy(StandInSystemd(), UNIT, health_server, 30, sleep=waits.append)
    assert waits == [1, 1]
    _Health.codes = [500]
    assert not verify.answers(health_server)
    assert not verify.answers("http://127.0.0.1:9/health")  # nothing listens on port 9


# --- prune ------------------------------------------------------------------------------------


def _owned(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / prune.MARKER).touch()
    (path / "t.gguf").write_bytes(b"GGUF")
    return path


def test_prune_removes_only_marked_unreferenced_dirs(tmp_path: Path) -> None:
    system, lkg = tmp_path / "system", tmp_path / "lkg"
    system.mkdir()
    lkg.mkdir()
    models, builds = tmp_path / "my models", tmp_path / "builds"
    live = _owned(models / "aaaa")
    saved = _owned(builds / "0c1e57098bba-11111111")
    unused = _owned(models / "bbbb")
    hostile = _owned(models / "c c'\"%$x")
    foreign = models / "not-ours"
    foreign.mkdir()
    argv = [f"{live}/t.gguf", "--model-draft", f"{hostile}/t.gguf"]
    (system / "llama-server-a.service").write_text(
        f"[Service]\nExecStart={exec_start(argv)}\nReadOnlyPaths={systemd_escape(str(models))}\n"
    )
    (system / "other.service").write_text(f"ExecStart={unused}/t.gguf\n")  # not ours: ignored
    (lkg / "llama-server-a.service").write_text(f"ExecStart={saved}/bin/llama-server\n")

    done = subprocess.run(
        [sys.executable, prune.__file__, "--units-dir", str(system), "--unit-glob",
         "llama-server-*.service", "--lkg-dir", str(lkg), str(builds), str(models)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert done.stdout == f"removed {unused}\n"
    assert sorted(p.name for p in models.iterdir()) == sorted(["aaaa", hostile.name, "not-ours"])
    assert saved.is_dir()


def test_a_hostile_path_is_found_in_every_unit_spelling() -> None:
    path = f"/m/{HOSTILE.replace(chr(10), '')}"
    for spelling in (exec_start([f"{path}/t.gguf"]), systemd_escape(f"{path}/t.gguf")):
        assert prune.referenced(path, spelling), spelling
    assert not prune.referenced(path, exec_start([f"{path}x/t.gguf"]))
    assert not prune.referenced("/m/a", "/m/ab/t.gguf")
