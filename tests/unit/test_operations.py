"""Operations from recorded facts to the commands they yield, each with a hostile value.

The operation generator runs as pyinfra runs it at prepare time, with a host whose facts are
recorded values: what matters is that an existing build/checkout/model yields nothing, and that
every value reaches the host as its own quoted word (`x; whoami`, a newline) and never as code.
The shipped host scripts (build, model placement) also run for real here, on a temp dir: the
package's copy, with the values the operation passes.
"""

from __future__ import annotations

import hashlib
import shlex
import subprocess
from collections.abc import Iterator
from importlib.resources import files as package_files
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pyinfra.api import FileUploadCommand, FunctionCommand, StringCommand
from pyinfra.context import ctx_host, ctx_state

from gemma4_fleet import operations as g4f
from gemma4_fleet.config import ModelFile, parse_host_config
from gemma4_fleet.facts import (
    FileDigests,
    GitHead,
    LlamaCppBuildInfo,
    LlamaServerFlags,
    ModelFileStamp,
    SystemdUnitStates,
    UnitState,
)
from gemma4_fleet.host_scripts.prune import MARKER
from gemma4_fleet.progress import ProgressCommand
from gemma4_fleet.render import BUILD_SCRIPT, PLACE_MODEL_SCRIPT, PRUNE_SCRIPT, VERIFY_SCRIPT
from tests.unit.test_config import host_data

pytestmark = pytest.mark.unit
HOSTILE = "/x; whoami\n$(id) `id` 'q' \"q\""
HOSTILE_PATH = HOSTILE.replace("\n", " ")  # paths in host data may not hold a newline
COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"


class RecordedHost:
    """A host whose facts are recorded values, keyed by fact class and arguments."""

    name = "box1"

    def __init__(self, facts: dict[tuple[type, tuple[tuple[str, Any], ...]], Any]) -> None:
        self.facts = facts
        self.noops: list[str] = []

    def get_fact(self, fact: type, **kwargs: Any) -> Any:
        return self.facts[(fact, _key(kwargs))]

    def noop(self, description: str) -> None:
        self.noops.append(description)


def fact(cls: type, value: Any, **kwargs: Any) -> dict[tuple[type, tuple[Any, ...]], Any]:
    return {(cls, _key(kwargs)): value}


def _key(kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """Fact arguments as a dict key (a list of paths becomes a tuple)."""
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items()))


def run_op(op: Any, host: RecordedHost, *, executing: bool = False, **kwargs: Any) -> list[Any]:
    """The commands an operation yields for this host (pyinfra's `_inner` generator)."""
    with ctx_state.use(SimpleNamespace(is_executing=executing)), ctx_host.use(host):
        return list(op._inner(**kwargs))


def words(command: StringCommand | ProgressCommand) -> list[str]:
    """The command as the remote shell splits it (a long one runs with progress lines)."""
    if isinstance(command, ProgressCommand):
        command = command.command
    return shlex.split(command.get_raw_value())


def script_words(command: StringCommand | ProgressCommand) -> tuple[str, list[str]]:
    """(script, its positional values) of a `sh -c SCRIPT g4f VALUES...` command."""
    sh, dash_c, script, name, *values = words(command)
    assert (sh, dash_c, name) == ("sh", "-c", "g4f")
    return script, values


def shipped_words(command: StringCommand | ProgressCommand) -> tuple[str, list[str]]:
    """(host script, its values) of a `sh SCRIPT VALUES...` command."""
    sh, script, *values = words(command)
    assert sh == "sh"
    return script, values


def run_here(command: StringCommand | ProgressCommand) -> subprocess.CompletedProcess[str]:
    """A shipped-script command run on this machine: the package's copy, the same values."""
    script, values = shipped_words(command)
    local = package_files("gemma4_fleet") / "host_scripts" / Path(script).name
    return subprocess.run(["sh", str(local), *values], capture_output=True, text=True, check=False)


@pytest.fixture
def config() -> Iterator[Any]:
    data = host_data(
        llamacpp={"git_url": f"https://mirror{HOSTILE}", "commit": COMMIT},
        llamacpp_build={"cuda_architectures": [89]},
    )
    config = parse_host_config("box1", data)
    # Host data refuses such directories (tests/unit/test_bad_input.py); the operations must
    # quote them anyway, so they are put past validation here.
    build = config.build.model_copy(update={"ccache_dir": HOSTILE_PATH, "install_root": "/opt/l l"})
    yield config.model_copy(update={"build": build})


