"""Draining, API keys, removal, reboot and rollback time on the test fleet.

Every test leaves the fleet as the session deploy made it (a finalizer redeploys the defaults),
so a failing test does not break the next one.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from gemma4_fleet.testfleet.hosts import Fleet
from gemma4_fleet.testfleet.inventory import demo_data
from tests.fleet.conftest import PyinfraRun, data_arg, run_pyinfra
from tests.fleet.test_deploy import UNIT, unit_state

pytestmark = pytest.mark.fleet
NODE = "g4f-node1"
SMOKE = "llama-smoke-gemma3"
REPORT = "/var/lib/gemma4-fleet-smoke/gemma3.json"


def deploy(*args: str, limit: str | None = NODE) -> PyinfraRun:
    return run_pyinfra("deploys/gemma4_mtp.py", *(["--limit", limit] if limit else []), *args)


def show(fleet: Fleet, name: str, unit: str, prop: str) -> str:
    return fleet.ssh(name, f"systemctl show -p {prop} --value {unit}").stdout.strip()


def demo_instance(fleet: Fleet) -> dict[str, Any]:
    instance: dict[str, Any] = demo_data(fleet.mirror_url, fleet.mirror_commit)["llama_instances"][
        0
    ]
    return instance


@pytest.fixture
def restore(fleet: Fleet, deployed: PyinfraRun) -> Iterator[None]:
    """Whatever the test deployed, the defaults are deployed again afterwards."""
    yield
    back = deploy()  # node1: the only host these tests change
    assert back.returncode == 0, back.output[-3000:]


def test_a_restart_waits_for_the_running_generation(fleet: Fleet, restore: None) -> None:
    base = f"http://{fleet.hosts[NODE].address}:8080"
    probe = requests.post(
        f"{base}/completion", json={"prompt": "One,", "n_predict": 32}, timeout=120
    ).json()
    # A stream long enough to outlast pyinfra's way to the restart (about 60 s).
    n_predict = min(3800, max(300, int(probe["timings"]["predicted_per_second"] * 60)))
    final: dict[str, Any] = {}
    chunks: list[str] = []
    ended: list[float] = []
    errors: list[BaseException] = []

    def stream() -> None:
        try:
            with requests.post(
                f"{base}/completion",
                json={
                    "prompt": "Count from one to ten thousand, in words:",
                    "n_predict": n_predict,
                    "ignore_eos": True,
                    "stream": True,
                },
                stream=True,
                timeout=600,
            ) as reply:
                for line in reply.iter_lines():
                    if line.startswith(b"data: "):
                        event = json.loads(line[6:])
                        chunks.append(event.get("content", ""))
                        if event.get("stop"):
                            final.update(event)
            ended.append(time.monotonic())
        except BaseException as exc:  # the assertion below reports it
            errors.append(exc)

    before = unit_state(fleet, NODE)
    reader = threading.Thread(target=stream, daemon=True)
    reader.start()
    deadline = time.monotonic() + 30
    while not any(s["is_processing"] for s in requests.get(f"{base}/slots", timeout=10).json()):
        assert time.monotonic() < deadline, "the stream never started"
        time.sleep(0.2)
    run = deploy(*data_arg("llama_server", {"draft_p_min": 0.25}))
    reader.join(timeout=600)
    assert run.returncode == 0, run.output[-3000:]
    assert not errors, errors
    assert final.get("stop_type") == "limit" and final["tokens_predicted"] == n_predict, final
    assert f"{UNIT}: waiting up to 300 s for slot 0" in run.output, run.output[-3000:]
    drained = re.search(rf"{re.escape(UNIT)}: drained after ([0-9.]+) s", run.output)
    assert drained, run.output[-3000:]
    after = unit_state(fleet, NODE)
    assert after["InvocationID"] != before["InvocationID"]
    started = int(show(fleet, NODE, UNIT, "ExecMainStartTimestampMonotonic")) / 1e6
    # CLOCK_MONOTONIC is the kernel's, shared by the test and the nspawn host.
    assert started > ended[0], (started, ended[0])
    print(
        f"\ndrain: {n_predict} tokens streamed to the end; the deploy waited {drained.group(1)} s;"
        f" the new server started {started - ended[0]:.2f} s after the stream ended"
    )


@pytest.fixture
def key_file(tmp_path: Path) -> str:
    path = tmp_path / "gemma3.key"
    path.write_text(f"# test key\ng4f-{secrets.token_urlsafe(24)}\n")
    return str(path)


def test_an_api_key_reaches_only_the_server(fleet: Fleet, key_file: str, restore: None) -> None:
    key = Path(key_file).read_text().splitlines()[1]
    keyed = {**demo_instance(fleet), "api_key_file": key_file, "allow_unauthenticated": False}
    run = deploy(*data_arg("llama_instances", [keyed]))
    assert run.returncode == 0, run.output[-3000:]
    assert key not in run.output
    base = f"http://{fleet.hosts[NODE].address}:8080"
    body = {"prompt": "Hello", "n_predict": 4}
    assert requests.post(f"{base}/completion", json=body, timeout=60).status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert (
        requests.post(f"{base}/completion", json=body, headers=wrong, timeout=60).status_code == 401
    )
    good = {"Authorization": f"Bearer {key}"}
    assert (
        requests.post(f"{base}/completion", json=body, headers=good, timeout=60).status_code == 200
    )
    # /health stays open (llama-server exempts it): load balancers and the deploy's wait use it.
    assert requests.get(f"{base}/health", timeout=10).status_code == 200
    # The deploy's smoke check used the key (via its own credential) and passed.
    assert json.loads(fleet.ssh(NODE, f"cat {REPORT}").stdout)["status"] == "pass"
    assert fleet.ssh(NODE, f"systemctl start {SMOKE}.service", check=False).returncode == 0
    pid = show(fleet, NODE, UNIT, "MainPID")
    places = {
        "ps": fleet.ssh(NODE, "ps -eo args").stdout,
        "unit files": fleet.ssh(NODE, "cat /etc/systemd/system/llama-*gemma3*").stdout,
        "systemctl show": fleet.ssh(NODE, f"systemctl show {UNIT} {SMOKE}.service").stdout,
        "environment": fleet.ssh(NODE, f"tr '\\0' '\\n' </proc/{pid}/environ").stdout,
        "journal": fleet.ssh(NODE, "journalctl -b --no-pager -o cat").stdout,
        "smoke report": fleet.ssh(NODE, f"cat {REPORT}").stdout,
    }
    assert {where: key in text for where, text in places.items()} == dict.fromkeys(places, False)
    assert "--api-key-file /run/credentials/llama-server-gemma3.service/api-key" in places["ps"]
    modes = fleet.ssh(
        NODE,
        "stat -c '%n %U %a' /etc/gemma4-fleet/keys /etc/gemma4-fleet/keys/gemma3.key "
        "/run/credentials/llama-server-gemma3.service/api-key",
    ).stdout.split("\n")
    assert modes[:2] == [
        "/etc/gemma4-fleet/keys root 700",
        "/etc/gemma4-fleet/keys/gemma3.key root 600",
    ]
    cred_owner, cred_mode = modes[2].split()[1:]
    assert cred_owner in ("root", "llama") and cred_mode in ("400", "440", "600"), modes[2]
    as_nobody = fleet.ssh(
        NODE,
        "setpriv --reuid=nobody --regid=nogroup --clear-groups cat "
        "/etc/gemma4-fleet/keys/gemma3.key /run/credentials/llama-server-gemma3.service/api-key",
        check=False,
    )
    assert as_nobody.returncode != 0 and key not in as_nobody.stdout

    # Without the key again: the drain reads the running server's slots with its credential.
    back = deploy()
    assert back.returncode == 0, back.output[-3000:]
    assert f"{UNIT}: idle, nothing to wait for" in back.output, back.output[-3000:]
    assert fleet.ssh(NODE, "ls /etc/gemma4-fleet/keys").stdout.strip() == ""
    assert requests.post(f"{base}/completion", json=body, timeout=60).status_code == 200


def test_a_reachable_server_without_a_key_is_refused_before_any_host(
    fleet: Fleet, deployed: PyinfraRun
) -> None:
    exposed = {**demo_instance(fleet), "allow_unauthenticated": False}
    run = deploy(*data_arg("llama_instances", [exposed]))
    assert run.returncode != 0
    assert (
        f"host {NODE}: llama_instances[gemma3].host: 0.0.0.0 is reachable from other machines"
        in run.output
    )
    assert "Starting operation" not in run.output


@pytest.fixture
def variant_model(fleet: Fleet, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Gemma 3 270M with 4 KiB appended: another file (sha256) that loads the same."""
    demo = demo_data(fleet.mirror_url, fleet.mirror_commit)["llama_models"]["gemma-3-270m"]
    source = Path(fleet.cache / "models" / demo["file"])
    path = tmp_path_factory.mktemp("variant") / "gemma-3-270m-variant.gguf"
    digest = hashlib.sha256()
    with source.open("rb") as src, path.open("wb") as dst:
        for block in iter(lambda: src.read(1 << 20), b""):
            digest.update(block)
            dst.write(block)
        dst.write(b"\0" * 4096)
        digest.update(b"\0" * 4096)
    url = fleet.add_mirror_file(path)
    return {"role": "target", "file": path.name, "url": url, "sha256": digest.hexdigest()}


