"""A GPU test host: one Debian bookworm host with systemd as PID 1 on a GPU machine without it.

Two halves (see ../shared/briefs/gpu-host.md and docs/gpu-proof.md):

* `build` runs on a Debian machine: the CPU fleet's base image (same recipe, plus what a GPU
  host needs), trimmed, packed as xz and split into parts that fit a 64 MiB transfer.
* `up` / `down` run on the GPU machine (root, cgroup2, no systemd, no `ip`): unpack, copy the
  driver's user-space libraries and `nvidia-smi` in, boot the root filesystem with its own
  `systemd-nspawn` (its own loader, private mount namespace, a cgroup of its own, host network,
  the NVIDIA device nodes and /usr/local/cuda bound in) and wait for sshd. `inventory()` hands
  the host to pyinfra like the CPU fleet's hosts.

Only the standard library (+ this package) is used: the GPU machine's python3 runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

from gemma4_fleet.testfleet.base import BaseRecipe, ensure_base

# What a GPU host needs beyond the CPU fleet's base image (which has sshd, python3, the build
# toolchain, curl and procps): its own systemd-nspawn to boot with, and udev (the groups and rules
# the NVIDIA nodes are usually set up with).
GPU_EXTRA_PACKAGES = ("systemd-container", "udev")
MACHINE = "g4f-gpuhost"
SSH_PORT = 2222  # host network: keep clear of a sshd the GPU machine may run on 22
PART_BYTES = 60 * 1024 * 1024
LIBDIR = "usr/lib/x86_64-linux-gnu"
LOADER = f"{LIBDIR}/ld-linux-x86-64.so.2"  # the real file: lib64/'s is an absolute link
# The driver's user-space libraries CUDA programs and nvidia-smi load (ldconfig -p names).
DRIVER_LIBS = (
    "libcuda.so",
    "libnvidia-ml.so",
    "libnvidia-ptxjitcompiler.so",
    "libnvidia-nvvm.so",
    "libnvidia-gpucomp.so",
)
DRIVER_TOOLS = ("nvidia-smi", "nvidia-modprobe")
# Trimmed from the image: nothing on a build/serve host reads them.
TRIM = (
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "usr/share/i18n",
    "usr/share/lintian",
    "usr/share/linda",
    "usr/share/bash-completion",
    "usr/share/zsh",
    "usr/share/fish",
    "usr/share/cmake-3.25/Help",
    "usr/share/perl/5.36.0/unicore/TestProp.pl",
    "usr/lib/python3.11/test",
    "usr/lib/python3.11/ensurepip",
    "usr/lib/python3.11/idlelib",
    "usr/lib/python3.11/lib2to3",
    "usr/lib/python3.11/pydoc_data",
    "var/cache/apt",
    "var/cache/debconf/templates.dat-old",
    "var/lib/apt/lists",
    "var/log",
    "usr/lib/gcc/x86_64-linux-gnu/12/lto1",  # no link-time optimisation in these builds
    "usr/lib/udev/hwdb.bin",  # udev does not run in a container
    "usr/lib/udev/hwdb.d",
    # Unused by a build of llama.cpp (cmake, gcc, g++, nvcc, shared system libraries).
    "usr/bin/x86_64-linux-gnu-lto-dump-12",
    "usr/bin/cpack",
    "usr/bin/ctest",
    "usr/lib/x86_64-linux-gnu/libc.a",
    "usr/lib/x86_64-linux-gnu/libm-2.36.a",
    "usr/lib/x86_64-linux-gnu/libcrypto.a",
    "usr/lib/x86_64-linux-gnu/libssl.a",
    "usr/lib/x86_64-linux-gnu/perl/5.36.0/auto/Encode/JP",
    "usr/lib/x86_64-linux-gnu/perl/5.36.0/auto/Encode/KR",
    "usr/lib/x86_64-linux-gnu/perl/5.36.0/auto/Encode/CN",
    "usr/lib/x86_64-linux-gnu/perl/5.36.0/auto/Encode/TW",
)
# Sanitizer runtimes (no -fsanitize in these builds).
TRIM_GLOBS = (
    "usr/lib/x86_64-linux-gnu/lib[atlu]san.so*",
    "usr/lib/x86_64-linux-gnu/libhwasan.so*",
    "usr/lib/x86_64-linux-gnu/libubsan.so*",
    "usr/lib/gcc/x86_64-linux-gnu/12/lib[atlu]san*.a",
    "usr/lib/gcc/x86_64-linux-gnu/12/libhwasan*.a",
    "usr/lib/gcc/x86_64-linux-gnu/12/libubsan*.a",
)


class GpuHostError(RuntimeError):
    """The GPU host could not be built, booted or reached; the message says which part."""


def _run(*cmd: str, check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)
    if check and result.returncode != 0:
        raise GpuHostError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr[-2000:]}")
    return result


# ---------------------------------------------------------------- build (the Debian machine)
def recipe() -> BaseRecipe:
    return BaseRecipe(extra_packages=GPU_EXTRA_PACKAGES)


def trim(root: Path) -> None:
    """Drop documentation, locales, caches and byte code (none of it is used on the host)."""
    for rel in TRIM:
        path = root / rel
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
            path.mkdir()
        elif path.exists() or path.is_symlink():
            path.unlink()
    for pattern in TRIM_GLOBS:
        for path in root.glob(pattern):
            path.unlink()
    for cache in list(root.glob("usr/lib/python3*/**/__pycache__")):
        shutil.rmtree(cache, ignore_errors=True)
    for archive in (root / "var/cache").glob("**/*.deb"):
        archive.unlink()


def customise(root: Path) -> None:
    """What the GPU host needs on top of the base image's customisation."""
    (root / "etc" / "hostname").write_text(MACHINE + "\n")
    # Host network: sshd on loopback only, on its own port.
    sshd = root / "etc" / "ssh" / "sshd_config.d"
    sshd.mkdir(parents=True, exist_ok=True)
    (sshd / "g4f.conf").write_text(
        f"Port {SSH_PORT}\nListenAddress 127.0.0.1\nUseDNS no\nPermitRootLogin prohibit-password\n"
    )
    # CUDA from the GPU machine appears at /usr/local/cuda (bound in at boot).
    (root / "etc" / "ld.so.conf.d" / "g4f-cuda.conf").write_text(
        "/usr/local/cuda/lib64\n/usr/local/cuda/targets/x86_64-linux/lib\n"
    )
    # Units that cannot work in a container on the host's network, or would fight the host's.
    for unit in ("systemd-networkd.service", "systemd-resolved.service", "apt-daily.timer"):
        mask = root / "etc" / "systemd" / "system" / unit
        if not mask.exists():
            mask.symlink_to("/dev/null")


def build(out: Path, cache: Path, part_bytes: int = PART_BYTES) -> list[Path]:
    """Build, trim and pack the GPU host's root filesystem into `out` (xz, split into parts).

    Returns the parts; `out/rootfs.json` records their sizes and the unpacked size.
    """
    base = ensure_base(cache / "gpuhost", recipe())
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("rootfs.tar.xz.*"):
        old.unlink()
    stage = cache / "gpuhost" / "stage"
    shutil.rmtree(stage, ignore_errors=True)
    _run("cp", "-a", f"{base}/.", str(stage))
    trim(stage)
    customise(stage)
    size = int(_run("du", "-sb", str(stage)).stdout.split()[0])
    tar = subprocess.Popen(
        ["tar", "-C", str(stage), "--numeric-owner", "-cf", "-", "."], stdout=subprocess.PIPE
    )
    xz = subprocess.Popen(["xz", "-9", "-T0", "-c"], stdin=tar.stdout, stdout=subprocess.PIPE)
    if tar.stdout is not None:
        tar.stdout.close()  # xz holds the pipe now
    split = subprocess.run(
        ["split", "-b", str(part_bytes), "-d", "-", str(out / "rootfs.tar.xz.")],
        stdin=xz.stdout,
        check=False,
    )
    if tar.wait() or xz.wait() or split.returncode:
        raise GpuHostError("packing the root filesystem failed (tar | xz | split)")
    parts = sorted(out.glob("rootfs.tar.xz.*"))
    (out / "rootfs.json").write_text(
        json.dumps(
            {
                "recipe": recipe().key,
                "unpacked_bytes": size,
                "parts": {p.name: p.stat().st_size for p in parts},
            },
            indent=2,
        )
        + "\n"
    )
    shutil.rmtree(stage, ignore_errors=True)
    return parts


# ---------------------------------------------------------------- the GPU machine
def parse_ldconfig(text: str, prefixes: tuple[str, ...] = DRIVER_LIBS) -> dict[str, str]:
    """`{soname: path}` of the x86-64 libraries in `ldconfig -p` whose name has a prefix."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        m = re.match(r"\s*(\S+) \(([^)]*)\) => (\S+)", line)
        if m and m.group(1).startswith(prefixes) and "x86-64" in m.group(2):
            found.setdefault(m.group(1), m.group(3))
    return found


def install_driver(root: Path) -> list[str]:
    """Copy the driver's user-space libraries and tools into the root filesystem; ldconfig there."""
    copied = []
    libdir = root / LIBDIR
    for soname, path in parse_ldconfig(_run("ldconfig", "-p").stdout).items():
        real = Path(path).resolve()
        shutil.copy2(real, libdir / real.name)
        if soname != real.name:
            (libdir / soname).unlink(missing_ok=True)
            (libdir / soname).symlink_to(real.name)
        copied.append(f"{soname} -> {real}")
    for tool in DRIVER_TOOLS:
        exe = shutil.which(tool)
        if exe:
            shutil.copy2(Path(exe).resolve(), root / "usr" / "bin" / tool)
            copied.append(f"{tool} <- {exe}")
    _run("chroot", str(root), "/sbin/ldconfig")
    return copied


def unpack(parts: list[Path], root: Path) -> None:
    """Unpack the split archive into `root` (emptied first)."""
    if not parts:
        raise GpuHostError("no root filesystem parts (rootfs.tar.xz.NN) given")
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    cat = subprocess.Popen(["cat", *map(str, parts)], stdout=subprocess.PIPE)
    untar = subprocess.run(
        ["tar", "-C", str(root), "--numeric-owner", "-xJf", "-"], stdin=cat.stdout, check=False
    )
    if cat.wait() or untar.returncode:
        raise GpuHostError(f"unpacking {parts[0].parent} into {root} failed")


def ssh_keys(root: Path, state: Path) -> Path:
    """Host keys and a fresh root login key, made with the root filesystem's own ssh-keygen."""
    for key in (root / "etc" / "ssh").glob("ssh_host_*"):
        key.unlink()
    _run("chroot", str(root), "ssh-keygen", "-A")
    (root / "root" / ".ssh").mkdir(mode=0o700, parents=True, exist_ok=True)
    inner = "/root/.ssh/g4f-controller"
    for f in (root / inner[1:], root / (inner[1:] + ".pub")):
        f.unlink(missing_ok=True)
    _run("chroot", str(root), "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", inner)
    state.mkdir(parents=True, exist_ok=True)
    key = state / "id_ed25519"
    shutil.move(root / inner[1:], key)
    key.chmod(0o600)
    pub = root / (inner[1:] + ".pub")
    (root / "root" / ".ssh" / "authorized_keys").write_text(pub.read_text())
    pub.unlink()
    return key


def device_binds() -> list[str]:
    """nspawn --bind options for every NVIDIA device node of this machine, /dev/nvidia-caps too."""
    nodes = sorted(Path("/dev").glob("nvidia*"))
    return [f"--bind={node}" for node in nodes]


def boot_command(root: Path, binds: list[str], cuda: str | None) -> list[str]:
    """The root filesystem's own systemd-nspawn, started through its own loader."""
    libpath = ":".join(str(root / d) for d in ("lib/x86_64-linux-gnu", LIBDIR, f"{LIBDIR}/systemd"))
    cmd = [
        str(root / LOADER),
        "--library-path",
        libpath,
        str(root / "usr/bin/systemd-nspawn"),
        "-q",
        "-D",
        str(root),
        "-M",
        MACHINE,
        "--boot",
        "--register=no",
        "--keep-unit",
        "--link-journal=no",  # the GPU machine has no machine-id
        "--console=read-only",
        "--capability=all",
        *binds,
    ]
    if cuda:
        cmd.append(f"--bind-ro={cuda}:/usr/local/cuda")
    return cmd


def _children(pid: int) -> list[int]:
    kids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with suppress(OSError):
                stat = (proc / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(proc.name))
    return kids


def _alive(pid: int) -> bool:
    return pid > 0 and Path(f"/proc/{pid}").exists()


