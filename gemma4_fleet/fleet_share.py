"""Once per fleet: which host compiles a build or fetches a model, and which get it from the
controller's cache instead.

Builds: hosts whose build id (commit + options + CUDA architectures) and distribution release are
the same can run the same binaries (a binary linked on Debian 13 needs its newer glibc, so the
release is part of the share key). Per key one host compiles (the host with `llama_builder:
true`, else the first of that key in the inventory); its finished build directory is packed
(tar.gz + sha256) into the controller's cache, `<cache>/builds/<key>.tar.gz` with `.tar.gz.sha256`,
and every other host of that key unpacks it from there.

Models: the key is the file's sha256. One host downloads it from its URL (resumable), the
controller copies it into `<cache>/models-shared/<sha256>/<file>`, and every other host gets it
from there, so the internet (or the mirror) is asked once per fleet, and never again while the
controller keeps it.

Either way a host that already holds the thing is never touched; when the cache lacks it but a
host holds it, that host's copy goes to the cache instead of compiling or fetching again. What
the cache holds is verified against its sha256 on the controller before it is sent, and again on
the host before it is used.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from gemma4_fleet.common import cache_dir, sha256_file

CONTROLLER_CACHE = "controller cache"


@dataclass(frozen=True)
class ShareHost:
    """What the share plan needs to know of one host (read at prepare time)."""

    name: str
    key: str  # builds: build id + release (share_key); models: the sha256
    installed: bool  # the build directory is complete / the model file is verified on the host
    marked: bool = False  # llama_builder: true


@dataclass(frozen=True)
class ShareRole:
    """One host's part in getting one build or model."""

    make: bool = False  # compile the build / download the model here
    publish: bool = False  # copy this host's build or model into the controller cache
    install: bool = False  # place it from the controller cache
    source: str = ""  # where it comes from: a host name or CONTROLLER_CACHE
    installed: bool = False  # complete on the host already (read once, for the whole fleet)


def builder_problems(hosts: Sequence[ShareHost]) -> list[str]:
    """Two hosts marked `llama_builder` for one build id and release: which one should compile
    is unclear. (One marked host per release of a mixed fleet is fine: each builds its own.)"""
    first: dict[str, str] = {}
    problems = []
    for h in hosts:
        if not h.marked:
            continue
        other = first.setdefault(h.key, h.name)
        if other != h.name:
            problems.append(
                f"host {h.name}: llama_builder: host {other} is already the builder of build "
                f"{h.key}; mark one host per build id and release"
            )
    return problems


def plan_sharing(hosts: Sequence[ShareHost], cached: Collection[str]) -> dict[str, ShareRole]:
    """The role of every host, for the keys in `cached` already in the controller cache.

    Inventory order decides ties: the first marked host, else the first host of a key.
    """
    groups: dict[str, list[ShareHost]] = {}
    for h in hosts:
        groups.setdefault(h.key, []).append(h)
    roles: dict[str, ShareRole] = {}
    for key, group in groups.items():
        needing = [h for h in group if not h.installed]
        holders = [h for h in group if h.installed]
        for h in holders:
            roles[h.name] = ShareRole(source=h.name, installed=True)
        if not needing:
            continue
        if key in cached:
            source = CONTROLLER_CACHE
        elif holders:
            publisher = next((h for h in holders if h.marked), holders[0])
            roles[publisher.name] = ShareRole(publish=True, source=publisher.name, installed=True)
            source = publisher.name
        else:
            builder = next((h for h in needing if h.marked), needing[0])
            roles[builder.name] = ShareRole(make=True, publish=True, source=builder.name)
            source = builder.name
        for h in needing:
            roles.setdefault(h.name, ShareRole(install=True, source=source))
    return roles


def share_key(build_id: str, os_release: Mapping[str, str]) -> str:
    """The build id plus the host's release (`/etc/os-release` ID and VERSION_ID)."""
    system = "".join(os_release.get(key) or "" for key in ("ID", "VERSION_ID"))
    return f"{build_id}-{system or 'unknown'}"


def artifact_path(build_id: str, cache: Path | None = None) -> Path:
    """`<cache>/builds/<build id>.tar.gz`; its checksum is the same path + `.sha256`."""
    return (cache or cache_dir()) / "builds" / f"{build_id}.tar.gz"


def model_artifact_path(sha256: str, file: str, cache: Path | None = None) -> Path:
    """`<cache>/models-shared/<sha256>/<file>`; its checksum is the same path + `.sha256`."""
    return (cache or cache_dir()) / "models-shared" / sha256 / file


def checksum_path(artifact: Path) -> Path:
    return artifact.with_name(artifact.name + ".sha256")


def is_cached(artifact: Path) -> bool:
    """Whether the cache holds this artifact (its checksum, written last, marks a whole one)."""
    return artifact.is_file() and checksum_path(artifact).is_file()


def recorded_sha256(artifact: Path) -> str:
    """The sha256 recorded for an artifact (`sha256sum` format: the first word)."""
    text = checksum_path(artifact).read_text().split()
    return text[0] if text else ""


def artifact_problem(artifact: Path) -> str | None:
    """Why a cached artifact must not be used (missing, or not what its checksum says), or None."""
    if not is_cached(artifact):
        return f"{artifact} (and its .sha256) is not in the controller cache"
    want = recorded_sha256(artifact)
    stat = artifact.stat()
    got = _sha256_of(artifact, stat.st_size, stat.st_mtime_ns)
    if got != want:
        return (
            f"{artifact} is corrupt: its sha256 is {got}, {checksum_path(artifact).name} says "
            f"{want}; rejected (delete both files to have the build made again)"
        )
    return None


@lru_cache(maxsize=64)
def _sha256_of(path: Path, size: int, mtime_ns: int) -> str:
    """Hash a cached file once per run, not once per host it is sent to (size and mtime key it)."""
    return sha256_file(path)


def store_artifact(received: Path, want: str, artifact: Path) -> str | None:
    """Move a received artifact into the cache if its sha256 is `want`; why not, or None.

    The artifact is renamed into place first and its checksum file last (atomically), so a
    crash in between leaves no checksum and the artifact counts as absent.
    """
    got = sha256_file(received)
    if not want or got != want:
        received.unlink(missing_ok=True)
        return f"{artifact.name} arrived with sha256 {got}, the host packed {want or 'nothing'}"
    artifact.parent.mkdir(parents=True, exist_ok=True)
    os.replace(received, artifact)
    tmp = checksum_path(artifact).with_suffix(".tmp")
    tmp.write_text(f"{want}  {artifact.name}\n")
    os.replace(tmp, checksum_path(artifact))
    return None
