"""GPU services pinned by drop-in, and surgical redeploy of one unit."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from gemma4_fleet.gpu_devices import UVM_SCRIPT, UVM_UNIT
from gemma4_fleet.testfleet.hosts import Fleet
from tests.fleet.conftest import PyinfraRun, data_arg, run_pyinfra
from tests.fleet.test_deploy import UNIT, mtimes, unit_state

pytestmark = pytest.mark.fleet
# Stand-ins for whisper/TTS: real systemd services the user owns (we never write their units).
AUDIO = ("whisper-server.service", "tts.service")
GPU1 = "GPU-00000000-0000-0000-0000-000000000001"
SERVICES = [{"unit": unit, "gpu": GPU1} for unit in AUDIO]
STAND_IN = (
    "[Unit]\nDescription=stand-in {0}\n[Service]\nExecStart=/bin/sleep infinity\n"
    "[Install]\nWantedBy=multi-user.target\n"
)


def state_of(fleet: Fleet, name: str, unit: str) -> dict[str, str]:
    out = fleet.ssh(name, f"systemctl show -p ActiveState,InvocationID,MainPID {unit}").stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def environ(fleet: Fleet, name: str, unit: str) -> str:
    pid = state_of(fleet, name, unit)["MainPID"]
    return fleet.ssh(name, f"tr '\\0' '\\n' </proc/{pid}/environ").stdout


@pytest.fixture(scope="module")
def audio(fleet: Fleet, deployed: PyinfraRun) -> Iterator[dict[str, str]]:
    """Install and start the stand-in services; returns the sha256 of their unit files."""
    sums = {}
    for name in fleet.hosts:
        for unit in AUDIO:
            fleet.ssh(
                name,
                f"printf '{STAND_IN.format(unit)}' >/etc/systemd/system/{unit} && "
                f"systemctl daemon-reload && systemctl enable --now {unit}",
            )
        sums[name] = fleet.ssh(
            name,
            "sha256sum /etc/systemd/system/whisper-server.service /etc/systemd/system/tts.service",
        ).stdout
    yield sums
    for name in fleet.hosts:
        fleet.ssh(
            name,
            "systemctl disable --now whisper-server.service tts.service; "
            "rm -rf /etc/systemd/system/whisper-server.service* "
            "/etc/systemd/system/tts.service*; systemctl daemon-reload",
        )


def test_audio_services_are_pinned_by_drop_in(fleet: Fleet, audio: dict[str, str]) -> None:
    run = run_pyinfra("deploys/gemma4_mtp.py", *data_arg("gpu_services", SERVICES))
    assert run.returncode == 0, run.output[-3000:]
    for name in fleet.hosts:
        for unit in AUDIO:
            assert f"CUDA_VISIBLE_DEVICES={GPU1}" in environ(fleet, name, unit).splitlines()
        own_units = fleet.ssh(
            name,
            "sha256sum /etc/systemd/system/whisper-server.service /etc/systemd/system/tts.service",
        ).stdout
        assert own_units == audio[name]
    again = run_pyinfra("deploys/gemma4_mtp.py", *data_arg("gpu_services", SERVICES))
    assert again.returncode == 0 and again.results, again.output[-3000:]
    assert again.changed() == {}, again.changed()


def test_no_uvm_oneshot_where_nvidia_smi_lists_no_gpu(fleet: Fleet, audio: dict[str, str]) -> None:
    """The test hosts have no GPU: pinned services get their GPU by drop-in but no dependency
    on the UVM oneshot, and a oneshot an earlier version installed there is removed."""
    for name in fleet.hosts:  # what a deploy before this rule left on a host without GPUs
        fleet.ssh(
            name,
            f"mkdir -p {os.path.dirname(UVM_SCRIPT)} && printf '#!/bin/sh\\n' >{UVM_SCRIPT} && "
            f"printf '[Service]\\nType=oneshot\\nExecStart={UVM_SCRIPT}\\n' "
            f">/etc/systemd/system/{UVM_UNIT} && systemctl daemon-reload",
        )
    run = run_pyinfra("deploys/gemma4_mtp.py", *data_arg("gpu_services", SERVICES))
    assert run.returncode == 0, run.output[-3000:]
    for name in fleet.hosts:
        left = fleet.ssh(name, f"ls /etc/systemd/system/{UVM_UNIT} {UVM_SCRIPT}", check=False)
        assert left.stdout == "" and left.returncode != 0, left.stdout
        fleet.ssh(name, "systemctl restart whisper-server.service")
        deps = fleet.ssh(name, "systemctl show -p Requires,After whisper-server.service").stdout
        assert UVM_UNIT not in deps, deps
        assert f"CUDA_VISIBLE_DEVICES={GPU1}" in environ(fleet, name, "whisper-server.service")
        assert state_of(fleet, name, "whisper-server.service")["ActiveState"] == "active"
        verify = fleet.ssh(name, "systemd-analyze verify whisper-server.service")
        assert verify.returncode == 0, verify.stderr


@pytest.fixture
def pinned_back(fleet: Fleet, audio: dict[str, str]) -> Iterator[None]:
    """After the test, passed or failed: the full deploy with the services pinned as listed."""
    yield
    restore = run_pyinfra("deploys/gemma4_mtp.py", *data_arg("gpu_services", SERVICES))
    assert restore.returncode == 0, restore.output[-3000:]


@pytest.mark.usefixtures("pinned_back")
def test_redeploy_restarts_only_the_chosen_unit(fleet: Fleet, audio: dict[str, str]) -> None:
    units = [UNIT, *AUDIO, "llama-smoke-gemma3.timer"]
    before = {n: {u: state_of(fleet, n, u) for u in units} for n in fleet.hosts}
    files_before = {n: mtimes(fleet, n) for n in fleet.hosts}
    run = run_pyinfra(
        "deploys/redeploy_unit.py",
        "--limit",
        "g4f-node1",
        "--data",
        "unit=gemma3",
        *data_arg("llama_server", {"draft_p_min": 0.25}),
        *data_arg("gpu_services", SERVICES),
    )
    assert run.returncode == 0, run.output[-3000:]
    changed = run.changed()
    assert changed and all("llama-server-gemma3" in op for op in changed), changed
    after = {n: {u: state_of(fleet, n, u) for u in units} for n in fleet.hosts}
    assert after["g4f-node1"][UNIT]["InvocationID"] != before["g4f-node1"][UNIT]["InvocationID"]
    for name in fleet.hosts:
        assert mtimes(fleet, name) == files_before[name]
        for unit in units:
            if (name, unit) != ("g4f-node1", UNIT):
                assert after[name][unit] == before[name][unit], (name, unit)
    assert (
        "--spec-draft-p-min 0.25"
        in fleet.ssh("g4f-node1", f"systemctl show -p ExecStart {UNIT}").stdout
    )

    gpu2 = [{**SERVICES[0], "gpu": GPU1.replace("1", "2")}, SERVICES[1]]
    pin = run_pyinfra(
        "deploys/redeploy_unit.py",
        "--limit",
        "g4f-node1",
        "--data",
        "unit=whisper-server.service",
        *data_arg("gpu_services", gpu2),
    )
    assert pin.returncode == 0, pin.output[-3000:]
    assert pin.changed() and all("whisper-server" in op for op in pin.changed()), pin.changed()
    assert f"CUDA_VISIBLE_DEVICES={gpu2[0]['gpu']}" in environ(
        fleet, "g4f-node1", "whisper-server.service"
    )
    assert state_of(fleet, "g4f-node1", "tts.service") == after["g4f-node1"]["tts.service"]
    assert state_of(fleet, "g4f-node1", UNIT) == after["g4f-node1"][UNIT]


def test_redeploy_of_an_unknown_unit_changes_nothing(fleet: Fleet, audio: dict[str, str]) -> None:
    before = {name: unit_state(fleet, name) for name in fleet.hosts}
    run = run_pyinfra("deploys/redeploy_unit.py", "--data", "unit=nope")
    assert run.returncode != 0
    assert "unit: 'nope' is neither a llama-server instance nor a GPU service" in run.output
    assert "Starting operation" not in run.output
    assert {name: unit_state(fleet, name) for name in fleet.hosts} == before
