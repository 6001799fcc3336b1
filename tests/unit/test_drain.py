"""Unit tests for gemma4_fleet/host_scripts/drain.py (the stdlib-only drain before a restart).

/slots replies are the recorded ones in data/smoke/ (CPU llama-server at 0c1e570).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gemma4_fleet.host_scripts import drain as dr
from tests.unit.conftest import StandIn, import_roots

pytestmark = pytest.mark.unit
DATA = Path(__file__).parent / "data" / "smoke"
IDLE = (DATA / "slots_idle.json").read_bytes()
BUSY = (DATA / "slots_busy.json").read_bytes()


def test_the_script_uses_the_standard_library_only() -> None:
    modules = import_roots(Path(dr.__file__))
    assert modules <= set(sys.stdlib_module_names) | {"__future__"}, modules


def test_busy_slots_of_recorded_replies() -> None:
    assert dr.busy_slots(json.loads(IDLE)) == []
    assert dr.busy_slots(json.loads(BUSY)) == [dr.Busy(slot=0, task=2, decoded=0)]
    assert dr.busy_slots({"error": "x"}) is None
    assert dr.busy_slots([1, 2]) is None


def test_processing_from_metrics() -> None:
    text = "# HELP x\nllamacpp:requests_processing 2\nllamacpp:requests_deferred 0\n"
    assert dr.processing_from_metrics(text) == 2
    assert dr.processing_from_metrics("other 1\n") is None


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def scripted(replies: list[tuple[int, bytes]]) -> dr.Fetch:
    calls = iter(replies)

    def fetch(path: str) -> tuple[int, bytes]:
        return next(calls)

    return fetch


def run_drain(replies: list[tuple[int, bytes]], timeout: float = 10) -> tuple[bool, list[str]]:
    lines: list[str] = []
    clock = Clock()
    ok = dr.drain(
        "u", scripted(replies), timeout, 1.0, clock=clock, sleep=clock.sleep, say=lines.append
    )
    return ok, lines


def test_an_idle_server_is_not_waited_for() -> None:
    assert run_drain([(200, IDLE)]) == (True, ["u: idle, nothing to wait for"])


def test_waits_until_the_busy_slot_finishes_and_says_for_what() -> None:
    ok, lines = run_drain([(200, BUSY), (200, BUSY), (200, BUSY), (200, IDLE)])
    assert ok
    assert lines == [
        "u: waiting up to 10 s for slot 0 (task 2, 0 tokens so far)",
        "u: drained after 3.0 s (waited for task 2 on slot 0)",
    ]


def test_gives_up_after_the_timeout_and_says_so() -> None:
    ok, lines = run_drain([(200, BUSY)] * 20, timeout=3)
    assert not ok
    assert lines[-1] == "u: still busy after 3 s (slot 0 (task 2, 0 tokens so far)); going ahead"


def test_nothing_to_wait_for_when_slots_cannot_be_seen() -> None:
    assert run_drain([(401, b"{}")])[1] == [
        "u: /slots answered 401 (no usable API key); nothing to wait for"
    ]
    assert run_drain([(503, b"{}")])[1] == ["u: still loading its model (503); nothing to wait for"]


def test_falls_back_to_metrics_when_slots_are_off() -> None:
    ok, lines = run_drain(
        [
            (501, b"{}"),
            (200, b"llamacpp:requests_processing 1\n"),
            (501, b"{}"),
            (200, b"llamacpp:requests_processing 0\n"),
        ]
    )
    assert ok and lines[-1] == "u: drained after 1.0 s (waited for slot 0)"


def test_read_key_skips_comments_and_unreadable_files(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("# rotated 2026-11\n\nsecret-1\nsecret-2\n")
    assert dr.read_key([str(tmp_path / "missing"), str(key)]) == "secret-1"
    assert dr.read_key([str(tmp_path / "missing")]) is None


def test_http_fetch_sends_the_key(stand_in: StandIn) -> None:
    stand_in.bodies += [BUSY, IDLE]
    lines: list[str] = []
    fetch = dr.http_fetch(stand_in.url, "k3y")
    assert dr.drain("u", fetch, 5, 0.05, say=lines.append)
    assert lines[-1].startswith("u: drained after ")
    assert set(stand_in.auth) == {"Bearer k3y"}


def test_the_script_runs_as_a_file_and_reports_a_down_unit(tmp_path: Path) -> None:
    # On a machine without this unit, systemctl says inactive (or is missing): nothing to drain.
    result = subprocess.run(
        [
            sys.executable,
            dr.__file__,
            "--url",
            "http://127.0.0.1:9",
            "--unit",
            "g4f-nope.service",
            "--timeout",
            "1",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "g4f-nope.service: not running, nothing to wait for"
