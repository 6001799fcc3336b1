"""The test fleet itself: real hosts take a real pyinfra deploy, restart, and leave nothing behind.

Uses its own fleet ("g4t", 10.213.1.0/24) so it can run beside the default one.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from gemma4_fleet.testfleet.base import BaseBuildError, BaseRecipe
from gemma4_fleet.testfleet.hosts import MAX_HOSTS, Fleet, FleetError
from tests.fleet.conftest import run_pyinfra

pytestmark = pytest.mark.fleet
NOTHING = {"processes": [], "mounts": [], "links": [], "netns": []}


@pytest.fixture(scope="module")
def small_fleet() -> Iterator[Fleet]:
    fleet = Fleet(name="g4t", network=1)
    began = time.monotonic()
    fleet.up(2)
    print(
        f"\nfleet g4t: 2 hosts up in {time.monotonic() - began:.1f} s; boot "
        + ", ".join(f"{h.name} {h.boot_seconds:.1f} s" for h in fleet.hosts.values())
    )
    yield fleet
    fleet.down()


def inventory_file(fleet: Fleet, tmp_path: Path) -> str:
    path = tmp_path / "small_inventory.py"
    path.write_text(f"hosts = {fleet.inventory()!r}\n")
    return str(path)


def test_small_service_deploys_idempotently_over_ssh(small_fleet: Fleet, tmp_path: Path) -> None:
    inventory = inventory_file(small_fleet, tmp_path)
    first = run_pyinfra("tests/fleet/deploys/hello_service.py", inventory=inventory)
    assert first.returncode == 0, first.output[-3000:]
    assert first.changed()["Unit"] == 2
    for name, host in small_fleet.hosts.items():
        assert small_fleet.ssh(name, "systemctl is-active hello.service").stdout.strip() == "active"
        page = requests.get(f"http://{host.address}:9090/", timeout=10)
        assert page.text == "hello from the fleet\n"

    second = run_pyinfra("tests/fleet/deploys/hello_service.py", inventory=inventory)
    assert second.returncode == 0, second.output[-3000:]
    assert second.results, "no Results table in pyinfra's output"
    assert second.changed() == {}, second.output[-3000:]


def test_one_host_stops_and_restarts(small_fleet: Fleet) -> None:
    small_fleet.stop_host("g4t-node2")
    probe = small_fleet.ssh("g4t-node2", "true", check=False)
    assert probe.returncode != 0
    assert small_fleet.ssh("g4t-node1", "true").returncode == 0
    small_fleet.start_host("g4t-node2")
    # The service was enabled, so the rebooted host brings it back by itself.
    assert small_fleet.ssh("g4t-node2", "systemctl is-active hello.service").stdout.strip() == (
        "active"
    )


def test_teardown_leaves_nothing_behind(small_fleet: Fleet) -> None:
    assert small_fleet.leftovers() != NOTHING
    small_fleet.down()
    assert small_fleet.leftovers() == NOTHING
    assert not (small_fleet.state_dir / "hosts").exists()
    assert not small_fleet.state_file.exists()


@pytest.mark.parametrize(
    ("count", "words"),
    [(0, "at least 1"), (-3, "at least 1"), (MAX_HOSTS + 1, "does not fit the address plan")],
)
def test_bad_host_count_is_refused_before_anything(count: int, words: str) -> None:
    fleet = Fleet(name="g4t", network=1)
    with pytest.raises(FleetError, match=words):
        fleet.up(count)
    assert fleet.leftovers() == NOTHING


def test_base_build_failure_is_clear_and_leaves_nothing(tmp_path: Path) -> None:
    fleet = Fleet(name="g4t", network=1, cache=tmp_path)
    recipe = BaseRecipe(extra_packages=("g4f-no-such-package",))
    with pytest.raises(BaseBuildError, match="debootstrap of the base image failed"):
        fleet.up(1, recipe=recipe)
    assert fleet.leftovers() == NOTHING
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == []
