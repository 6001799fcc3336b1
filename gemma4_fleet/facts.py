"""Custom pyinfra facts: what a host has of llama.cpp, its models and its GPUs."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from typing import Any

from pyinfra.api import FactBase, FactProcessError, QuoteString, StringCommand

from gemma4_fleet.render import parse_help_flags

_MISSING = "G4F-MISSING"


def _single(output: list[str]) -> str | None:
    text = "\n".join(output).strip()
    return None if not text or text == _MISSING else text


class GitHead(FactBase[str | None]):
    """The commit checked out in a git work tree, or None when there is none."""

    def command(self, path: str) -> StringCommand:
        return StringCommand(
            "git",
            "-C",
            QuoteString(path),
            "rev-parse",
            "-q",
            "--verify",
            "HEAD",
            "2>/dev/null",
            "||",
            "echo",
            _MISSING,
        )

    def process(self, output: list[str]) -> str | None:
        return _single(output)


class LlamaCppBuildInfo(FactBase[dict[str, str] | None]):
    """The BUILD-INFO of an installed llama.cpp build directory (key=value lines), or None."""

    def command(self, build_dir: str) -> StringCommand:
        return StringCommand(
            "cat",
            QuoteString(f"{build_dir}/BUILD-INFO"),
            "2>/dev/null",
            "||",
            "echo",
            _MISSING,
        )

    def process(self, output: list[str]) -> dict[str, str] | None:
        if _single(output) is None:
            return None
        return dict(line.split("=", 1) for line in output if "=" in line)


class LlamaServerFlags(FactBase[set[str] | None]):
    """Option names the llama-server binary at `binary` lists in --help, or None if absent.

    Builds keep their --help in `<binary>.help`: reading it spares loading the binary and its
    libraries (CUDA's are hundreds of MB) on every run; a build without one runs --help.
    """

    def command(self, binary: str) -> StringCommand:
        # Only the lines parse_help_flags reads (those starting with "-"): 60 KB become 15.
        help_file = QuoteString(f"{binary}.help")
        return StringCommand(
            *("test", "-x", QuoteString(binary), "&&", "{", "if", "test", "-f", help_file, ";"),
            *("then", "grep", "-e", "'^-'", help_file, ";", "else", QuoteString(binary)),
            *("--help", "2>&1", "|", "grep", "-e", "'^-';", "fi;", "true;", "}"),
            *("||", "echo", _MISSING),
        )

    def process(self, output: list[str]) -> set[str] | None:
        if _single(output) is None:
            return None
        return parse_help_flags("\n".join(output))


class FileDigests(FactBase[dict[str, tuple[str, str]]]):
    """Octal mode and sha256 of each regular file in `paths` that exists, in one round trip
    (pyinfra's File + Sha256File take two per file)."""

    @staticmethod
    def default() -> dict[str, tuple[str, str]]:  # no output: none of them exists
        return {}

    def command(self, paths: list[str]) -> StringCommand:
        # The existing ones become "$@"; then one stat and one sha256sum for all of them.
        return StringCommand(
            *("set", "--;", "for", "f", "in", *(QuoteString(p) for p in paths), ";", "do"),
            *("[", "-f", '"$f"', "]", "&&", "set", "--", '"$@"', '"$f";', "done;"),
            *("[", '"$#"', "-eq", "0", "]", "||", "{", "stat", "-c", "'mode %a %n'", "--"),
            *('"$@"', "&&", "sha256sum", "--", '"$@";', "};", "true"),
        )

    def process(self, output: list[str]) -> dict[str, tuple[str, str]]:
        modes: dict[str, str] = {}
        digests: dict[str, str] = {}
        for line in output:
            if line.startswith("mode "):
                _, mode, path = line.split(" ", 2)
                modes[path] = mode
            elif re.fullmatch(r"[0-9a-f]{64}  .+", line):  # "\" first: an escaped name, unread
                digests[line[66:]] = line[:64]
        return {path: (modes[path], digest) for path, digest in digests.items() if path in modes}


class ModelFileStamp(FactBase[str | None]):
    """`<size> <mtime>` of a model file plus the stamp written when it was last verified."""

    def command(self, path: str) -> StringCommand:
        return StringCommand(
            "stat",
            "-c",
            "'%s %Y'",
            QuoteString(path),
            "2>/dev/null",
            "&&",
            "cat",
            QuoteString(f"{path}.sha256"),
            "2>/dev/null",
            "||",
            "echo",
            _MISSING,
        )

    def process(self, output: list[str]) -> str | None:
        text = " ".join(line.strip() for line in output if line.strip())
        return None if _MISSING in text or not text else text


def model_verified(stamp: str | None, sha256: str) -> bool:
    """Whether a ModelFileStamp says the file is `sha256`, unchanged since it was verified."""
    parts = (stamp or "").split()
    return len(parts) == 5 and parts[2] == sha256 and parts[0:2] == parts[3:5]


@dataclass(frozen=True)
class Gpu:
    index: int
    uuid: str
    name: str
    memory_total_mib: int
    memory_used_mib: int
    compute_cap: str

    @property
    def cuda_architecture(self) -> int:
        """CMAKE_CUDA_ARCHITECTURES value: compute capability 8.9 -> 89, 12.0 -> 120."""
        major, minor = self.compute_cap.split(".")
        return int(major) * 10 + int(minor)


NVIDIA_SMI_QUERY = "index,uuid,name,memory.total,memory.used,compute_cap"


def parse_nvidia_smi(output: list[str]) -> list[Gpu]:
    """Parse `nvidia-smi --query-gpu=<NVIDIA_SMI_QUERY> --format=csv,noheader,nounits`."""
    gpus = []
    for line in output:
        if not line.strip():
            continue
        parts = [part.strip() for part in line.split(",")]
        if (
            len(parts) != 6
            or not re.fullmatch(r"\d+\.\d+", parts[5])
            or not parts[1].startswith(("GPU-", "MIG-"))
        ):
            raise FactProcessError(f"unexpected nvidia-smi line: {line!r}")
        try:
            gpus.append(
                Gpu(int(parts[0]), parts[1], parts[2], int(parts[3]), int(parts[4]), parts[5])
            )
        except ValueError as exc:
            raise FactProcessError(f"unexpected nvidia-smi line: {line!r} ({exc})") from None
    return gpus


class NvidiaGpus(FactBase[list[Gpu]]):
    """One record per NVIDIA GPU (from nvidia-smi); empty on a host without NVIDIA tools."""

    @staticmethod
    def default() -> list[Gpu]:
        return []

    def requires_command(self, *args: Any, **kwargs: Any) -> str:
        return "nvidia-smi"

    def command(self) -> str:
        return f"nvidia-smi --query-gpu={NVIDIA_SMI_QUERY} --format=csv,noheader,nounits"

    def process(self, output: list[str]) -> list[Gpu]:
        return parse_nvidia_smi(output)


class CudaToolkit(FactBase[str | None]):
    """The CUDA compiler's release (e.g. "12.4"), looked up on PATH and in /usr/local/cuda."""

    def command(self) -> str:
        # (xargs -I does not replace the command name: nvcc is called through a variable.)
        return (
            "nvcc=$(command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null); "
            '[ -n "$nvcc" ] && "$nvcc" --version 2>/dev/null | grep -o \'release [0-9.]*\' '
            f"|| echo {_MISSING}"
        )

    def process(self, output: list[str]) -> str | None:
        text = _single(output)
        return text.removeprefix("release ") if text else None


class InstalledPackages(FactBase[set[str]]):
    """The packages dpkg has installed: one read answers every deploy's check (`dpkg-query`
    reads its whole database even for a few names; `dpkg -l` would send 30 KB, this 3)."""

    @staticmethod
    def default() -> set[str]:
        return set()

    def command(self) -> str:
        return "dpkg-query -W -f '${db:Status-Abbrev} ${Package}\\n'"

    def process(self, output: list[str]) -> set[str]:
        return {line.split()[-1] for line in output if line.startswith("ii ")}


class OsRelease(FactBase[dict[str, str]]):
    """`/etc/os-release` as a dict (ID, VERSION_ID, ...); empty where there is none."""

    @staticmethod
    def default() -> dict[str, str]:
        return {}

    def command(self) -> str:
        return "cat /etc/os-release 2>/dev/null; true"

    def process(self, output: list[str]) -> dict[str, str]:
        pairs = (line.partition("=") for line in output if "=" in line)
        return {key.strip(): value.strip().strip("\"'") for key, _, value in pairs}


class SystemdVersion(FactBase[int]):
    """systemd's major version (restart back-off settings need 254 or later)."""

    def command(self) -> str:
        return "systemctl --version"  # the first line is "systemd 252 (252.39-1~deb12u1)"

    def process(self, output: list[str]) -> int:
        match = re.match(r"systemd (\d+)", output[0] if output else "")
        if not match:
            raise FactProcessError(f"unexpected systemctl --version: {output!r}")
        return int(match.group(1))


@dataclass(frozen=True)
class UnitState:
    """Whether a unit runs (or, for a timer, waits) and starts at boot."""

    running: bool
    enabled: bool


class SystemdUnitStates(FactBase[dict[str, UnitState]]):
    """Each unit's SubState and UnitFileState in one `systemctl show` (pyinfra's systemd.service
    reads each with its own command; each systemctl process costs the host milliseconds)."""

    # pyinfra's SystemdStatus and SystemdEnabled count these as running and enabled
    RUNNING = ("running", "waiting", "exited", "listening", "mounted")
    ENABLED = ("enabled", "static")

    @staticmethod
    def default() -> dict[str, UnitState]:
        """No state read (a host lost mid-run): the operation fails that host alone."""
        return {}

    def command(self, units: list[str]) -> StringCommand:
        return StringCommand(
            "systemctl",
            "show",
            "--property",
            "Id,SubState,UnitFileState",
            "--",
            *(QuoteString(unit) for unit in units),
        )

    def process(self, output: list[str]) -> dict[str, UnitState]:
        """One block of properties per unit, separated by empty lines."""
        states: dict[str, UnitState] = {}
        block: dict[str, str] = {}
        for line in [*output, ""]:
            if line.strip():
                key, _, value = line.partition("=")
                block[key] = value
                continue
            if block:
                if "Id" not in block or "SubState" not in block:
                    raise FactProcessError(f"unexpected systemctl show output: {output!r}")
                states[block["Id"]] = UnitState(
                    block["SubState"] in self.RUNNING,
                    block.get("UnitFileState", "") in self.ENABLED,
                )
            block = {}
        return states


class SystemdUnitExists(FactBase[bool]):
    """Whether systemd knows a unit file of this name (installed, maybe stopped)."""

    def command(self, unit: str) -> StringCommand:
        return StringCommand(
            "systemctl",
            "cat",
            "--",
            QuoteString(unit),
            ">/dev/null",
            "2>&1",
            "&&",
            "echo",
            "yes",
            "||",
            "echo",
            "no",
        )

    def process(self, output: list[str]) -> bool:
        return _single(output) == "yes"


class ServiceAccount(FactBase[tuple[str | None, str | None]]):
    """`getent passwd NAME` and `getent group NAME` in one round trip: (passwd line, group line),
    each None if absent."""

    def command(self, user: str) -> StringCommand:
        name = QuoteString(user)
        return StringCommand(
            *("{", "getent", "passwd", "--", name, "||", "echo", _MISSING, ";", "}", ";"),
            *("{", "getent", "group", "--", name, "||", "echo", _MISSING, ";", "}"),
        )

    def process(self, output: list[str]) -> tuple[str | None, str | None]:
        if len(output) != 2:
            raise FactProcessError(f"expected a passwd and a group line, got {output!r}")
        passwd, group = (_single([line]) for line in output)
        return passwd, group


@dataclass(frozen=True)
class InstanceState:
    """A llama-server instance as it runs now, read without changing anything."""

    active: str  # `systemctl is-active`: active, inactive, failed, activating, ...
    main_pid: int | None
    health: int | None  # HTTP status of /health; None: no answer
    now: int | None  # the host's clock, for the report's age
    report_mtime: int | None
    report: dict[str, Any] | None  # the last smoke report (JSON), None when there is none
    gpu_mib: dict[int, int]  # nvidia-smi compute apps: pid -> MiB

    @property
    def report_age_s(self) -> int | None:
        if self.now is None or self.report_mtime is None:
            return None
        return max(0, self.now - self.report_mtime)

    @property
    def server_gpu_mib(self) -> int | None:
        """GPU memory the server process holds (None: not on a GPU, or no nvidia-smi)."""
        return self.gpu_mib.get(self.main_pid) if self.main_pid else None


_INSTANCE_STATE = (
    'unit="$1"; url="$2"; report="$3"; '
    'echo "active=$(systemctl is-active "$unit" 2>/dev/null)"; '
    'echo "pid=$(systemctl show -p MainPID --value "$unit" 2>/dev/null)"; '
    'echo "health=$(curl -s -o /dev/null -m 5 -w "%{http_code}" "$url" 2>/dev/null)"; '
    'echo "now=$(date +%s)"; '
    "if command -v nvidia-smi >/dev/null 2>&1; then "
    "nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits 2>/dev/null "
    '| sed "s/^/gpu=/"; fi; '
    'if [ -r "$report" ]; then echo "report_mtime=$(stat -c %Y "$report")"; '
    'printf "report="; tr -d "\\n" <"$report"; echo; fi; exit 0'
)


def parse_instance_state(output: list[str]) -> InstanceState:
    """The key=value lines of LlamaInstanceState's command."""
    values: dict[str, str] = {}
    gpu: dict[int, int] = {}
    for line in output:
        key, _, value = line.partition("=")
        if key == "gpu":
            pid, _, mib = value.partition(",")
            if pid.strip().isdigit() and mib.strip().isdigit():
                gpu[int(pid)] = int(mib)
        else:
            values[key] = value.strip()
    if "active" not in values:
        raise FactProcessError(f"unexpected instance state output: {output[:3]!r}")

    def number(key: str) -> int | None:
        text = values.get(key, "")
        return int(text) if text.isdigit() and int(text) > 0 else None

    report: dict[str, Any] | None = None
    if values.get("report"):
        try:
            loaded = json.loads(values["report"])
        except ValueError:
            loaded = None
        report = loaded if isinstance(loaded, dict) else {"status": "unreadable report"}
    return InstanceState(
        active=values["active"] or "unknown",
        main_pid=number("pid"),
        health=number("health"),  # curl says 000 when nothing answered
        now=number("now"),
        report_mtime=number("report_mtime"),
        report=report,
        gpu_mib=gpu,
    )


class LlamaInstanceState(FactBase[InstanceState]):
    """Unit state, /health, server GPU memory and the last smoke report of one instance."""

    def command(self, unit: str, health_url: str, report: str) -> StringCommand:
        return StringCommand(
            "sh",
            "-c",
            QuoteString(_INSTANCE_STATE),
            "g4f",
            QuoteString(unit),
            QuoteString(health_url),
            QuoteString(report),
        )

    def process(self, output: list[str]) -> InstanceState:
        return parse_instance_state(output)


MANAGED_MARKER = "# Managed by gemma4-fleet"
SYSTEMD_DIR = "/etc/systemd/system"
GPU_DROPIN_NAME = "gemma4-fleet-gpu.conf"


@dataclass(frozen=True)
class ManagedInstance:
    """An instance whose units this tool installed, as found on the host."""

    name: str
    files: tuple[str, ...]
    # From the server unit's ExecStart (None when only its smoke units are left).
    host: str | None
    port: int | None

    @property
    def unit(self) -> str:
        return f"llama-server-{self.name}.service"

    @property
    def local_url(self) -> str | None:
        if self.port is None:
            return None
        address = "127.0.0.1" if self.host in (None, "0.0.0.0", "::") else self.host
        return f"http://{address}:{self.port}"


@dataclass(frozen=True)
class ManagedFiles:
    """Unit files and drop-ins on a host whose first line carries this tool's marker."""

    instances: dict[str, ManagedInstance]
    gpu_dropins: dict[str, str]  # service unit -> drop-in path


_INSTANCE_FILE = re.compile(
    r"^/etc/systemd/system/llama-(?:server-(?P<server>[a-z0-9][a-z0-9-]*)\.service"
    r"|smoke-(?P<smoke>[a-z0-9][a-z0-9-]*)\.(?:service|timer))$"
)
_DROPIN_FILE = re.compile(
    r"^/etc/systemd/system/(?P<unit>[A-Za-z0-9:_.@-]+\.service)\.d/"
    + re.escape(GPU_DROPIN_NAME)
    + "$"
)


def _flag(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv[:-1]):
        if arg == name:
            return argv[i + 1]
    return None


def parse_managed_files(output: list[str]) -> ManagedFiles:
    """Lines `<path>\\t<ExecStart= line or empty>` -> our instances and GPU drop-ins.

    Files of other names are ignored, even with the marker: only names this tool renders can be
    removed by it.
    """
    files: dict[str, list[str]] = {}
    listen: dict[str, tuple[str | None, int | None]] = {}
    dropins: dict[str, str] = {}
    for line in output:
        path, _, exec_start = line.partition("\t")
        path = path.strip()
        if match := _INSTANCE_FILE.match(path):
            name = match.group("server") or match.group("smoke")
            files.setdefault(name, []).append(path)
            if match.group("server"):
                argv = exec_start.removeprefix("ExecStart=").split()
                port = _flag(argv, "--port")
                listen[name] = (
                    _flag(argv, "--host"),
                    int(port) if port and port.isdigit() else None,
                )
        elif match := _DROPIN_FILE.match(path):
            dropins[match.group("unit")] = path
    instances = {
        name: ManagedInstance(name, tuple(sorted(paths)), *listen.get(name, (None, None)))
        for name, paths in files.items()
    }
    return ManagedFiles(instances, dropins)


class ManagedUnitFiles(FactBase[ManagedFiles]):
    """This tool's llama-server/smoke units and GPU drop-ins on the host (by their marker)."""

    @staticmethod
    def default() -> ManagedFiles:
        return ManagedFiles({}, {})

    def command(self) -> str:
        # One awk for every candidate file (a loop of head | grep per file forked 4 per file).
        globs = (
            f"{SYSTEMD_DIR}/llama-server-*.service {SYSTEMD_DIR}/llama-smoke-*.service "
            f"{SYSTEMD_DIR}/llama-smoke-*.timer {SYSTEMD_DIR}/*.service.d/{GPU_DROPIN_NAME}"
        )
        awk = (
            'function done_file() { if (ours) print file "\\t" start } '
            'FNR == 1 { done_file(); file = FILENAME; start = ""; ours = index($0, m) == 1 } '
            'ours && start == "" && /^ExecStart=/ { start = $0 } '
            "END { done_file() }"
        )
        return (
            f'set --; for f in {globs}; do [ -f "$f" ] && set -- "$@" "$f"; done; '
            f"[ $# -eq 0 ] || awk -v m={shlex.quote(MANAGED_MARKER)} {shlex.quote(awk)} "
            '"$@"; true'
        )

    def process(self, output: list[str]) -> ManagedFiles:
        return parse_managed_files(output)


class UnverifiedUnits(FactBase[set[str]]):
    """Of `units`, those whose live file differs from its last-known-good copy.

    A deploy saves the copy only after the (re)started unit passed its checks, so a difference
    means a run was cut short (Ctrl-C, power loss) between writing a unit and verifying it: the
    process may still run the old command line. The next run restarts and verifies it.
    """

    @staticmethod
    def default() -> set[str]:
        return set()

    def command(self, units: list[str], lkg_dir: str) -> StringCommand:
        parts: list[Any] = []
        for unit in units:
            live, saved = f"{SYSTEMD_DIR}/{unit}", f"{lkg_dir}/{unit}"
            parts += [
                "{",
                "test",
                "!",
                "-f",
                QuoteString(live),
                "||",
                "cmp",
                "-s",
                QuoteString(live),
                QuoteString(saved),
                "||",
                "echo",
                QuoteString(unit),
                ";",
                "}",
                ";",
            ]
        return StringCommand(*parts, "true")

    def process(self, output: list[str]) -> set[str]:
        return {line.strip() for line in output if line.strip()}