def test_a_removed_instance_is_drained_stopped_and_deleted(
    fleet: Fleet, variant_model: dict[str, Any], restore: None
) -> None:
    models = {**demo_data(fleet.mirror_url, fleet.mirror_commit)["llama_models"]}
    models["variant"] = variant_model
    second = {
        **demo_instance(fleet),
        "name": "second",
        "port": 8081,
        "target": "variant",
        "drafter": None,
        "spec_type": "none",
    }
    both = deploy(
        *data_arg("llama_models", models),
        *data_arg("llama_instances", [demo_instance(fleet), second]),
    )
    assert both.returncode == 0, both.output[-3000:]
    kept = unit_state(fleet, NODE)
    assert show(fleet, NODE, "llama-server-second.service", "ActiveState") == "active"
    variant_dir = f"/var/lib/llama-models/{variant_model['sha256'][:16]}"
    assert (
        fleet.ssh(NODE, f"test -f {variant_dir}/{variant_model['file']}", check=False).returncode
        == 0
    )

    run = deploy()
    assert run.returncode == 0, run.output[-3000:]
    assert "llama-server-second.service: idle, nothing to wait for" in run.output
    assert unit_state(fleet, NODE) == kept  # same InvocationID: the other one never restarted
    leftovers = fleet.ssh(
        NODE,
        "ls /etc/systemd/system/*second* /var/lib/gemma4-fleet/last-known-good/*second* "
        f"/var/lib/gemma4-fleet-smoke/second.* {variant_dir} 2>/dev/null; "
        "systemctl list-units --all --no-legend '*second*'; systemctl list-timers --all "
        "--no-legend | grep second; pgrep -af 'llama-server.*--port 808[1]'",
        check=False,
    ).stdout
    assert leftovers.strip() == ""
    assert show(fleet, NODE, "llama-server-second.service", "LoadState") == "not-found"
    again = deploy()
    assert again.changed() == {}, again.changed()