class GpuHost:
    """The one GPU test host of this machine; its state lives in `state` (a directory)."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.file = state / "gpuhost.json"
        self.info: dict[str, Any] = json.loads(self.file.read_text()) if self.file.exists() else {}

    def _save(self) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        self.file.write_text(json.dumps(self.info, indent=2) + "\n")

    @property
    def root(self) -> Path:
        return Path(self.info.get("root") or self.state / "root")

    @property
    def leader(self) -> int:
        return int(self.info.get("leader", 0))

    def up(
        self,
        parts: list[Path],
        gpu: bool = True,
        timeout: float = 120.0,
        extra_binds: list[str] | None = None,
        reuse_root: bool = False,
    ) -> dict[str, Any]:
        """Unpack, install the driver, boot and wait for systemd and sshd; returns timings.

        reuse_root: boot the root filesystem already unpacked in the state directory.
        """
        self.down()
        t0 = time.monotonic()
        root = self.state / "root"
        if not (reuse_root and root.is_dir()):
            unpack(parts, root)
        t_unpack = time.monotonic() - t0
        driver = install_driver(root) if gpu else []
        key = ssh_keys(root, self.state)
        cuda = os.path.realpath("/usr/local/cuda") if Path("/usr/local/cuda").is_dir() else None
        binds = (device_binds() if gpu else []) + list(extra_binds or [])
        cmd = boot_command(root, binds, cuda)
        self.info = {"root": str(root), "key": str(key), "port": SSH_PORT, "driver": driver}
        self.info["boot_command"] = cmd
        self._save()
        t_boot = time.monotonic()
        self.info["nspawn"] = self._start(cmd)
        self._save()
        self.info["leader"] = self._wait_leader(timeout)
        self._save()
        running = self._wait_running(timeout)
        self.info["boot_s"] = round(time.monotonic() - t_boot, 2)
        self.run("ldconfig")  # /usr/local/cuda's libraries, bound in only now
        self._wait_ssh(timeout)
        self.info.update(
            unpack_s=round(t_unpack, 2),
            ssh_s=round(time.monotonic() - t_boot, 2),
            system_state=running,
        )
        self._save()
        return self.info

    def _start(self, cmd: list[str]) -> int:
        """nspawn in a private mount namespace, a new session and (cgroup2) a cgroup of its own."""
        pidfile = self.state / "nspawn.pid"
        pidfile.unlink(missing_ok=True)
        cgroup = Path("/sys/fs/cgroup")
        env = {**os.environ, "SYSTEMD_SECCOMP": "0"}
        prelude = 'echo $$ > "$1"; shift; '
        if (cgroup / "cgroup.controllers").exists():
            own = cgroup / "g4f-nspawn"
            prelude += f"mkdir -p {own}; echo $$ > {own}/cgroup.procs; "
            env["SYSTEMD_NSPAWN_UNIFIED_HIERARCHY"] = "1"
        log = (self.state / "console.log").open("a")
        subprocess.Popen(
            [
                "unshare",
                "-m",
                "--propagation",
                "private",
                "bash",
                "-c",
                prelude + 'exec "$@"',
                "g4f-boot",
                str(pidfile),
                *cmd,
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if pidfile.exists() and pidfile.read_text().strip():
                return int(pidfile.read_text())
            time.sleep(0.05)
        raise GpuHostError(f"systemd-nspawn did not start; see {self.state}/console.log")

    def _wait_leader(self, timeout: float) -> int:
        """The container's PID 1, as seen here: the child of nspawn running systemd."""
        nspawn = int(self.info["nspawn"])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _alive(nspawn):
                raise GpuHostError(f"systemd-nspawn exited; see {self.state}/console.log")
            for kid in _children(nspawn) + self._pid_ones():
                with suppress(OSError):
                    if Path(f"/proc/{kid}/comm").read_text().strip() == "systemd":
                        return kid
            time.sleep(0.05)
        raise GpuHostError(f"no systemd inside the container after {timeout:.0f} s")

    def _pid_ones(self) -> list[int]:
        """Processes that are PID 1 of a child PID namespace and live in this root."""
        found = []
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                with suppress(OSError):
                    status = (proc / "status").read_text()
                    nspid = next(ln for ln in status.splitlines() if ln.startswith("NSpid:"))
                    inner = nspid.split()[-1] == "1" and len(nspid.split()) > 2
                    if inner and os.readlink(proc / "root") == str(self.root):
                        found.append(int(proc.name))
        return found

    def enter(self, *command: str) -> list[str]:
        """argv that runs `command` inside the host (all its namespaces), for inspection."""
        return [
            "nsenter",
            "-t",
            str(self.leader),
            "-m",
            "-u",
            "-i",
            "-p",
            "-C",
            "-r",
            "-w",
            *command,
        ]

    def run(self, command: str, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.enter("sh", "-c", command),
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
        )

    def _wait_running(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        out = ""
        while time.monotonic() < deadline:
            out = self.run("systemctl is-system-running", timeout=30).stdout.strip()
            if out in ("running", "degraded"):
                return out
            time.sleep(0.1)
        raise GpuHostError(f"host not running after {timeout:.0f} s (last state {out!r})")

    def _wait_ssh(self, timeout: float) -> None:
        """A real SSH login (paramiko, as pyinfra uses) running `true`."""
        import paramiko  # the controller's dependency; only needed on this side

        deadline = time.monotonic() + timeout
        error: Exception | None = None
        while time.monotonic() < deadline:
            client = paramiko.SSHClient()
            client.set_missing_host_key_policy(paramiko.AutoAddPolicy())  # noqa: S507
            try:
                client.connect(
                    "127.0.0.1",
                    port=SSH_PORT,
                    username="root",
                    key_filename=self.info["key"],
                    timeout=3,
                    allow_agent=False,
                    look_for_keys=False,
                )
                _, stdout, _ = client.exec_command("hostname")
                self.info["ssh_hostname"] = stdout.read().decode().strip()
                return
            except Exception as exc:  # retried until the deadline
                error = exc
                time.sleep(0.2)
            finally:
                client.close()
        raise GpuHostError(f"no SSH answer on 127.0.0.1:{SSH_PORT}: {error}")

    def down(self) -> None:
        """Power the host off (SIGTERM to its nspawn), then SIGKILL what is left."""
        nspawn = int(self.info.get("nspawn", 0))
        if _alive(nspawn) and MACHINE in Path(f"/proc/{nspawn}/cmdline").read_text(
            errors="replace"
        ):
            with suppress(ProcessLookupError):
                os.kill(nspawn, signal.SIGTERM)
            deadline = time.monotonic() + 20
            while _alive(nspawn) and time.monotonic() < deadline:
                time.sleep(0.2)
            if _alive(nspawn):
                with suppress(ProcessLookupError):
                    os.kill(nspawn, signal.SIGKILL)
        self.info.pop("nspawn", None)
        self.info.pop("leader", None)
        if self.file.exists():
            self._save()

    def inventory(self) -> list[tuple[str, dict[str, Any]]]:
        """The host as a pyinfra `(name, data)` pair for the @ssh connector."""
        return [
            (
                MACHINE,
                {
                    "ssh_hostname": "127.0.0.1",
                    "ssh_port": int(self.info.get("port", SSH_PORT)),
                    "ssh_user": "root",
                    "ssh_key": self.info.get("key", str(self.state / "id_ed25519")),
                    "ssh_strict_host_key_checking": "no",
                    "ssh_known_hosts_file": "/dev/null",
                },
            )
        ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gemma4_fleet.testfleet.gpuhost")
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build and pack the root filesystem (Debian machine)")
    b.add_argument("out", type=Path)
    b.add_argument("--cache", type=Path, default=None)
    u = sub.add_parser("up", help="unpack and boot the GPU host (GPU machine)")
    u.add_argument("state", type=Path)
    u.add_argument("parts", type=Path, nargs="+")
    u.add_argument("--no-gpu", action="store_true", help="no driver, no device nodes (dry test)")
    d = sub.add_parser("down", help="power the GPU host off")
    d.add_argument("state", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.cmd == "build":
            from gemma4_fleet.common import cache_dir

            parts = build(args.out, args.cache or cache_dir())
            print("\n".join(f"{p} {p.stat().st_size}" for p in parts))
        elif args.cmd == "up":
            info = GpuHost(args.state).up(args.parts, gpu=not args.no_gpu)
            print(json.dumps({k: v for k, v in info.items() if k != "boot_command"}, indent=2))
        else:
            GpuHost(args.state).down()
    except GpuHostError as exc:
        print(f"gpuhost: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
