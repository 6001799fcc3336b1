"""The test fleet's choices that need no host: releases per host, the Debian mirror, the
inventory's release groups."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gemma4_fleet.testfleet import hosts as fleet_hosts
from gemma4_fleet.testfleet.base import (
    BaseBuildError,
    BaseRecipe,
    apt_mirror,
    ensure_base,
    overlay_lowerdirs,
    remove_stale_bases,
)
from gemma4_fleet.testfleet.hosts import Fleet, FleetError, host_releases

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


def test_releases_are_taken_in_turn() -> None:
    assert host_releases(3, ["bookworm", "trixie"]) == ["bookworm", "trixie", "bookworm"]
    assert host_releases(2, "trixie") == ["trixie", "trixie"]
    assert host_releases(1, ["bookworm", "trixie"]) == ["bookworm"]


@pytest.mark.parametrize("releases", [["sid"], ["bookworm", "Trixie"], [], [""]])
def test_an_unknown_release_is_refused_before_anything(releases: list[str], tmp_path: Path) -> None:
    fleet = Fleet(state_dir=tmp_path / "state", cache=tmp_path / "cache")
    with pytest.raises(FleetError, match=r"is not one of bookworm, trixie"):
        fleet.up(2, releases)
    assert list(tmp_path.iterdir()) == []


def overlay_line(lower: Path, target: str = "/var/lib/gemma4-fleet/hosts/g4f-node1/root") -> str:
    escaped = str(lower).replace(" ", "\\040")
    return (
        f"overlay {target} overlay rw,relatime,lowerdir={escaped},"
        f"upperdir={target}/../upper,workdir={target}/../work 0 0\n"
    )


def test_overlay_lowerdirs_are_read_from_proc_mounts(tmp_path: Path) -> None:
    mounts = (
        "proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0\n"
        + overlay_line(tmp_path / "with space" / "base-trixie-1")
        + "overlay /x overlay rw,lowerdir=/a:/b,upperdir=/u,workdir=/w 0 0\n"
        + "tmpfs /tmp tmpfs rw,lowerdir=/not-an-overlay 0 0\n"
    )
    assert overlay_lowerdirs(mounts) == {
        tmp_path / "with space" / "base-trixie-1",
        Path("/a"),
        Path("/b"),
    }


def test_a_stale_base_image_in_use_by_a_running_host_is_kept(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    images = {key: cache / f"base-trixie-{key}" for key in ("new", "used", "old")}
    for path in images.values():
        (path / "etc").mkdir(parents=True)
    other_release = cache / "base-bookworm-old"
    other_release.mkdir()
    (cache / "base-trixie-old.log").write_text("debootstrap log\n")
    # a host of another fleet (another version of this code) boots from the "used" image
    mounts = overlay_line(images["used"], "/var/lib/gemma4-fleet-g4t/hosts/g4t-node1/root")

    removed = remove_stale_bases(cache, "trixie", images["new"], mounts=mounts)

    assert removed == [images["old"]]
    assert sorted(p.name for p in cache.iterdir()) == [
        "base-bookworm-old",
        "base-trixie-new",
        "base-trixie-old.log",
        "base-trixie-used",
    ]


def test_an_unknown_base_release_is_refused_before_the_cache_is_touched(tmp_path: Path) -> None:
    with pytest.raises(BaseBuildError, match="'sid' is not one of bookworm, trixie"):
        ensure_base(tmp_path / "cache", BaseRecipe(suite="sid"))
    assert list(tmp_path.iterdir()) == []


def test_each_release_has_its_own_base_image_key() -> None:
    assert BaseRecipe(suite="bookworm").key != BaseRecipe(suite="trixie").key


def test_the_mirror_is_the_one_this_machines_apt_uses(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://security.example/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n\n"
        "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main\n"
    )
    assert apt_mirror(tmp_path) == "http://mirror.example/debian"
    # A trixie machine (one-line format) serves bookworm hosts too: one mirror, every release.
    (tmp_path / "sources.list.d" / "debian.sources").unlink()
    (tmp_path / "sources.list").write_text("deb http://other.example/debian trixie main\n")
    assert apt_mirror(tmp_path) == "http://other.example/debian"
    (tmp_path / "sources.list").write_text("deb http://ubuntu.example/ubuntu noble main\n")
    with pytest.raises(BaseBuildError, match="no apt source for Debian bookworm or trixie"):
        apt_mirror(tmp_path)


def test_the_local_inventory_groups_a_mixed_fleet_by_release(tmp_path: Path) -> None:
    """pyinfra itself loads inventories/local.py for a fleet state with both releases."""
    hosts = [
        {"name": f"g4f-node{i}", "index": i, "address": f"10.213.0.{10 + i}", "dir": f"/h/{i}"}
        for i in (1, 2, 3)
    ]
    for host, release in zip(hosts, ["bookworm", "trixie", "bookworm"], strict=True):
        host |= {"veth": f"ve-g4f-{host['index']}", "release": release}
    (tmp_path / "state.json").write_text(json.dumps({"hosts": hosts, "mirror_commit": "c0ffee"}))
    result = subprocess.run(
        [str(Path(sys.executable).with_name("pyinfra")), "inventories/local.py", "debug-inventory"],
        cwd=ROOT,
        env={**os.environ, "G4F_STATE": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = result.stdout + result.stderr  # pyinfra logs to stderr
    assert result.returncode == 0, output[-2000:]
    # "[g4f-node1]" then "--> Groups: local_fleet, bookworm, local" for each host.
    names = re.findall(r"^\[(\S+)\]", output, re.M)
    groups = re.findall(r"^--> Groups: (.*)$", output, re.M)
    assert dict(zip(names, groups, strict=True)) == {
        "g4f-node1": "local_fleet, bookworm, local",
        "g4f-node2": "local_fleet, trixie, local",
        "g4f-node3": "local_fleet, bookworm, local",
    }


def test_the_inventory_checks_each_hosts_own_keys(tmp_path: Path) -> None:
    fleet = Fleet(state_dir=tmp_path / "state", cache=tmp_path / "cache")
    for index, address in ((1, "10.213.0.11"), (2, "10.213.0.12")):
        host = fleet_hosts.TestHost(
            f"g4f-node{index}", index, address, str(tmp_path / f"h{index}"), "ve"
        )
        keys = host.root / "etc" / "ssh"
        keys.mkdir(parents=True)
        (keys / "ssh_host_ed25519_key.pub").write_text(f"ssh-ed25519 AAAAkey{index} root@base\n")
        (keys / "ssh_host_ed25519_key").write_text("private: never read\n")
        fleet.hosts[host.name] = host

    inventory = dict(fleet.inventory())

    known = tmp_path / "state" / "known_hosts"
    assert known.read_text() == (
        "10.213.0.11 ssh-ed25519 AAAAkey1\n10.213.0.12 ssh-ed25519 AAAAkey2\n"
    )
    for data in inventory.values():
        assert data["ssh_known_hosts_file"] == str(known)
        assert data["ssh_strict_host_key_checking"] == "yes"
    command = fleet.ssh_command(fleet.hosts["g4f-node2"], "true")
    assert f"UserKnownHostsFile={known}" in command and "StrictHostKeyChecking=yes" in command