STAND_IN = (
    "# the users own unit\n[Service]\nExecStart=/bin/sleep infinity\n"
    "[Install]\nWantedBy=multi-user.target\n"
)


@pytest.fixture
def whisper(fleet: Fleet, deployed: PyinfraRun) -> Iterator[str]:
    unit = "whisper-server.service"
    fleet.ssh(
        NODE,
        f"printf '{STAND_IN}' >/etc/systemd/system/{unit} && systemctl daemon-reload && "
        f"systemctl enable --now {unit}",
    )
    yield unit
    fleet.ssh(
        NODE,
        f"systemctl disable --now {unit}; rm -rf /etc/systemd/system/{unit}*; "
        "systemctl daemon-reload",
    )


def test_a_delisted_gpu_service_loses_its_pin_and_keeps_running(fleet: Fleet, whisper: str) -> None:
    gpu1 = "GPU-00000000-0000-0000-0000-000000000001"
    pinned = deploy(*data_arg("gpu_services", [{"unit": whisper, "gpu": gpu1}]))
    assert pinned.returncode == 0, pinned.output[-3000:]
    dropin = f"/etc/systemd/system/{whisper}.d/gemma4-fleet-gpu.conf"
    assert fleet.ssh(NODE, f"test -f {dropin}", check=False).returncode == 0
    own = fleet.ssh(NODE, f"sha256sum /etc/systemd/system/{whisper}").stdout
    before = show(fleet, NODE, whisper, "InvocationID")
    run = deploy()
    assert run.returncode == 0, run.output[-3000:]
    assert fleet.ssh(NODE, f"ls /etc/systemd/system/{whisper}.d", check=False).returncode != 0
    assert show(fleet, NODE, whisper, "ActiveState") == "active"
    assert show(fleet, NODE, whisper, "InvocationID") != before
    pid = show(fleet, NODE, whisper, "MainPID")
    assert "CUDA_VISIBLE_DEVICES" not in fleet.ssh(NODE, f"cat /proc/{pid}/environ").stdout
    assert fleet.ssh(NODE, f"sha256sum /etc/systemd/system/{whisper}").stdout == own


