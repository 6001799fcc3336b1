"""Both Debian releases of the test fleet: each host runs its own systemd, Python and gcc, the
unit template takes the systemd branch that host has, and every unit stays hardened on both."""

from __future__ import annotations

import json
import os

import pytest

from gemma4_fleet.testfleet.hosts import Fleet
from tests.fleet.conftest import PyinfraRun, http
from tests.fleet.test_deploy import UNIT

pytestmark = pytest.mark.fleet
SMOKE = "llama-smoke-gemma3.service"
# What each release ships (Debian 12 / Debian 13), major versions only: point releases move.
SHIPS = {
    "bookworm": {"VERSION_ID": "12", "systemd": "252", "python3": "3.11", "gcc": "12"},
    "trixie": {"VERSION_ID": "13", "systemd": "257", "python3": "3.13", "gcc": "14"},
}


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
