"""Both Debian releases of the test fleet: each host runs its own systemd, Python and gcc, the
unit template takes the systemd branch that host has, and every unit stays hardened on both."""

from __future__ import annotations

import json
import os
import re
import shlex
import time
from collections.abc import Iterator

import jinja2
import pytest

from gemma4_fleet.gpu_devices import UVM_SCRIPT, UVM_UNIT
from gemma4_fleet.testfleet.hosts import Fleet
from tests.fleet.conftest import ROOT, PyinfraRun, http
from tests.fleet.test_deploy import UNIT

pytestmark = pytest.mark.fleet
SMOKE = "llama-smoke-gemma3.service"
# What each release ships (Debian 12 / Debian 13), major versions only: point releases move.
SHIPS = {
    "bookworm": {"VERSION_ID": "12", "systemd": "252", "python3": "3.11", "gcc": "12"},
    "trixie": {"VERSION_ID": "13", "systemd": "257", "python3": "3.13", "gcc": "14"},
}
# systemd-analyze security: 0 is fully locked down, 10 fully exposed. Our bar for every unit.
MAX_EXPOSURE = 2.0


def versions(fleet: Fleet, name: str) -> dict[str, str]:
    out = fleet.ssh(
        name,
        ". /etc/os-release && echo VERSION_ID=$VERSION_ID; "
        "echo systemd=$(systemctl --version | head -n1 | cut -d' ' -f2); "
        "echo python3=$(python3 -c 'import sys; print(\"%d.%d\" % sys.version_info[:2])'); "
        "echo gcc=$(gcc -dumpversion)",
    ).stdout
    return dict(line.split("=", 1) for line in out.splitlines())


def test_the_default_fleet_mixes_both_releases(fleet: Fleet) -> None:
    if "G4F_FLEET_RELEASES" not in os.environ:
        assert sorted(h.release for h in fleet.hosts.values()) == ["bookworm", "trixie"]
    for name, host in fleet.hosts.items():
        seen = versions(fleet, name)
        print(f"\n{name} {host.release}: {seen}")
        assert seen == SHIPS[host.release]


def test_restart_backoff_only_where_systemd_has_it_and_both_serve(
    fleet: Fleet, deployed: PyinfraRun
) -> None:
    for name, host in fleet.hosts.items():
        unit = fleet.ssh(name, f"cat /etc/systemd/system/{UNIT}").stdout
        if host.release == "trixie":  # systemd 257: RestartSteps= exists from 254
            assert "RestartSteps=6\n" in unit and "RestartMaxDelaySec=5min\n" in unit
            shown = fleet.ssh(name, f"systemctl show -p RestartSteps,RestartMaxDelayUSec {UNIT}")
            assert shown.stdout.split() == ["RestartSteps=6", "RestartMaxDelayUSec=5min"]
        else:  # systemd 252 would warn about, and ignore, settings it does not know
            assert "RestartSteps" not in unit and "RestartMaxDelaySec" not in unit
        # No warning about our units (bookworm would name the unknown RestartSteps= key).
        verify = fleet.ssh(name, f"systemd-analyze verify {UNIT} {SMOKE} 2>&1", check=False)
        ours = [line for line in verify.stdout.splitlines() if UNIT in line or SMOKE in line]
        assert ours == [], verify.stdout
        assert http(fleet, name, "/health").json() == {"status": "ok"}
        # The smoke check runs with the host's own python3 (3.11 or 3.13).
        fleet.ssh(name, f"systemctl start {SMOKE}")
        report = json.loads(fleet.ssh(name, "cat /var/lib/gemma4-fleet-smoke/gemma3.json").stdout)
        assert report["status"] == "pass", report


def exposure(fleet: Fleet, name: str, unit: str) -> float:
    out = fleet.ssh(name, f"systemd-analyze security --no-pager {unit}", check=False).stdout
    match = re.search(rf"Overall exposure level for {re.escape(unit)}: (\d+\.\d+)", out)
    assert match, out[-2000:]
    return float(match.group(1))


def start_and_log(fleet: Fleet, name: str, unit: str, expect: str) -> str:
    """Start a oneshot; its journal lines since then, once `expect` has reached the journal
    (its stdout gets there a moment after `systemctl start` returns)."""
    since = fleet.ssh(name, f"date +%s && systemctl start {unit}").stdout.split()[0]
    deadline = time.monotonic() + 15
    while True:
        log = fleet.ssh(name, f"journalctl -o cat -u {unit} --since @{since}").stdout
        if expect in log or time.monotonic() > deadline:
            return log
        time.sleep(0.5)


def put(fleet: Fleet, name: str, path: str, text: str, mode: str = "644") -> None:
    fleet.ssh(
        name,
        f"mkdir -p {shlex.quote(os.path.dirname(path))} && "
        f"printf %s {shlex.quote(text)} >{shlex.quote(path)} && chmod {mode} {shlex.quote(path)}",
    )


