"""The cached Debian base root filesystem that every test host boots from (as an overlay)."""

from __future__ import annotations

import fcntl
import hashlib
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

# The Debian releases a test host can run, oldest first. Both come from the same mirror and are
# verified with this machine's debian-archive-keyring (bookworm's 2023.3+deb12u2 already holds
# the trixie signing keys).
RELEASES = ("bookworm", "trixie")
SUITE = RELEASES[0]
# What a host needs: systemd as PID 1, sshd, python3 (pyinfra facts, the smoke check) and the
# toolchain llama.cpp builds with. The hosts have no route out, so it must all be in the image.
PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "openssh-server",
    "iproute2",
    "python3",
    "ca-certificates",
    "cmake",
    "g++",
    "make",
    "git",
    "ccache",
    "pkg-config",
    "libssl-dev",
    "ninja-build",
    "curl",
    "procps",
    # The smoke check writes its metrics with prometheus_client (the deploy installs it on real
    # hosts); node_exporter serves them to Prometheus in the monitoring fleet test.
    "python3-prometheus-client",
    "prometheus-node-exporter",
)
# Bump when the customisation in _customise changes: it is part of the cache key.
RECIPE_VERSION = "2"


class BaseBuildError(RuntimeError):
    """debootstrap or the customisation of the base image failed."""


@dataclass(frozen=True)
class BaseRecipe:
    suite: str = SUITE
    packages: tuple[str, ...] = PACKAGES
    extra_packages: tuple[str, ...] = field(default=())

    @property
    def key(self) -> str:
        text = "\n".join([RECIPE_VERSION, self.suite, *self.packages, *self.extra_packages])
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def apt_mirror(sources_dir: Path = Path("/etc/apt")) -> str:
    """The Debian mirror this machine's apt already uses (so debootstrap reaches the same one).

    Any release's main archive will do: one Debian mirror carries every release.
    """
    deb822 = sorted((sources_dir / "sources.list.d").glob("*.sources"))
    for path in deb822:
        for stanza in path.read_text().split("\n\n"):
            uris = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
            suites = re.search(r"^Suites:\s*(.+)$", stanza, re.M)
            if uris and suites and set(RELEASES) & set(suites.group(1).split()):
                return uris.group(1)
    one_line = sources_dir / "sources.list"
    if one_line.exists():
        for line in one_line.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb" and parts[2] in RELEASES:
                return parts[1]
    raise BaseBuildError(
        f"no apt source for Debian {' or '.join(RELEASES)} found under {sources_dir}"
    )


def _customise(root: Path) -> None:
    """Make the image bootable by nspawn and reachable over SSH with a per-host key."""
    # Each host generates its own sshd host keys at creation (see hosts.py).
    for key in (root / "etc" / "ssh").glob("ssh_host_*"):
        key.unlink()
    (root / "etc" / "machine-id").write_text("")
    (root / "etc" / "hostname").write_text("g4f-base\n")
    # No console login prompts on the container's console, just the services we need.
    getty = root / "etc" / "systemd" / "system" / "getty.target.wants"
    shutil.rmtree(getty, ignore_errors=True)
    wants = root / "etc" / "systemd" / "system" / "multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    ssh_unit = wants / "ssh.service"
    if not ssh_unit.is_symlink():
        ssh_unit.symlink_to("/lib/systemd/system/ssh.service")


def ensure_base(cache: Path, recipe: BaseRecipe | None = None, log: Path | None = None) -> Path:
    """Return the base rootfs for `recipe`, building it once (about 90 s) into `cache`.

    A failed build leaves nothing behind: it happens in a temporary folder renamed at the end.
    """
    recipe = recipe or BaseRecipe()
    if recipe.suite not in RELEASES:
        raise BaseBuildError(f"release {recipe.suite!r} is not one of {', '.join(RELEASES)}")
    final = cache / f"base-{recipe.suite}-{recipe.key}"
    if (final / ".g4f-complete").exists():
        return final
    cache.mkdir(parents=True, exist_ok=True)
    # Two runs wanting the same missing image (say a fleet test and a demo): one builds, the
    # other waits for it instead of deleting its half-built tree.
    with (cache / f"{final.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / ".g4f-complete").exists():
            return final
        _build(cache, recipe, final, log)
    return final


def _build(cache: Path, recipe: BaseRecipe, final: Path, log: Path | None) -> None:
    tmp = cache / f"{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(final, ignore_errors=True)
    log = log or cache / f"{final.name}.log"
    include = ",".join(recipe.packages + recipe.extra_packages)
    cmd = [
        "debootstrap",
        "--variant=minbase",
        f"--include={include}",
        recipe.suite,
        str(tmp),
        apt_mirror(),
    ]
    try:
        with log.open("w") as out:
            result = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False)
        if result.returncode != 0:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            raise BaseBuildError(
                f"debootstrap of the base image failed (exit {result.returncode}); "
                f"log {log}:\n{tail}"
            )
        _customise(tmp)
        (tmp / ".g4f-complete").write_text(recipe.key + "\n")
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    remove_stale_bases(cache, recipe.suite, final)


def overlay_lowerdirs(mounts: str) -> set[Path]:
    """Every lower directory of the overlay mounts in `mounts` (the text of /proc/mounts)."""
    found: set[Path] = set()
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 4 or fields[2] != "overlay":
            continue
        for option in fields[3].split(","):
            name, _, value = option.partition("=")
            if name in ("lowerdir", "lowerdir+", "datadir+"):
                # /proc/mounts writes spaces, commas, tabs and backslashes as octal escapes
                value = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), value)
                found.update(Path(part) for part in value.split(":") if part)
    return found


def remove_stale_bases(
    cache: Path, suite: str, keep: Path, mounts: str | None = None
) -> list[Path]:
    """Delete the other cached images of `suite`, except those a mounted overlay still uses.

    A host of a running fleet (this one or a named one, perhaps built by another version of
    this code) boots from its image as the overlay's lowerdir: deleting it under the host
    breaks it. Returns what was deleted.
    """
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return []  # cannot tell what is in use: keep everything
    in_use = {path.resolve() for path in overlay_lowerdirs(mounts)}
    removed = []
    for stale in sorted(cache.glob(f"base-{suite}-*")):
        if not stale.is_dir() or stale == keep or stale.name.endswith(".tmp"):
            continue
        if stale.resolve() in in_use:
            continue
        shutil.rmtree(stale, ignore_errors=True)
        removed.append(stale)
    return removed
