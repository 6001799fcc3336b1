"""What users see on a deployed fleet: the OpenAI client, the chat path, `status`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from openai import OpenAI

from gemma4_fleet.testfleet.hosts import Fleet
from tests.fleet.conftest import ROOT, PyinfraRun, http

pytestmark = pytest.mark.fleet
MODEL_ID = "gemma-3-270m"  # the target's name in the demo inventory: the default alias
UNIT = "llama-server-gemma3.service"
SMOKE = "llama-smoke-gemma3.service"
SMOKE_REPORT = "/var/lib/gemma4-fleet-smoke/gemma3.json"
# What a chat reply shows when the prompt format is not the model's (chatml on Gemma) or
# template tokens leak through.
GARBAGE = ("<|im_end|>", "<|im_start|>", "<start_of_turn>", "<end_of_turn>", "<eos>")
GEMMA4_FLEET = str(Path(sys.executable).with_name("gemma4-fleet"))


def client(fleet: Fleet, name: str) -> OpenAI:
    address = fleet.hosts[name].address
    return OpenAI(base_url=f"http://{address}:8080/v1", api_key="not-needed", timeout=300)


def status(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [GEMMA4_FLEET, "status", "inventories/local.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_v1_models_lists_the_alias(fleet: Fleet, deployed: PyinfraRun) -> None:
    for name in fleet.hosts:
        assert [m.id for m in client(fleet, name).models.list()] == [MODEL_ID]


def test_chat_reply_is_sensible(fleet: Fleet, deployed: PyinfraRun) -> None:
    """Gemma 3 270M is a small base model: asked "What is the capital of France?" cold, it
    rambles (greedy decoding: "What is the capital of France? mendatang"). Two earlier turns
    show it the pattern, as a chat user's history would, and the served template (`gemma`,
    turn by turn) carries them: it answers "Paris." first (then, being a base model, goes on
    until max_tokens; tried by hand on both releases, 2026-11-30)."""
    name = next(iter(fleet.hosts))
    reply = client(fleet, name).chat.completions.create(
        model=MODEL_ID,
        messages=[
            {"role": "user", "content": "What is the capital of Germany?"},
            {"role": "assistant", "content": "Berlin."},
            {"role": "user", "content": "What is the capital of Italy?"},
            {"role": "assistant", "content": "Rome."},
            {"role": "user", "content": "What is the capital of France?"},
        ],
        max_tokens=16,
        temperature=0,
    )
    text = reply.choices[0].message.content or ""
    assert re.search(r"\w", text), reply  # not empty, not just punctuation
    assert not [g for g in GARBAGE if g in text], text
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert text.lstrip().startswith("Paris"), text  # the answer, not a mention further on


def test_chat_stream(fleet: Fleet, deployed: PyinfraRun) -> None:
    name = next(iter(fleet.hosts))
    stream = client(fleet, name).chat.completions.create(
        model=MODEL_ID,
        messages=[{"role": "user", "content": "Name three colors."}],
        max_tokens=32,
        temperature=0,
        stream=True,
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    text = "".join(pieces)
    assert len([p for p in pieces if p]) > 3, pieces  # it streamed, in several pieces
    assert text.strip() and not [g for g in GARBAGE if g in text], text


def test_status_of_a_healthy_fleet(fleet: Fleet, deployed: PyinfraRun) -> None:
    # A fresh smoke report on every host first: status shows the last one, and tests before
    # this one (rollbacks in the same session) may have left a `fail`.
    for name in fleet.hosts:
        fleet.ssh(name, f"systemctl start {SMOKE}")
        report = json.loads(fleet.ssh(name, f"cat {SMOKE_REPORT}").stdout)
        assert report["status"] == "pass", report
    table = status()
    assert table.returncode == 0, table.stdout + table.stderr
    # SSH as the inventory says (host keys checked against the fleet's known_hosts): no
    # "No host key for ... found in known_hosts" warnings, nothing else either.
    assert table.stderr == "", table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:4] == ["host", "instance", "unit", "health"]
    for name in fleet.hosts:
        (row,) = [line.split() for line in lines if line.startswith(name)]
        assert row[1:5] == ["gemma3", "active", "200", MODEL_ID], row
        assert row[7] == "pass", row

    result = status("--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)["instances"]
    assert {row["host"] for row in rows} == set(fleet.hosts)
    for row in rows:
        assert row["ok"] and row["smoke"] == "pass" and row["health"] == 200
        assert row["tokens_per_second"] > 0
        assert row["model_path"].endswith(".gguf")
        assert row["build"].endswith(f"-{fleet.mirror_commit[:7]}")
        # the report of the smoke check run above, not an older one
        assert 0 <= row["smoke_age_seconds"] < 600


def test_status_of_a_stopped_instance_and_an_unreachable_host(
    fleet: Fleet, deployed: PyinfraRun
) -> None:
    first, second = sorted(fleet.hosts)
    fleet.ssh(first, f"systemctl stop {UNIT}")
    fleet.stop_host(second)
    try:
        table = status()
        result = status("--json", "--limit", f"{first},{second}")
    finally:
        fleet.start_host(second)
        fleet.ssh(first, f"systemctl start {UNIT}")
    assert table.returncode == 1, table.stdout + table.stderr
    (stopped,) = [line.split() for line in table.stdout.splitlines() if line.startswith(first)]
    assert stopped[1:4] == ["gemma3", "inactive", "down"], stopped
    (gone,) = [line for line in table.stdout.splitlines() if line.startswith(second)]
    assert "unreachable" in gone, table.stdout

    rows = {row["host"]: row for row in json.loads(result.stdout)["instances"]}
    assert rows[first]["active"] == "inactive" and rows[first]["health"] is None
    assert not rows[first]["ok"]
    assert rows[second]["reachable"] is False and "unreachable" in rows[second]["error"]

    # both come back by themselves (the unit is enabled), for the tests after this one
    deadline = time.monotonic() + 300
    for name in (first, second):
        while http_ok(fleet, name) is False:
            assert time.monotonic() < deadline, f"{name} did not come back"
            time.sleep(2)


def http_ok(fleet: Fleet, name: str) -> bool:
    try:
        return http(fleet, name, "/health").status_code == 200
    except OSError:
        return False