def test_source_fetches_only_when_head_differs(config: Any) -> None:
    src = "/opt/l l/src"
    at_commit = RecordedHost(fact(GitHead, COMMIT, path=src))
    assert run_op(g4f.source, at_commit, src_dir=src, git_url="u", commit=COMMIT) == []
    assert at_commit.noops == [f"llama.cpp source already at {COMMIT[:12]}"]

    elsewhere = RecordedHost(fact(GitHead, "f" * 40, path=src))
    url = config.llamacpp.git_url
    (command,) = run_op(g4f.source, elsewhere, src_dir=src, git_url=url, commit=COMMIT)
    script, values = script_words(command)
    assert values == [src, url, COMMIT]
    assert "whoami" not in script and "$(id)" not in script
    assert script.startswith('set -eu; src="${1}"; url="${2}"; commit="${3}"; ')


def test_build_runs_only_without_an_installed_build(config: Any) -> None:
    installed = RecordedHost(
        fact(LlamaCppBuildInfo, {"commit": COMMIT}, build_dir=config.build_dir)
    )
    assert run_op(g4f.build, installed, config=config) == []
    assert installed.noops == [f"llama.cpp build {config.build_id} already installed"]

    missing = RecordedHost(fact(LlamaCppBuildInfo, None, build_dir=config.build_dir))
    (command,) = run_op(g4f.build, missing, config=config)
    options = " ".join(g4f.cmake_options(config))
    assert shipped_words(command) == (
        BUILD_SCRIPT,
        ["/opt/l l", config.build_id, COMMIT, options, "", HOSTILE_PATH, MARKER],
    )


def test_flags_known_fails_the_host_on_an_unknown_flag() -> None:
    binary = f"{HOSTILE}/llama-server"
    host = RecordedHost(fact(LlamaServerFlags, {"--port", "--ctx-size"}, binary=binary))
    assert run_op(g4f.flags_known, host, binary=binary, flags=["--port", "--ctx-size"]) == []
    assert host.noops == [f"all 2 flags known to {binary}"]
    (failure,) = run_op(g4f.flags_known, host, binary=binary, flags=["--port", "--draft-max"])
    assert isinstance(failure, FunctionCommand)
    assert failure.args == (f"llama-server at {binary} does not know --draft-max: "
                            "flag names change between llama.cpp versions; fix "
                            "llama_server/extra_args",)  # fmt: skip
    # not built yet: nothing to check at prepare time, a failure at execution
    unbuilt = RecordedHost(fact(LlamaServerFlags, None, binary=binary))
    assert run_op(g4f.flags_known, unbuilt, binary=binary, flags=["--port"]) == []
    (missing,) = run_op(g4f.flags_known, unbuilt, executing=True, binary=binary, flags=["--port"])
    assert missing.args == (f"{binary} is missing or does not run",)


def test_verify_or_roll_back_passes_each_value_as_one_argument() -> None:
    host = RecordedHost({})
    (command,) = run_op(
        g4f.verify_or_roll_back,
        host,
        unit="llama-server-x; whoami.service",
        health_url="http://127.0.0.1:8080/health\n",
        timeout=900,
        smoke_unit="llama-smoke-x.service",
        report=HOSTILE,
    )
    assert words(command) == [
        "python3", VERIFY_SCRIPT,
        "--unit", "llama-server-x; whoami.service",
        "--health-url", "http://127.0.0.1:8080/health\n",
        "--timeout", "900",
        "--lkg-dir", g4f.LKG_DIR,
        "--smoke-unit", "llama-smoke-x.service",
        "--report", HOSTILE,
    ]  # fmt: skip
    (no_smoke,) = run_op(
        g4f.verify_or_roll_back, host, unit="u", health_url="h", timeout=1, smoke_unit=None,
        report="r",
    )  # fmt: skip
    assert "--smoke-unit" not in words(no_smoke)


def test_prune_passes_each_value_as_one_argument() -> None:
    (command,) = run_op(
        g4f.prune, RecordedHost({}), install_root=HOSTILE, models_dir="/m m",
        unit_glob="llama-server-*.service",
    )  # fmt: skip
    assert words(command) == [
        "python3", PRUNE_SCRIPT, "--unit-glob", "llama-server-*.service",
        "--lkg-dir", g4f.LKG_DIR, f"{HOSTILE}/builds", "/m m",
    ]  # fmt: skip


