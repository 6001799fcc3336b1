"""Once per fleet: three fresh hosts, one compile and one model download between them.

Uses its own fleet ("g4s", 10.213.2.0/24) and its own, empty controller cache (G4F_CACHE), so it
runs beside the default fleet and starts with no artifact and no model. A compile is counted by
its build log on the host, not by its duration, so the hosts keep the harness's shared ccache
(as the demo does): the one compile takes about a minute instead of a cold 6-30 minutes, and a
second compile would still show up. The model fetches are counted in the mirror's request log.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gemma4_fleet.testfleet.hosts import Fleet
from gemma4_fleet.testfleet.inventory import demo_data
from tests.fleet.conftest import PyinfraRun, http, run_pyinfra

pytestmark = pytest.mark.fleet
BUILDS = "/opt/llama.cpp/builds"
BUILDER = "g4s-node2"  # marked llama_builder: not the first host, so the mark is what counts


@pytest.fixture(scope="module")
def scale_fleet() -> Iterator[Fleet]:
    fleet = Fleet(name="g4s", network=2)
    fleet.up(3)
    yield fleet
    fleet.down()


def inventory(fleet: Fleet, path: Path) -> str:
    data = demo_data(fleet.mirror_url, fleet.mirror_commit)
    hosts: list[tuple[str, dict[str, Any]]] = [
        (name, {**ssh, **data, "llama_builder": name == BUILDER}) for name, ssh in fleet.inventory()
    ]
    path.write_text(f"hosts = {hosts!r}\n")
    return str(path)


def compiled_on(fleet: Fleet) -> list[str]:
    """Hosts where cmake ran: the build writes its log under /opt/llama.cpp/build/."""
    return [
        name
        for name in fleet.hosts
        if fleet.ssh(name, "ls /opt/llama.cpp/build/*.log", check=False).returncode == 0
    ]


def builds(fleet: Fleet, name: str) -> list[str]:
    return fleet.ssh(name, f"ls -A {BUILDS}").stdout.split()


def changed_hosts(run: PyinfraRun, *words: str) -> int:
    """Hosts on which the operations whose names hold all of `words` changed something."""
    return sum(count for op, count in run.changed().items() if all(w in op for w in words))


def model_fetches(fleet: Fleet) -> dict[str, list[tuple[str, str]]]:
    """Each model URL path of the demo, and who asked the mirror for it (hosts, not the
    controller's header reads from the bridge address)."""
    models = demo_data(fleet.mirror_url, fleet.mirror_commit)["llama_models"].values()
    paths = {m["url"].removeprefix(fleet.mirror_url) for m in models}
    return {
        p: [(ip, r) for ip, r in fleet.mirror_requests(p) if ip != fleet.gateway] for p in paths
    }


def test_one_compile_then_artifact_and_tampered_artifact_rejected(
    scale_fleet: Fleet, tmp_path: Path
) -> None:
    cache = tmp_path / "controller-cache"
    # Progress lines every second (the least): a ccache-warm compile takes only seconds.
    env = {"G4F_CACHE": str(cache), "G4F_PROGRESS_INTERVAL": "1"}
    inv = inventory(scale_fleet, tmp_path / "scale_inventory.py")
    names = list(scale_fleet.hosts)

    first = run_pyinfra("deploys/gemma4_mtp.py", inventory=inv, env=env)
    assert first.returncode == 0, first.output[-4000:]
    assert compiled_on(scale_fleet) == [BUILDER]
    # The compile reported its progress while it ran (ninja's [n/m] lines from its log).
    steps = [
        line
        for line in first.output.splitlines()
        if BUILDER in line and "llama.cpp build" in line and " step " in line and "%)" in line
    ]
    assert steps, first.output[-3000:]
    assert changed_hosts(first, "llama.cpp", "into the controller cache") == 1
    assert changed_hosts(first, "llama.cpp", "from the controller cache") == 2
    # One model download for the fleet: the first host fetches, the others get the copy.
    first_host = scale_fleet.hosts[names[0]].address
    fetched = model_fetches(scale_fleet)
    assert fetched and all(asked == [(first_host, "-")] for asked in fetched.values()), fetched
    assert changed_hosts(first, ".gguf into the controller cache") == 1
    assert changed_hosts(first, ".gguf from the controller cache") == 2
    shared = list((cache / "models-shared").rglob("*.gguf"))
    assert len(shared) == len(fetched)
    (build_id,) = builds(scale_fleet, BUILDER)
    build_dir = f"{BUILDS}/{build_id}"
    info = {n: scale_fleet.ssh(n, f"cat {build_dir}/BUILD-INFO").stdout for n in names}
    assert len(set(info.values())) == 1 and f"id={build_id}" in info[BUILDER]
    for name in names:
        assert builds(scale_fleet, name) == [build_id]
        scale_fleet.ssh(name, f"test -f {build_dir}/.gemma4-fleet-owned")  # prune may delete it
    props = {n: http(scale_fleet, n, "/props").json()["build_info"] for n in names}
    assert len(set(props.values())) == 1, props
    assert scale_fleet.mirror_commit[:7] in props[BUILDER]
    # One artifact per build id and release (a build for Debian 13 would not run on Debian 12).
    release = scale_fleet.ssh(BUILDER, ". /etc/os-release && echo $ID$VERSION_ID").stdout.strip()
    assert release == "debian12", release
    artifact = cache / "builds" / f"{build_id}-{release}.tar.gz"
    assert sorted(p.name for p in (cache / "builds").iterdir()) == [
        artifact.name,
        f"{artifact.name}.sha256",
    ]
    recorded = (cache / "builds" / f"{artifact.name}.sha256").read_text().split()[0]
    assert hashlib.sha256(artifact.read_bytes()).hexdigest() == recorded

    # A corrupt artifact on the controller; one host has lost its build (its server still runs
    # from the deleted binary). The rerun refuses the artifact by checksum and changes nothing.
    good = tmp_path / "good.tar.gz"
    shutil.copyfile(artifact, good)
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0xFF
    artifact.write_bytes(bytes(data))
    lost = "g4s-node3"
    scale_fleet.ssh(lost, f"rm -rf {build_dir}")
    tampered = run_pyinfra("deploys/gemma4_mtp.py", inventory=inv, env=env)
    assert tampered.returncode != 0
    assert f"host {lost}: llama.cpp build {build_id}:" in tampered.output
    assert "is corrupt" in tampered.output and "rejected" in tampered.output
    assert builds(scale_fleet, lost) == []  # nothing half-unpacked
    assert compiled_on(scale_fleet) == [BUILDER]  # and no compile instead
    for name in names:
        if name != lost:
            assert builds(scale_fleet, name) == [build_id]
        assert http(scale_fleet, name, "/props").json()["build_info"] == props[name]

    # The good artifact back: the host takes it from the cache, still without compiling.
    shutil.copyfile(good, artifact)
    healed = run_pyinfra("deploys/gemma4_mtp.py", inventory=inv, env=env)
    assert healed.returncode == 0, healed.output[-4000:]
    assert changed_hosts(healed, "llama.cpp", "from the controller cache") == 1
    assert changed_hosts(healed, "into the controller cache") == 0
    assert changed_hosts(healed, ".gguf from the controller cache") == 0
    assert model_fetches(scale_fleet) == fetched  # the mirror was not asked again
    assert compiled_on(scale_fleet) == [BUILDER]
    assert builds(scale_fleet, lost) == [build_id]
    assert http(scale_fleet, lost, "/props").json()["build_info"] == props[BUILDER]