def test_a_failed_start_rolls_back_within_60_s(fleet: Fleet, restore: None) -> None:
    before = unit_state(fleet, NODE)
    exiting = {"extra_args": ["--lora", "/nonexistent/adapter.gguf"]}
    run = deploy(*data_arg("llama_server", exiting))
    assert run.returncode != 0
    match = re.search(r"serving again ([0-9.]+) s after the restart", run.output)
    assert match, run.output[-3000:]
    seconds = float(match.group(1))
    print(f"\nrollback: the last-known-good unit served again {seconds:.1f} s after the restart")
    assert seconds < 60
    after = unit_state(fleet, NODE)
    assert after["ActiveState"] == "active" and after["InvocationID"] != before["InvocationID"]
    assert "--lora" not in show(fleet, NODE, UNIT, "ExecStart")
    assert requests.get(f"http://{fleet.hosts[NODE].address}:8080/health", timeout=10).ok


def test_after_a_reboot_every_instance_and_timer_comes_back(
    fleet: Fleet, deployed: PyinfraRun
) -> None:
    name = "g4f-node2"
    before = unit_state(fleet, name)
    fleet.stop_host(name)
    t0 = time.monotonic()
    fleet.start_host(name)
    booted = time.monotonic() - t0
    url = f"http://{fleet.hosts[name].address}:8080/health"
    deadline = time.monotonic() + 180
    while True:
        try:
            if requests.get(url, timeout=5).status_code == 200:
                break
        except requests.RequestException:
            pass
        assert time.monotonic() < deadline, "no /health 200 within 180 s of the reboot"
        time.sleep(0.5)
    healthy = time.monotonic() - t0
    after = unit_state(fleet, name)
    assert after["ActiveState"] == "active" and after["InvocationID"] != before["InvocationID"]
    assert show(fleet, name, f"{SMOKE}.timer", "ActiveState") == "active"
    assert fleet.ssh(name, f"systemctl start {SMOKE}.service", check=False).returncode == 0
    assert json.loads(fleet.ssh(name, f"cat {REPORT}").stdout)["status"] == "pass"
    failed = fleet.ssh(name, "systemctl list-units --failed --no-legend --plain").stdout
    assert "llama" not in failed, failed
    print(f"\nreboot: SSH back after {booted:.1f} s, /health 200 after {healthy:.1f} s")
