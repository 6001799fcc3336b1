"""The full deploy on real hosts: CPU build from the git mirror, Gemma 3 270M as target + draft."""

from __future__ import annotations

import shlex

import pytest

from gemma4_fleet.host_scripts.prune import MARKER
from gemma4_fleet.testfleet.hosts import Fleet
from gemma4_fleet.testfleet.inventory import demo_data
from tests.fleet.conftest import PyinfraRun, data_arg, http, run_pyinfra

pytestmark = pytest.mark.fleet
UNIT = "llama-server-gemma3.service"
# Directories prune meets under the models folder: one it did not make, one it made and no
# unit uses; hostile names (space, quotes, %, $) on both.
FOREIGN = "/var/lib/llama-models/not ours; 'q' \"q\" %h $HOME"
STALE = "/var/lib/llama-models/old ours; 'q' \"q\" %h $HOME"


def unit_state(fleet: Fleet, name: str) -> dict[str, str]:
    out = fleet.ssh(name, f"systemctl show -p ActiveState,InvocationID,MainPID,User {UNIT}").stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def mtimes(fleet: Fleet, name: str) -> str:
    return fleet.ssh(
        name,
        "stat -c '%n %Y' /opt/llama.cpp/builds/*/bin/llama-server /var/lib/llama-models/*/*.gguf",
    ).stdout


def test_first_deploy_serves_with_speculative_decoding(fleet: Fleet, deployed: PyinfraRun) -> None:
    short = fleet.mirror_commit[:7]
    for name in fleet.hosts:
        state = unit_state(fleet, name)
        assert state["ActiveState"] == "active"
        owner = fleet.ssh(name, f"ps -o user= -p {state['MainPID']}").stdout.strip()
        assert owner == "llama"
        assert http(fleet, name, "/health").json() == {"status": "ok"}
        props = http(fleet, name, "/props").json()
        assert props["build_info"].endswith(f"-{short}"), props["build_info"]
        completion = http(
            fleet,
            name,
            "/completion",
            json={"prompt": "List three colors:", "n_predict": 48, "temperature": 0},
        ).json()
        assert completion["content"].strip()
        assert completion["timings"]["draft_n_accepted"] > 0, completion["timings"]
        version = fleet.ssh(name, "/opt/llama.cpp/builds/*/bin/llama-server --version 2>&1").stdout
        assert f"commit {short}" in version
        # The help the build kept (read by the flag check instead of running the binary) lists
        # the options the binary lists now.
        kept = fleet.ssh(
            name,
            "cd /opt/llama.cpp/builds/*/bin && ./llama-server --help 2>&1 | grep -e '^-' >/tmp/h"
            " && grep -e '^-' llama-server.help | cmp - /tmp/h && grep -c -e --spec-type /tmp/h",
            check=False,
        )
        assert kept.returncode == 0 and int(kept.stdout) > 0, kept.stdout + kept.stderr


def test_second_run_changes_nothing(fleet: Fleet, deployed: PyinfraRun) -> None:
    before = {name: (mtimes(fleet, name), unit_state(fleet, name)) for name in fleet.hosts}
    again = run_pyinfra("deploys/gemma4_mtp.py")
    assert again.returncode == 0, again.output[-3000:]
    assert again.results
    assert again.changed() == {}, again.changed()
    assert {name: (mtimes(fleet, name), unit_state(fleet, name)) for name in fleet.hosts} == before
    # The no-op after it reads every fact in one SSH command per host (gemma4_fleet.fact_batch:
    # the facts this run asked before anything changed), and still changes nothing.
    flat = run_pyinfra("deploys/gemma4_mtp.py", "--debug")
    assert flat.returncode == 0 and flat.changed() == {}, flat.output[-3000:]
    commands = {n: flat.output.count(f"Running command on {n}:") for n in fleet.hosts}
    assert commands == {name: 1 for name in fleet.hosts}, commands


@pytest.mark.usefixtures("demo_restored")
def test_a_server_flag_change_restarts_without_rebuild_or_download(
    fleet: Fleet, deployed: PyinfraRun
) -> None:
    for name in fleet.hosts:  # for prune, which runs because the units change
        fleet.ssh(
            name,
            f"mkdir -p {shlex.quote(FOREIGN)} {shlex.quote(STALE)} && "
            f"touch {shlex.quote(STALE)}/{MARKER} {shlex.quote(FOREIGN)}/keep.gguf",
        )
    before = {name: (mtimes(fleet, name), unit_state(fleet, name)) for name in fleet.hosts}
    run = run_pyinfra("deploys/gemma4_mtp.py", *data_arg("llama_server", {"draft_p_min": 0.25}))
    assert run.returncode == 0, run.output[-3000:]
    changed = run.changed()
    assert any(op.endswith(f"Unit {UNIT}") for op in changed), changed
    assert any("restarted" in op for op in changed), changed
    assert not any("Build" in op or "Model" in op or "source" in op for op in changed), changed
    for name in fleet.hosts:
        files_before, state_before = before[name]
        assert mtimes(fleet, name) == files_before
        assert unit_state(fleet, name)["InvocationID"] != state_before["InvocationID"]
        exec_start = fleet.ssh(name, f"systemctl show -p ExecStart {UNIT}").stdout
        assert "--spec-draft-p-min 0.25" in exec_start
        assert http(fleet, name, "/health").status_code == 200
        # prune: ours and unused is gone, not ours stays, whatever the names
        left = fleet.ssh(name, "ls -A /var/lib/llama-models").stdout.splitlines()
        assert FOREIGN.rsplit("/", 1)[1] in left and STALE.rsplit("/", 1)[1] not in left
        fleet.ssh(name, f"rm -rf {shlex.quote(FOREIGN)}")


