"""A fleet of real Debian test hosts on this machine: systemd-nspawn, overlayfs, one netns each.

Every host boots systemd as PID 1 from an overlay over the cached base image of its Debian
release (bookworm or trixie; a fleet may mix them), lives in its own
network namespace (veth into a bridge on 10.213.0.0/24), runs sshd with a generated key and
fetches llama.cpp and models from mirrors served on the bridge address. Everything made is
recorded in a state file as it is made, so a crashed run is cleaned up by the next one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from gemma4_fleet.common import cache_dir
from gemma4_fleet.testfleet import assets
from gemma4_fleet.testfleet.base import RELEASES, SUITE, BaseRecipe, ensure_base
from gemma4_fleet.testfleet.mirrors import git_mirror

# Fleet "g4f" (the default) uses 10.213.0.0/24, a second fleet e.g. 10.213.1.0/24 (never 10.214:
# that range may belong to a CEO-side fleet on a shared machine).
FIRST_HOST_OCTET = 11
MAX_HOSTS = 254 - FIRST_HOST_OCTET + 1
MIRROR_PORT = 8765
# Where the shared ccache appears inside every host (bind-mounted), so host 2 reuses host 1's work.
# One cache per release (outside: `<cache>/ccache-<release>`): bookworm's gcc 12 and trixie's
# gcc 14 never hit each other's entries, and apart neither evicts the other.
HOST_CCACHE_DIR = "/var/cache/g4f-ccache"
REQUIRED_TOOLS = ("debootstrap", "systemd-nspawn", "ip", "ssh", "ssh-keygen", "mount", "git")


class FleetError(RuntimeError):
    """The fleet could not be brought up or taken down; the message says which part."""


@dataclass
class TestHost:
    name: str
    index: int
    address: str
    dir: str
    veth: str
    pid: int = 0
    boot_seconds: float = 0.0
    release: str = SUITE

    @property
    def root(self) -> Path:
        return Path(self.dir) / "root"

    @property
    def netns(self) -> str:
        return self.name


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise FleetError(f"{' '.join(cmd)} failed: {result.stderr.strip()}")
    return result


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _terminate(pid: int, must_contain: str, timeout: float = 30.0) -> None:
    """Stop one process of ours: SIGTERM (nspawn powers the container off), then SIGKILL."""
    if not pid or must_contain not in " ".join(_cmdline(pid)):
        return
    with suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _cmdline(pid):
        with suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.2)
    if _cmdline(pid):
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with suppress(ChildProcessError):
            os.waitpid(pid, 0)


def host_releases(count: int, releases: Sequence[str]) -> list[str]:
    """The release of each of `count` hosts, taking `releases` in turn; unknown names refused."""
    releases = [releases] if isinstance(releases, str) else list(releases)
    unknown = [r for r in releases if r not in RELEASES]
    if not releases or unknown:
        raise FleetError(
            f"release {', '.join(map(repr, unknown or ['']))} is not one of {', '.join(RELEASES)}"
        )
    return [releases[i % len(releases)] for i in range(count)]


class Fleet:
    """Create, stop, restart and tear down test hosts; hand back a pyinfra inventory."""

    def __init__(
        self,
        name: str = "g4f",
        network: int = 0,
        state_dir: Path | None = None,
        cache: Path | None = None,
    ) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9]{1,5}", name) or not 0 <= network <= 255:
            raise FleetError(
                f"fleet name {name!r} must be 2-6 lowercase letters/digits and "
                f"network 0-255 (got {network})"
            )
        self.prefix, self.bridge_name = name, f"{name}-br0"
        self.subnet = f"10.213.{network}"
        self.gateway = f"{self.subnet}.1"
        self.mirror_url = f"http://{self.gateway}:{MIRROR_PORT}"
        default_state = "/var/lib/gemma4-fleet" + ("" if name == "g4f" else f"-{name}")
        self.state_dir = state_dir or Path(os.environ.get("G4F_STATE", default_state))
        self.cache = cache or cache_dir()
        self.state_file = self.state_dir / "state.json"
        self.key = self.state_dir / "id_ed25519"
        self.hosts: dict[str, TestHost] = {}
        self.mirror_pid = 0
        self.mirror_commit = ""
        self._load()

    # -- state ----------------------------------------------------------------------------
    def _load(self) -> None:
        if not self.state_file.exists():
            return
        data = json.loads(self.state_file.read_text())
        self.hosts = {h["name"]: TestHost(**h) for h in data.get("hosts", [])}
        self.mirror_pid = data.get("mirror_pid", 0)
        self.mirror_commit = data.get("mirror_commit", "")

    def _save(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        data = {
            "hosts": [asdict(h) for h in self.hosts.values()],
            "mirror_pid": self.mirror_pid,
            "mirror_commit": self.mirror_commit,
            "mirror_url": self.mirror_url,
            "ssh_key": str(self.key),
        }
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(self.state_file)

    # -- up -------------------------------------------------------------------------------
    def up(
        self,
        count: int,
        releases: Sequence[str] = (SUITE,),
        recipe: BaseRecipe | None = None,
    ) -> list[TestHost]:
        """Boot `count` hosts (tearing down leftovers first) and wait until each answers SSH.

        Host i runs `releases[(i - 1) % len(releases)]`: one release for all, or e.g.
        ("bookworm", "trixie") for a mixed fleet. `recipe` (packages) applies to every release.
        """
        if not isinstance(count, int) or count < 1:
            raise FleetError(f"host count must be at least 1, got {count!r}")
        if count > MAX_HOSTS:
            raise FleetError(
                f"host count {count} does not fit the address plan {self.subnet}.0/24 "
                f"(at most {MAX_HOSTS} hosts from .{FIRST_HOST_OCTET})"
            )
        per_host = host_releases(count, releases)
        self._preflight()
        self.down()
        try:
            base = {
                release: ensure_base(self.cache, replace(recipe or BaseRecipe(), suite=release))
                for release in dict.fromkeys(per_host)
            }
            self._mirrors()
            self._network()
            self._ssh_key()
            started = [
                self._create(i, base[release], release) for i, release in enumerate(per_host, 1)
            ]
            for host in started:
                self._wait_ssh(host)
        except BaseException:
            self.down()
            raise
        return started

    def _preflight(self) -> None:
        if os.geteuid() != 0:
            raise FleetError("the test fleet needs root (nspawn, overlay mounts, netns)")
        missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
        if missing:
            raise FleetError(f"missing tools: {', '.join(missing)} (run scripts/setup.sh)")

    def _mirrors(self) -> None:
        root = self.state_dir / "mirror"
        shutil.rmtree(root, ignore_errors=True)
        (root / "models").mkdir(parents=True)
        repo, self.mirror_commit = git_mirror(
            assets.llama_cpp_source(), self.cache / "mirror", assets.LLAMA_CPP_UPSTREAM_COMMIT
        )
        (root / "llama.cpp.git").symlink_to(repo)
        model = assets.gemma3_270m_path()
        (root / "models" / model.name).symlink_to(model)
        self._save()

    def add_mirror_file(self, path: Path) -> str:
        """Serve one more file from the model mirror; returns its URL."""
        link = self.state_dir / "mirror" / "models" / path.name
        link.unlink(missing_ok=True)
        link.symlink_to(path.resolve())
        return f"{self.mirror_url}/models/{path.name}"

    def mirror_requests(self, path: str) -> list[tuple[str, str]]:
        """(client address, Range header or "-") of each request for `path` the mirror served
        since the fleet came up, oldest first."""
        log = self.state_dir / "mirror.log"
        lines = log.read_text().splitlines() if log.is_file() else []
        return [
            (fields[0], fields[3])
            for fields in (line.split() for line in lines)
            if len(fields) == 5 and fields[2] == path
        ]

    def _network(self) -> None:
        _run("ip", "link", "add", self.bridge_name, "type", "bridge")
        _run("ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge_name)
        _run("ip", "link", "set", self.bridge_name, "up")
        log = (self.state_dir / "mirror.log").open("w")
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gemma4_fleet.testfleet.mirrors",
                str(self.state_dir / "mirror"),
                "--bind",
                self.gateway,
                "--port",
                str(MIRROR_PORT),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.mirror_pid = proc.pid
        self._save()

    def _ssh_key(self) -> None:
        if not self.key.exists():
            _run(
                "ssh-keygen",
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                "gemma4-fleet",
                "-f",
                str(self.key),
            )

    def _create(self, index: int, base: Path, release: str) -> TestHost:
        name = f"{self.prefix}-node{index}"
        host = TestHost(
            name=name,
            index=index,
            address=f"{self.subnet}.{FIRST_HOST_OCTET + index - 1}",
            veth=f"ve-{self.prefix}-{index}",
            dir=str(self.state_dir / "hosts" / name),
            release=release,
        )
        self.hosts[name] = host
        self._save()
        for sub in ("upper", "work", "root"):
            (Path(host.dir) / sub).mkdir(parents=True, exist_ok=True)
        _run(
            "mount",
            "-t",
            "overlay",
            "overlay",
            "-o",
            f"lowerdir={base},upperdir={host.dir}/upper,workdir={host.dir}/work",
            str(host.root),
        )
        (host.root / "etc" / "hostname").write_text(name + "\n")
        ssh_dir = host.root / "root" / ".ssh"
        ssh_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        (ssh_dir / "authorized_keys").write_text(self.key.with_suffix(".pub").read_text())
        _run("ssh-keygen", "-A", "-f", str(host.root))
        _run("ip", "netns", "add", host.netns)
        _run(
            "ip",
            "link",
            "add",
            host.veth,
            "type",
            "veth",
            "peer",
            "name",
            "host0",
            "netns",
            host.netns,
        )
        _run("ip", "link", "set", host.veth, "master", self.bridge_name)
        _run("ip", "link", "set", host.veth, "up")
        for cmd in (
            ("addr", "add", f"{host.address}/24", "dev", "host0"),
            ("link", "set", "host0", "up"),
            ("link", "set", "lo", "up"),
        ):
            _run("ip", "-n", host.netns, *cmd)
        self._boot(host)
        return host

    def _boot(self, host: TestHost) -> None:
        ccache = self.cache / f"ccache-{host.release}"
        ccache.mkdir(parents=True, exist_ok=True)
        log = (Path(host.dir) / "console.log").open("a")
        proc = subprocess.Popen(
            [
                "systemd-nspawn",
                "-q",
                "-D",
                str(host.root),
                "-M",
                host.name,
                "--boot",
                "--register=no",
                "--keep-unit",
                "--console=read-only",
                f"--network-namespace-path=/run/netns/{host.netns}",
                f"--bind={ccache}:{HOST_CCACHE_DIR}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        host.pid = proc.pid
        host.boot_seconds = -time.monotonic()
        self._save()

    def ssh_command(self, host: TestHost, *command: str) -> list[str]:
        return [
            "ssh",
            "-i",
            str(self.key),
            "-o",
            "BatchMode=yes",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            f"UserKnownHostsFile={self.known_hosts()}",
            "-o",
            "ConnectTimeout=3",
            f"root@{host.address}",
            *command,
        ]

    def known_hosts(self) -> Path:
        """A known_hosts file with the keys each host generated at its creation (read from its
        root), so SSH and pyinfra check host keys strictly instead of warning "No host key for
        ... found in known_hosts" on every connection."""
        lines = []
        for host in self.hosts.values():
            for pub in sorted((host.root / "etc" / "ssh").glob("ssh_host_*_key.pub")):
                kind, key = pub.read_text().split()[:2]
                lines.append(f"{host.address} {kind} {key}\n")
        path = self.state_dir / "known_hosts"
        text = "".join(lines)
        if not path.exists() or path.read_text() != text:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"known_hosts.{os.getpid()}.tmp")
            tmp.write_text(text)
            tmp.replace(path)
        return path

    def ssh(self, name: str, command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run one shell command on a host over real SSH."""
        result = subprocess.run(
            self.ssh_command(self.hosts[name], command),
            capture_output=True,
            text=True,
            check=False,
            timeout=600,
        )
        if check and result.returncode != 0:
            raise FleetError(f"{name}: `{command}` exited {result.returncode}: {result.stderr}")
        return result

    def _wait_ssh(self, host: TestHost, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _cmdline(host.pid):
                raise FleetError(f"{host.name}: systemd-nspawn exited; see {host.dir}/console.log")
            result = subprocess.run(
                self.ssh_command(host, "systemctl", "is-system-running", "--wait"),
                capture_output=True,
                text=True,
                check=False,
                timeout=120,
            )
            if result.stdout.strip() in ("running", "degraded"):
                host.boot_seconds += time.monotonic()
                self._save()
                return
            time.sleep(0.5)
        raise FleetError(f"{host.name}: no SSH answer within {timeout:.0f} s")

    # -- one host -------------------------------------------------------------------------
    def stop_host(self, name: str) -> None:
        """Power one host off (SIGTERM to its nspawn); its disk and address stay."""
        host = self.hosts[name]
        _terminate(host.pid, host.root.as_posix())
        host.pid = 0
        self._save()

    def start_host(self, name: str) -> None:
        """Boot a stopped host again from its overlay and wait for SSH."""
        host = self.hosts[name]
        if _cmdline(host.pid):
            raise FleetError(f"{name} is already running (pid {host.pid})")
        self._boot(host)
        self._wait_ssh(host)

    # -- down -----------------------------------------------------------------------------
    def down(self) -> None:
        """Tear down everything this harness made, from the state file and by our own names."""
        for host in list(self.hosts.values()):
            _terminate(host.pid, host.root.as_posix())
        self._sweep_processes()
        for mount in self._our_mounts():
            _run("umount", "-l", mount, check=False)
        for netns in _run("ip", "netns", "list", check=False).stdout.split():
            if netns.startswith(f"{self.prefix}-node"):
                _run("ip", "netns", "del", netns, check=False)
        for link in self.our_links():
            _run("ip", "link", "del", link, check=False)
        _terminate(self.mirror_pid, "gemma4_fleet.testfleet.mirrors", timeout=5)
        shutil.rmtree(self.state_dir / "hosts", ignore_errors=True)
        shutil.rmtree(self.state_dir / "mirror", ignore_errors=True)
        self.hosts, self.mirror_pid = {}, 0
        self.state_file.unlink(missing_ok=True)
        (self.state_dir / "known_hosts").unlink(missing_ok=True)

    def _sweep_processes(self) -> None:
        """nspawn processes of a crashed run whose state file was lost: matched by our root path."""
        ours = (self.state_dir / "hosts").as_posix() + "/"
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                argv = _cmdline(int(proc.name))
                if argv and argv[0].endswith("systemd-nspawn") and ours in " ".join(argv):
                    _terminate(int(proc.name), ours)

    def _our_mounts(self) -> list[str]:
        ours = (self.state_dir / "hosts").as_posix() + "/"
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
        return sorted((m for m in mounts if m.startswith(ours)), key=len, reverse=True)

    def our_links(self) -> list[str]:
        names = []
        for line in _run("ip", "-o", "link", "show", check=False).stdout.splitlines():
            name = line.split(":")[1].strip().split("@")[0]
            if name == self.bridge_name or name.startswith(f"ve-{self.prefix}-"):
                names.append(name)
        return names

    def leftovers(self) -> dict[str, list[str]]:
        """What of ours still exists on this machine (empty lists after a clean `down`)."""
        ours = (self.state_dir / "hosts").as_posix() + "/"
        procs = [
            p.name
            for p in Path("/proc").iterdir()
            if p.name.isdigit() and ours in " ".join(_cmdline(int(p.name)))
        ]
        netns = [
            n
            for n in _run("ip", "netns", "list", check=False).stdout.split()
            if n.startswith(f"{self.prefix}-node")
        ]
        return {
            "processes": procs,
            "mounts": self._our_mounts(),
            "links": self.our_links(),
            "netns": netns,
        }

    # -- pyinfra --------------------------------------------------------------------------
    def inventory(self) -> list[tuple[str, dict[str, Any]]]:
        """Hosts as pyinfra `(name, data)` pairs for the @ssh connector."""
        return [
            (
                host.name,
                {
                    "ssh_hostname": host.address,
                    "ssh_user": "root",
                    "ssh_key": str(self.key),
                    "ssh_strict_host_key_checking": "yes",
                    "ssh_known_hosts_file": str(self.known_hosts()),
                },
            )
            for host in self.hosts.values()
        ]