def _model(tmp_path: Path, content: bytes) -> ModelFile:
    source = tmp_path / "upload.gguf"
    source.write_bytes(content)
    return ModelFile(
        role="target",
        file="t.gguf",
        local_path=str(source),
        sha256=hashlib.sha256(b"GGUF good").hexdigest(),
    )


def _shell(command: StringCommand) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", "-c", command.get_raw_value()], capture_output=True, text=True, check=False
    )


def test_model_file_is_verified_before_it_is_moved_into_place(tmp_path: Path) -> None:
    dest = tmp_path / "x; whoami" / "$(id)" / "t.gguf"
    model = _model(tmp_path, b"GGUF good")
    stamp = f"9 100 {model.sha256} 9 100"
    placed = RecordedHost(fact(ModelFileStamp, stamp, path=str(dest)))
    assert run_op(g4f.model_file, placed, dest=str(dest), model=model) == []
    assert placed.noops == [f"{dest} present and verified"]

    host = RecordedHost(fact(ModelFileStamp, None, path=str(dest)))
    mkdir, upload, script = run_op(g4f.model_file, host, dest=str(dest), model=model)
    assert words(mkdir) == ["mkdir", "-p", str(dest.parent)]
    assert (upload.src, upload.dest) == (model.local_path, f"{dest}.partial")
    assert shipped_words(script) == (
        PLACE_MODEL_SCRIPT, [str(dest), model.sha256, "", MARKER, ""]
    )  # fmt: skip
    # the upload, then the script on this machine: a hostile path is a path, not code
    _shell(mkdir).check_returncode()
    Path(f"{dest}.partial").write_bytes(b"GGUF good")
    done = run_here(script)
    assert done.returncode == 0, done.stderr
    assert dest.read_bytes() == b"GGUF good" and (dest.parent / MARKER).is_file()
    assert (dest.parent / "t.gguf.sha256").read_text().startswith(model.sha256 + " 9 ")

    # a bad upload is deleted and the good file stays
    wrong = _model(tmp_path, b"GGUF evil")
    wrong = wrong.model_copy(update={"sha256": hashlib.sha256(b"GGUF new").hexdigest()})
    *_, script = run_op(g4f.model_file, host, dest=str(dest), model=wrong)
    Path(f"{dest}.partial").write_bytes(b"GGUF evil")
    done = run_here(script)
    assert done.returncode == 1 and "sha256 mismatch" in done.stderr
    assert dest.read_bytes() == b"GGUF good" and not Path(f"{dest}.partial").exists()


def test_shipped_files_are_checked_in_one_read_and_only_stale_ones_are_placed(
    tmp_path: Path,
) -> None:
    src = {name: tmp_path / name for name in ("a.py", "b.py", "c.py")}
    for name, path in src.items():
        path.write_text(f"# {name}\n")
    files = {f"/usr/local/lib/x y/{name}": str(path) for name, path in src.items()}
    digest = {dest: hashlib.sha256(Path(s).read_bytes()).hexdigest() for dest, s in files.items()}
    a, b, c = files
    have = {a: ("755", digest[a]), b: ("644", digest[b])}  # b: mode drifted; c: missing
    host = RecordedHost(fact(FileDigests, have, paths=list(files)))
    commands = run_op(g4f.shipped_files, host, files=files)
    uploads = [cmd for cmd in commands if isinstance(cmd, FileUploadCommand)]
    assert [(u.src, u.dest) for u in uploads] == [
        (files[b], f"{b}.g4f-new"),
        (files[c], f"{c}.g4f-new"),
    ]
    assert words(commands[-1]) == [
        "chmod",
        "755",
        f"{c}.g4f-new",
        "&&",
        "mv",
        "-f",
        f"{c}.g4f-new",
        c,
    ]
    fresh = {dest: ("755", digest[dest]) for dest in files}
    same = RecordedHost(fact(FileDigests, fresh, paths=list(files)))
    assert run_op(g4f.shipped_files, same, files=files) == []
    assert same.noops == ["3 files up to date"]