def test_unknown_flag_fails_the_host_before_the_unit_is_written(
    fleet: Fleet, deployed: PyinfraRun
) -> None:
    before = {
        name: (
            fleet.ssh(name, f"sha256sum /etc/systemd/system/{UNIT}").stdout,
            unit_state(fleet, name),
        )
        for name in fleet.hosts
    }
    # (A flag owned by typed config, such as --draft-max, never gets this far: see
    # tests/unit/test_bad_input.py.)
    unknown_flag = {"extra_args": ["--g4f-no-such-flag"]}
    run = run_pyinfra("deploys/gemma4_mtp.py", *data_arg("llama_server", unknown_flag))
    assert run.returncode != 0
    assert "does not know --g4f-no-such-flag" in run.output
    for name in fleet.hosts:
        unit_sum, state = before[name]
        assert fleet.ssh(name, f"sha256sum /etc/systemd/system/{UNIT}").stdout == unit_sum
        assert unit_state(fleet, name) == state


def test_bad_config_is_refused_before_any_host_is_touched(
    fleet: Fleet, deployed: PyinfraRun
) -> None:
    run = run_pyinfra("deploys/gemma4_mtp.py", *data_arg("llama_server", {"cache_type_k": "q9_0"}))
    assert run.returncode != 0
    for name in fleet.hosts:
        assert f"host {name}: llama_instances[gemma3].cache_type_k" in run.output
    assert "Starting operation" not in run.output


def test_an_account_the_tool_did_not_create_is_refused(fleet: Fleet) -> None:
    """An existing login account as llama_service_user: refused on that host, nothing changed."""
    name = "g4f-node1"
    fleet.ssh(name, "id g4f-someone 2>/dev/null || useradd -m -s /bin/bash g4f-someone")
    before = fleet.ssh(name, "getent passwd g4f-someone").stdout
    try:
        run = run_pyinfra(
            "deploys/gemma4_mtp.py", "--limit", name, "--data", "llama_service_user=g4f-someone"
        )
        assert run.returncode != 0
        assert f"host {name}: llama_service_user: account 'g4f-someone' already exists" in (
            run.output
        )
        assert "Starting operation" not in run.output
        assert fleet.ssh(name, "getent passwd g4f-someone").stdout == before
    finally:
        fleet.ssh(name, "userdel -r g4f-someone", check=False)


def test_a_gpu_the_host_does_not_have_is_refused(fleet: Fleet) -> None:
    """GPU index 1 on hosts whose nvidia-smi finds none: an error per host, no operation."""
    services = [{"unit": "whisper-server.service", "gpu": "1"}]
    run = run_pyinfra("deploys/gemma4_mtp.py", *data_arg("gpu_services", services))
    assert run.returncode != 0
    for name in fleet.hosts:
        assert (
            f"host {name}: gpu_services[whisper-server.service].gpu: no GPU '1' on the host "
            "(nvidia-smi lists: none"
        ) in run.output
    assert "Starting operation" not in run.output


def test_a_failed_build_leaves_the_old_build_serving(fleet: Fleet, deployed: PyinfraRun) -> None:
    name = "g4f-node1"
    before = unit_state(fleet, name)
    build = demo_data(fleet.mirror_url, fleet.mirror_commit)["llamacpp_build"]
    broken = {**build, "cmake_flags": ["-DCMAKE_CXX_COMPILER=/nonexistent/c++"]}
    run = run_pyinfra("deploys/gemma4_mtp.py", "--limit", name, *data_arg("llamacpp_build", broken))
    assert run.returncode != 0
    assert "Build llama.cpp" in run.output and "/nonexistent/c++" in run.output
    assert unit_state(fleet, name) == before
    assert http(fleet, name, "/health").status_code == 200
    builds = fleet.ssh(name, "ls /opt/llama.cpp/builds").stdout.split()
    assert len(builds) == 1 and not builds[0].endswith(".partial")


def test_a_bad_model_never_replaces_the_good_one(fleet: Fleet, deployed: PyinfraRun) -> None:
    name = "g4f-node1"
    before = (unit_state(fleet, name), mtimes(fleet, name))
    demo = demo_data(fleet.mirror_url, fleet.mirror_commit)
    wrong = "0" * 64  # the mirror's file does not have this checksum
    models = {key: {**model, "sha256": wrong} for key, model in demo["llama_models"].items()}
    run = run_pyinfra("deploys/gemma4_mtp.py", "--limit", name, *data_arg("llama_models", models))
    assert run.returncode != 0
    assert "sha256 mismatch" in run.output
    assert (unit_state(fleet, name), mtimes(fleet, name)) == before
    leftovers = fleet.ssh(name, "find /var/lib/llama-models -name '*.partial'").stdout
    assert leftovers == ""
    assert http(fleet, name, "/health").status_code == 200