@pytest.fixture
def uvm_oneshot(fleet: Fleet, deployed: PyinfraRun) -> Iterator[None]:
    """The UVM oneshot as the deploy installs it on a host with GPUs (same template and script).

    The CPU fleet's hosts have no GPU, so the deploy leaves it out there; without this its
    hardening would only ever be scored on the one GPU host of docs/gpu-proof.md.
    """
    templates = jinja2.Environment(  # noqa: S701 - a systemd unit, not HTML
        loader=jinja2.FileSystemLoader(ROOT / "templates"), trim_blocks=True, lstrip_blocks=True
    )
    unit = templates.get_template("nvidia-uvm.service.j2").render(script=UVM_SCRIPT)
    script = (ROOT / "gemma4_fleet" / "host_scripts" / "nvidia_uvm.sh").read_text()
    for name in fleet.hosts:
        put(fleet, name, UVM_SCRIPT, script, mode="755")
        put(fleet, name, f"/etc/systemd/system/{UVM_UNIT}", unit)
        fleet.ssh(name, "systemctl daemon-reload")
    yield
    for name in fleet.hosts:
        fleet.ssh(
            name,
            f"rm -rf /etc/systemd/system/{UVM_UNIT} /run/systemd/system/{UVM_UNIT}.d "
            f"{UVM_SCRIPT} /run/g4f-uvm-test /dev/g4f-uvm-test; systemctl daemon-reload",
        )


@pytest.mark.usefixtures("uvm_oneshot")
def test_every_installed_unit_is_hardened_on_both_releases(fleet: Fleet) -> None:
    """Every service the tool writes (llama-server-*, llama-smoke-*, the UVM oneshot of GPU
    hosts, any later one) is scored by each host's own systemd; the figures go to
    docs/reliability.md."""
    scores: dict[tuple[str, str], float] = {}
    for name, host in fleet.hosts.items():
        ours = fleet.ssh(
            name, "grep -l '^# Managed by gemma4-fleet' /etc/systemd/system/*.service"
        ).stdout.split()
        units = sorted(path.rsplit("/", 1)[1] for path in ours)
        assert {UNIT, SMOKE, UVM_UNIT} <= set(units), units
        for unit in units:
            scores[(host.release, unit)] = exposure(fleet, name, unit)
    print("\nrelease   exposure  unit")
    for (release, unit), score in sorted(scores.items()):
        print(f"{release:9} {score:8.1f}  {unit}")
    assert {unit: s for unit, s in scores.items() if s > MAX_EXPOSURE} == {}


@pytest.mark.usefixtures("uvm_oneshot")
def test_the_hardened_uvm_oneshot_still_makes_device_nodes(fleet: Fleet) -> None:
    """Its sandbox leaves what the script needs: /proc/devices, CAP_MKNOD, a writable /dev.

    No NVIDIA driver here: first the real /proc/devices (nothing to do), then a stand-in
    listing the driver (majors 240, 241: reserved for local use, no driver behind them) through the
    script's test hooks, so it takes the mknod branch it takes on a GPU host without
    nvidia-modprobe. The nvidia-modprobe branch (CAP_SYS_MODULE) needs a real driver.
    """
    devices = "Character devices:\n  1 mem\n240 nvidia\n240 nvidiactl\n241 nvidia-uvm\n"
    for name in fleet.hosts:
        nothing = "nvidia-uvm: no NVIDIA driver loaded"
        assert nothing in start_and_log(fleet, name, UVM_UNIT, nothing)

        put(fleet, name, "/run/g4f-uvm-test/devices", devices)
        put(
            fleet,
            name,
            f"/run/systemd/system/{UVM_UNIT}.d/test.conf",
            "[Service]\nEnvironment=G4F_PROC_DEVICES=/run/g4f-uvm-test/devices "
            "G4F_DEV=/dev/g4f-uvm-test\n",
        )
        fleet.ssh(name, "mkdir -p /dev/g4f-uvm-test && systemctl daemon-reload")
        made = "created /dev/g4f-uvm-test/nvidia-uvm (major 241) with mknod"
        assert made in start_and_log(fleet, name, UVM_UNIT, made)
        nodes = fleet.ssh(
            name, "cd /dev/g4f-uvm-test && stat -c '%n %F %t:%T %a' nvidia-uvm nvidia-uvm-tools"
        ).stdout.splitlines()
        assert nodes == [  # major 241 (0xf1) from the stand-in, minors 0 and 1, mode 666
            "nvidia-uvm character special file f1:0 666",
            "nvidia-uvm-tools character special file f1:1 666",
        ], nodes
        # ...with the sandbox as written: no other capability, no network, read-only system
        shown = fleet.ssh(
            name, f"systemctl show -p CapabilityBoundingSet,PrivateNetwork,ProtectSystem {UVM_UNIT}"
        ).stdout
        props = dict(line.split("=", 1) for line in shown.splitlines())
        assert set(props["CapabilityBoundingSet"].split()) == {"cap_mknod", "cap_sys_module"}
        assert (props["PrivateNetwork"], props["ProtectSystem"]) == ("yes", "strict"), props