def test_file_digests_reads_mode_and_sha256_of_existing_files(tmp_path: Path) -> None:
    there = tmp_path / "it's here"
    there.write_bytes(b"unit text")
    there.chmod(0o640)
    script = tmp_path / "a script; $(id)"
    script.write_bytes(b"#!/bin/sh\n")
    script.chmod(0o755)
    command = FileDigests().command(paths=[str(there), str(tmp_path / "gone"), str(script)])
    done = _shell(command)
    assert done.returncode == 0, done.stderr
    assert FileDigests().process(done.stdout.splitlines()) == {
        str(there): ("640", hashlib.sha256(b"unit text").hexdigest()),
        str(script): ("755", hashlib.sha256(b"#!/bin/sh\n").hexdigest()),
    }
    assert _shell(FileDigests().command(paths=[str(tmp_path / "gone")])).stdout == ""
    # nothing printed (none of them exists): pyinfra gives the fact's default
    assert FileDigests.default() == {}


ACCOUNT = {
    "user": "llama",
    "comment": "gemma4-fleet service account",
    "home": "/nonexistent",
    "shell": "/usr/sbin/nologin",
}


def account(passwd: str | None, group: str | None) -> RecordedHost:
    from gemma4_fleet.facts import ServiceAccount

    return RecordedHost(fact(ServiceAccount, (passwd, group), user="llama"))


def test_service_account_is_created_with_its_group_when_absent() -> None:
    commands = [words(c) for c in run_op(g4f.service_account, account(None, None), **ACCOUNT)]
    assert commands == [
        ["groupadd", "--system", "llama"],
        [
            *("useradd", "--system", "--no-create-home", "--gid", "llama"),
            *("--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin"),
            *("--comment", "gemma4-fleet service account", "llama"),
        ],
    ]


def test_service_account_up_to_date_yields_nothing() -> None:
    host = account(
        "llama:x:999:998:gemma4-fleet service account:/nonexistent:/usr/sbin/nologin",
        "llama:x:998:",
    )
    assert run_op(g4f.service_account, host, **ACCOUNT) == []
    assert host.noops == ["account llama is up to date"]


def test_service_account_corrects_only_what_differs_each_value_one_word() -> None:
    hostile = {**ACCOUNT, "shell": HOSTILE_PATH}
    host = account(
        "llama:x:999:100:gemma4-fleet service account:/nonexistent:/bin/sh",
        "llama:x:998:",
    )
    [command] = run_op(g4f.service_account, host, **hostile)
    assert words(command) == ["usermod", "--shell", HOSTILE_PATH, "--gid", "llama", "llama"]
    host = account("llama:x:999:998:old:/home/llama:/usr/sbin/nologin", None)
    commands = [words(c) for c in run_op(g4f.service_account, host, **ACCOUNT)]
    assert commands == [
        ["groupadd", "--system", "llama"],
        [
            *("usermod", "--home", "/nonexistent", "--comment", "gemma4-fleet service account"),
            *("--gid", "llama", "llama"),
        ],
    ]


def test_unit_running_starts_and_enables_only_what_is_not_and_reads_once() -> None:
    units = ["a.service", "a.timer"]
    states = {
        "a.service": UnitState(running=False, enabled=True),
        "a.timer": UnitState(True, False),
    }
    host = RecordedHost(fact(SystemdUnitStates, states, units=units))
    (start,) = run_op(g4f.unit_running, host, unit="a.service", read_with=units)
    assert words(start) == ["systemctl", "start", "--", "a.service"]
    # the same read (same units, sorted) answers the other unit
    (enable,) = run_op(g4f.unit_running, host, unit="a.timer", read_with=["a.timer", "a.service"])
    assert words(enable) == ["systemctl", "enable", "--", "a.timer"]
    fine = {u: UnitState(running=True, enabled=True) for u in units}
    up = RecordedHost(fact(SystemdUnitStates, fine, units=units))
    assert run_op(g4f.unit_running, up, unit="a.timer", read_with=units) == []
    assert up.noops == ["a.timer is running and enabled"]
    # no state read (the host went away mid-run): this host fails, with the reason
    lost = RecordedHost(fact(SystemdUnitStates, SystemdUnitStates.default(), units=units))
    (failed,) = run_op(g4f.unit_running, lost, unit="a.timer", read_with=units)
    assert isinstance(failed, FunctionCommand)
    assert failed.args == ("systemctl show gave no state for a.timer",)
