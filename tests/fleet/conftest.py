"""Fleet tests: real systemd-nspawn hosts, real SSH, real pyinfra runs (root, Linux only)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from gemma4_fleet.testfleet.hosts import Fleet, host_releases
from gemma4_fleet.testfleet.results import OpCounts, changed_ops, results_table

ROOT = Path(__file__).resolve().parents[2]
PYINFRA = str(Path(sys.executable).with_name("pyinfra"))


@dataclass
class PyinfraRun:
    returncode: int
    output: str
    # Operation name -> (success, error, no change) host counts, from pyinfra's Results table.
    results: dict[str, OpCounts]

    def changed(self) -> dict[str, int]:
        return changed_ops(self.results)


def run_pyinfra(
    deploy: str,
    *args: str,
    inventory: str = "inventories/local.py",
    env: dict[str, str] | None = None,
) -> PyinfraRun:
    """`pyinfra -y` as a user runs it, from the repo root.

    `--parallel 1`: the hosts share this machine's two cores; one host after the other, so
    builds and smoke checks do not compete.
    """
    result = subprocess.run(
        [PYINFRA, "-y", "--parallel", "1", *args, inventory, deploy],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=3000,
        check=False,
    )
    output = result.stdout + result.stderr
    return PyinfraRun(result.returncode, output, results_table(output))


def data_arg(key: str, value: Any) -> list[str]:
    return ["--data", f"{key}={json.dumps(value)}"]


# One host of each release, so every fleet test runs both systemd branches of the unit template
# (252 and 257) and both Pythons of the smoke check (3.11, 3.13). G4F_FLEET_RELEASES=bookworm
# (say) narrows it while working on a test.
RELEASES = tuple(os.environ.get("G4F_FLEET_RELEASES", "bookworm,trixie").split(","))


@pytest.fixture(scope="session")
def fleet() -> Iterator[Fleet]:
    """The default fleet of two hosts that `inventories/local.py` deploys to.

    G4F_KEEP_FLEET=1 (for working on tests) reuses a fleet that is up and leaves it up.
    """
    fleet = Fleet()
    keep = os.environ.get("G4F_KEEP_FLEET") == "1"
    wanted = host_releases(2, RELEASES)
    if not (keep and [h.release for h in fleet.hosts.values()] == wanted):
        fleet.up(2, RELEASES)
    try:
        yield fleet
    finally:
        if not keep:
            fleet.down()


@pytest.fixture(scope="session")
def deployed(fleet: Fleet) -> PyinfraRun:
    """The full deploy, run once on fresh hosts (a CPU build: minutes); progress lines every 5 s."""
    run = run_pyinfra("deploys/gemma4_mtp.py", env={"G4F_PROGRESS_INTERVAL": "5"})
    assert run.returncode == 0, run.output[-4000:]
    return run


@pytest.fixture
def demo_restored(fleet: Fleet, deployed: PyinfraRun) -> Iterator[None]:
    """After the test, passed or failed: the plain demo deploy again, so a test that changed
    the units (and maybe failed half-way) never leaves them to the next test."""
    yield
    back = run_pyinfra("deploys/gemma4_mtp.py")
    assert back.returncode == 0, back.output[-3000:]


@pytest.fixture(scope="module")
def demo_restored_after_module(fleet: Fleet, deployed: PyinfraRun) -> Iterator[None]:
    """As demo_restored, once after every test of a module (each of which redeploys anyway)."""
    yield
    back = run_pyinfra("deploys/gemma4_mtp.py")
    assert back.returncode == 0, back.output[-3000:]


def http(fleet: Fleet, name: str, path: str, **kwargs: Any) -> requests.Response:
    """A request to a host's llama-server over its veth (traffic stays on the fleet's netns)."""
    address = fleet.hosts[name].address
    method = "POST" if "json" in kwargs else "GET"
    return requests.request(method, f"http://{address}:8080{path}", timeout=300, **kwargs)
