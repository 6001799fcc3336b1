"""Smoke checks after deploys and on a timer, Prometheus textfiles, and automatic rollback."""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from gemma4_fleet.host_scripts.smoke_check import Report, load_report, report_from_dict
from gemma4_fleet.testfleet.hosts import Fleet
from tests.fleet.conftest import ROOT, PyinfraRun, data_arg, run_pyinfra
from tests.fleet.test_deploy import UNIT, unit_state

pytestmark = pytest.mark.fleet
SMOKE = "llama-smoke-gemma3"
PROM = "/var/lib/gemma4-fleet-smoke/gemma3.prom"
REPORT = "/var/lib/gemma4-fleet-smoke/gemma3.json"
METRICS = {
    "gemma4_smoke_tokens_per_second",
    "gemma4_smoke_acceptance_ratio",
    "gemma4_smoke_acceptance_ratio_by_position",
    "gemma4_smoke_healthy",
    "gemma4_smoke_passed",
    "gemma4_smoke_skipped",
    "gemma4_smoke_build_info",
    "gemma4_smoke_duration_seconds",
    "gemma4_smoke_last_run_timestamp_seconds",
}


def prom_families(fleet: Fleet, name: str) -> dict[str, Any]:
    text = fleet.ssh(name, f"cat {PROM}").stdout
    return {family.name: family for family in text_string_to_metric_families(text)}


def report(fleet: Fleet, name: str) -> Report:
    return report_from_dict(json.loads(fleet.ssh(name, f"cat {REPORT}").stdout))


def test_deploy_prints_the_fleet_table_and_collects_reports(
    fleet: Fleet, deployed: PyinfraRun
) -> None:
    assert "Fleet smoke table" in deployed.output
    for name in fleet.hosts:
        line = next(row for row in deployed.output.splitlines() if row.strip().startswith(name))
        assert "llama-server-gemma3" in line and "gemma-3-270m-q4_k_m.gguf" in line
        assert line.split()[-1] == "pass" and " 200 " in line
        collected = load_report(str(ROOT / "out" / "smoke" / name / "gemma3.json"))
        assert collected.status == "pass"
        assert (collected.build_info or "").endswith(fleet.mirror_commit[:7])
        assert (collected.tokens_per_second or 0) > 0
        assert 0 < (collected.acceptance or 0) <= 1
        families = prom_families(fleet, name)
        assert set(families) >= METRICS
        passed = families["gemma4_smoke_passed"].samples[0]
        assert passed.labels == {"instance_name": "gemma3"} and passed.value == 1
        build = families["gemma4_smoke_build_info"].samples[0].labels
        assert build["commit"].startswith(fleet.mirror_commit[:7])


def test_timer_is_installed_and_its_service_writes_fresh_metrics(
    fleet: Fleet, deployed: PyinfraRun
) -> None:
    name = "g4f-node1"
    assert fleet.ssh(name, f"systemctl is-enabled {SMOKE}.timer").stdout.strip() == "enabled"
    assert fleet.ssh(name, f"systemctl is-active {SMOKE}.timer").stdout.strip() == "active"
    before = prom_families(fleet, name)["gemma4_smoke_last_run_timestamp_seconds"].samples[0]
    time.sleep(1.1)
    fleet.ssh(name, f"systemctl start {SMOKE}.service")
    after = prom_families(fleet, name)["gemma4_smoke_last_run_timestamp_seconds"].samples[0]
    assert after.value > before.value
    user = fleet.ssh(name, f"systemctl show -p User {SMOKE}.service").stdout
    assert user.strip() == "User=llama"
    assert fleet.ssh(name, f"stat -c %a {PROM}").stdout.strip() == "644"


def test_a_busy_slot_is_skipped_not_queued(fleet: Fleet, deployed: PyinfraRun) -> None:
    name = "g4f-node2"
    address = fleet.hosts[name].address
    streaming = requests.post(
        f"http://{address}:8080/completion",
        stream=True,
        timeout=300,
        json={"prompt": "Count from one to one thousand:", "n_predict": 2000, "stream": True},
    )
    stop = threading.Event()

    def drain() -> None:
        with contextlib.suppress(requests.RequestException, AttributeError, ValueError):
            for _ in streaming.iter_lines():
                if stop.is_set():
                    break

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        time.sleep(2)
        result = fleet.ssh(name, f"systemctl start {SMOKE}.service", check=False)
        assert result.returncode == 0, result.stderr
        skipped = report(fleet, name)
        assert skipped.status == "skipped"
        assert skipped.reasons == ["busy"]
        assert prom_families(fleet, name)["gemma4_smoke_skipped"].samples[0].value == 1
    finally:
        stop.set()
        streaming.close()


@pytest.mark.usefixtures("demo_restored")
def test_impossible_min_tps_rolls_back_to_the_previous_unit(
    fleet: Fleet, deployed: PyinfraRun
) -> None:
    before = {name: unit_state(fleet, name) for name in fleet.hosts}
    run = run_pyinfra(
        "deploys/gemma4_mtp.py",
        *data_arg("llama_server", {"draft_p_min": 0.25}),
        *data_arg("llama_smoke", {"min_tps": 1000000}),
    )
    assert run.returncode != 0
    for name in fleet.hosts:
        assert f"[{name}] {UNIT}: smoke check failed: throughput" in run.output
        assert "rolled back to last-known-good, serving again" in run.output
        state = unit_state(fleet, name)
        assert state["ActiveState"] == "active"
        assert state["InvocationID"] != before[name]["InvocationID"]
        exec_start = fleet.ssh(name, f"systemctl show -p ExecStart {UNIT}").stdout
        assert "--spec-draft-p-min 0.25" not in exec_start
        health = requests.get(f"http://{fleet.hosts[name].address}:8080/health", timeout=10)
        assert health.status_code == 200


@pytest.mark.usefixtures("demo_restored")
def test_a_flag_that_makes_the_server_exit_rolls_back(fleet: Fleet, deployed: PyinfraRun) -> None:
    """On every host: with systemd >= 254 the unit restarts with back-off (RestartSteps=)."""
    # An invalid value for a flag extra_args may carry: llama-server exits on it.
    exiting = {"extra_args": ["--rope-scaling", "q9_9"]}
    run = run_pyinfra("deploys/gemma4_mtp.py", *data_arg("llama_server", exiting))
    assert run.returncode != 0
    for name in fleet.hosts:
        rolled_back = rf"\[{name}\] {UNIT}: .*rolled back to last-known-good, serving again"
        assert re.search(rolled_back, run.output), run.output[-3000:]
        assert unit_state(fleet, name)["ActiveState"] == "active"
        exec_start = fleet.ssh(name, f"systemctl show -p ExecStart {UNIT}").stdout
        assert "q9_9" not in exec_start
