"""Operations for llama.cpp hosts: each reads facts and yields only what differs."""

from __future__ import annotations

import hashlib
import logging
import posixpath
import re
from collections.abc import Generator
from io import StringIO
from pathlib import Path
from typing import Any

from pyinfra import host, state
from pyinfra.api import (
    FileDownloadCommand,
    FileUploadCommand,
    FunctionCommand,
    QuoteString,
    State,
    StringCommand,
    operation,
)
from pyinfra.api.host import Host
from pyinfra.api.util import get_template
from pyinfra.facts.files import File, Sha256File

from gemma4_fleet.common import sha256_file
from gemma4_fleet.config import HostConfig, ModelFile
from gemma4_fleet.facts import (
    FileDigests,
    GitHead,
    LlamaCppBuildInfo,
    LlamaServerFlags,
    ModelFileStamp,
    ServiceAccount,
    SystemdUnitStates,
    model_verified,
)
from gemma4_fleet.fleet_share import (
    CONTROLLER_CACHE,
    ShareRole,
    artifact_problem,
    checksum_path,
    is_cached,
    store_artifact,
)
from gemma4_fleet.host_checks import parse_passwd
from gemma4_fleet.host_scripts.prune import MARKER as OWNED_MARKER
from gemma4_fleet.progress import curl_progress, ninja_progress, with_progress
from gemma4_fleet.render import (
    BUILD_SCRIPT,
    DRAIN_SCRIPT,
    PLACE_MODEL_SCRIPT,
    PRUNE_SCRIPT,
    UNPACK_BUILD_SCRIPT,
    VERIFY_SCRIPT,
)

logger = logging.getLogger("gemma4_fleet")
Commands = Generator[
    StringCommand | FunctionCommand | FileUploadCommand | FileDownloadCommand, None, None
]


def _fail(state: State, host: Host, reason: str) -> bool:
    host.log_styled(reason, fg="red", log_func=logger.error)
    return False


def failure(reason: str) -> FunctionCommand:
    """A command that fails this host (only) with `reason`, for problems found while running."""
    return FunctionCommand(_fail, (reason,), {})


def _script(text: str, **values: str) -> StringCommand:
    """A `sh -c` script whose values arrive as quoted positional parameters, never pasted in."""
    names = list(values)
    prelude = "".join(f'{name}="${{{i}}}"; ' for i, name in enumerate(names, start=1))
    return StringCommand(
        "sh",
        "-c",
        QuoteString("set -eu; " + prelude + text),
        "g4f",
        *(QuoteString(values[name]) for name in names),
    )


def shipped(script: str, *values: str, interpreter: str = "sh") -> StringCommand:
    """Run a shipped host script (gemma4_fleet/host_scripts), each value one quoted word."""
    return StringCommand(
        interpreter, QuoteString(script), *(QuoteString(value) for value in values)
    )


@operation()
def fail(reason: str) -> Commands:
    """Fail this host with a clear reason and touch nothing.

    + reason: what is wrong, shown in red on that host
    """
    yield failure(reason)


@operation()
def source(src_dir: str, git_url: str, commit: str) -> Commands:
    """Check out `commit` of llama.cpp in `src_dir`, fetching only when HEAD differs.

    + src_dir: the git work tree (created if absent)
    + git_url: where to fetch from (GitHub or a mirror; dumb HTTP mirrors are handled)
    + commit: the 40-hex commit to check out
    """
    if host.get_fact(GitHead, path=src_dir) == commit:
        host.noop(f"llama.cpp source already at {commit[:12]}")
        return
    yield _script(
        'mkdir -p "$src"; cd "$src"; [ -d .git ] || git init -q .; '
        'git remote remove origin 2>/dev/null || true; git remote add origin "$url"; '
        # Fetch just the commit where the server allows it (GitHub), else every branch.
        'git fetch -q --depth 1 origin "$commit" 2>/dev/null || git fetch -q origin; '
        'git -c advice.detachedHead=false checkout -q --force --detach "$commit"',
        src=src_dir,
        url=git_url,
        commit=commit,
    )


def cmake_options(config: HostConfig) -> list[str]:
    """CMake cache options for a portable build of just the server tools."""
    options = [
        "-DCMAKE_BUILD_TYPE=Release",
        "-DGGML_NATIVE=OFF",
        "-DGGML_CCACHE=ON",
        "-DBUILD_SHARED_LIBS=OFF",  # one self-contained binary per build directory
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_BUILD_APP=OFF",
        "-DLLAMA_USE_PREBUILT_UI=OFF",  # the prebuilt UI download fails offline
    ]
    if config.build.cuda:
        archs = ";".join(str(a) for a in config.build.cuda_architectures or [])
        options += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={archs}"]
    else:
        options.append("-DGGML_CUDA=OFF")
    return options + list(config.build.cmake_flags)


@operation()
def build(config: HostConfig, role: ShareRole | None = None) -> Commands:
    """Build llama-server and llama-bench into the versioned directory of this config.

    The build happens in a scratch folder; only a finished build is renamed into place, so a
    failed build leaves the previous one (which the unit still points at) serving.

    + config: the host's validated configuration (commit, build options, install root)
    + role: this host's part in the fleet's build (None: compile here when missing); a host
      that gets the build from the controller cache compiles nothing
    """
    if role is not None and not role.make:
        if role.installed:
            host.noop(f"llama.cpp build {config.build_id} already installed")
        else:
            host.noop(f"llama.cpp build {config.build_id}: not compiled here (from {role.source})")
        return
    if host.get_fact(LlamaCppBuildInfo, build_dir=config.build_dir) is not None:
        host.noop(f"llama.cpp build {config.build_id} already installed")
        return
    root = config.build.install_root
    script = shipped(
        BUILD_SCRIPT,
        root,
        config.build_id,
        config.llamacpp.commit,
        " ".join(cmake_options(config)),
        str(config.build.jobs or ""),
        config.build.ccache_dir or "",
        OWNED_MARKER,
    )
    # ninja's [n/m] lines go to the build log: a progress line from there while it builds.
    yield with_progress(
        script,
        what=f"llama.cpp build {config.build_id}",
        log_path=f"{root}/build/{config.build_id}.log",
        parse=ninja_progress,
    )


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def _mkdir_local(state: State, host: Host, path: str) -> bool:
    Path(path).mkdir(parents=True, exist_ok=True)
    return True


def _store(state: State, host: Host, received: str, artifact: str, what: str, want: str) -> bool:
    """Controller side of publish_*: keep what arrived only if its sha256 is `want` (empty: the
    one the host computed, in `received.sha256`)."""
    sha_file = Path(f"{received}.sha256")
    if not want:
        want = sha_file.read_text().strip() if sha_file.is_file() else ""
    sha_file.unlink(missing_ok=True)
    problem = store_artifact(Path(received), want, Path(artifact))
    if problem:
        return _fail(state, host, f"host {host.name}: {what}: {problem}")
    return True


def _check_artifact(
    state: State, host: Host, artifact: str, what: str, source: str, unchanged: str
) -> bool:
    """Controller side of install_*: never send an artifact that fails its checksum."""
    problem = artifact_problem(Path(artifact))
    if problem is None:
        return True
    if not Path(artifact).is_file() and source != CONTROLLER_CACHE:
        problem += f" ({source}, which was to provide it, did not put it there: see that host)"
    return _fail(state, host, f"host {host.name}: {what}: {problem}; {unchanged}")


@operation()
def publish_build(config: HostConfig, role: ShareRole, artifact: str) -> Commands:
    """Pack this host's build directory (tar.gz + sha256) into the controller cache.

    The controller keeps the artifact only when the bytes that arrived have the sha256 the
    host computed; it is renamed into place, its checksum file last.

    + config: the host's validated configuration (build id, install root)
    + role: this host's part in the fleet's build; only a publishing host packs
    + artifact: the path in the controller cache (`<cache>/builds/<build id>.tar.gz`)
    """
    if not role.publish:
        return
    if is_cached(Path(artifact)):
        host.noop(f"llama.cpp build {config.build_id} already in the controller cache")
        return
    root = config.build.install_root
    packed = f"{root}/build/{config.build_id}.tar.gz"
    received = f"{artifact}.{_safe_name(host.name)}.partial"
    yield _script(
        'mkdir -p "$root/build"; tar -C "$root/builds/$id" -czf "$tmp" .; '
        'sha256sum <"$tmp" | cut -d" " -f1 >"$tmp.sha256"',
        root=root,
        id=config.build_id,
        tmp=packed,
    )
    yield FunctionCommand(_mkdir_local, (str(Path(artifact).parent),), {})
    yield FileDownloadCommand(f"{packed}.sha256", f"{received}.sha256")
    yield FileDownloadCommand(packed, received)
    yield FunctionCommand(_store, (received, artifact, "llama.cpp build artifact", ""), {})
    yield StringCommand("rm", "-f", QuoteString(packed), QuoteString(f"{packed}.sha256"))


@operation()
def install_build(config: HostConfig, role: ShareRole, artifact: str) -> Commands:
    """Place the build from the controller cache, verified, into builds/<id> atomically.

    The artifact is checked against its sha256 on the controller before it is sent and on the
    host before it is unpacked; it is unpacked into a scratch folder beside the builds and
    renamed into place, so a bad artifact changes nothing and the running build keeps serving.

    + config: the host's validated configuration (build id, install root)
    + role: this host's part in the fleet's build; only an installing host places it
    + artifact: the path in the controller cache (`<cache>/builds/<build id>.tar.gz`)
    """
    if not role.install:
        return
    if host.get_fact(LlamaCppBuildInfo, build_dir=config.build_dir) is not None:
        host.noop(f"llama.cpp build {config.build_id} already installed")
        return
    root = config.build.install_root
    upload = f"{root}/build/{config.build_id}.tar.gz"
    what, unchanged = f"llama.cpp build {config.build_id}", "the build it has keeps serving"
    yield FunctionCommand(_check_artifact, (artifact, what, role.source, unchanged), {})
    yield StringCommand("mkdir", "-p", QuoteString(f"{root}/build"), QuoteString(f"{root}/builds"))
    yield FileUploadCommand(artifact, upload)
    yield FileUploadCommand(str(checksum_path(Path(artifact))), f"{upload}.sha256")
    yield shipped(UNPACK_BUILD_SCRIPT, root, config.build_id, upload, OWNED_MARKER)


@operation()
def flags_known(binary: str, flags: list[str]) -> Commands:
    """Fail the host when the binary's --help does not list every flag the unit will use.

    + binary: the llama-server that the unit will run
    + flags: option names from the rendered argv
    """
    known = host.get_fact(LlamaServerFlags, binary=binary)
    if known is None:
        # Not built yet: this runs again at execution time, after the build.
        if state.is_executing:
            yield failure(f"{binary} is missing or does not run")
        return
    unknown = sorted(set(flags) - known)
    if unknown:
        yield failure(
            f"llama-server at {binary} does not know {', '.join(unknown)}: "
            "flag names change between llama.cpp versions; fix llama_server/extra_args"
        )
        return
    host.noop(f"all {len(set(flags))} flags known to {binary}")


@operation()
def model_file(dest: str, model: ModelFile, role: ShareRole | None = None) -> Commands:
    """Place a GGUF at `dest` from its URL or the controller's `local_path`, verified by sha256
    before it is moved into place.

    A download goes to `dest.partial` first; a file that does not match is deleted and the
    good file already at `dest` (if any) stays. A `dest.sha256` stamp (sha, size, mtime)
    saves re-hashing large files on every run.

    + dest: final path on the host
    + model: the catalogue entry (url or controller path, sha256, optional size)
    + role: this host's part in fetching the model once per fleet (None: fetch it here); a
      host that gets it from the controller cache (install_model) downloads nothing
    """
    # The fleet's plan read the stamp already (role.installed): no second round trip for it.
    if (role is not None and role.installed) or (
        role is None and model_verified(host.get_fact(ModelFileStamp, path=dest), model.sha256)
    ):
        host.noop(f"{dest} present and verified")
        return
    if role is not None and not role.make:
        host.noop(f"{model.file}: not downloaded here (from {role.source})")
        return
    if model.local_path:
        # files.put-style upload of the controller's copy to the partial path.
        yield from _upload(model.local_path, f"{dest}.partial")
        yield _place_model(dest, model)
        return
    # A download resumes with an HTTP Range request after a network error, a reboot or Ctrl-C;
    # curl's progress meter goes to a file that the progress lines are read from.
    yield with_progress(
        _place_model(dest, model, url=model.url),
        what=f"download {model.file}",
        log_path=f"{dest}.partial.progress",
        parse=curl_progress,
    )


@operation()
def publish_model(dest: str, model: ModelFile, role: ShareRole | None, artifact: str) -> Commands:
    """Copy this host's verified model into the controller cache, for the fleet's other hosts.

    The controller keeps it only when the bytes that arrived have the catalogue's sha256.

    + dest: the model's path on the host (placed and verified by model_file)
    + model: the catalogue entry (its sha256 is what the copy must hash to)
    + role: this host's part in fetching the model; only a publishing host copies
    + artifact: the path in the controller cache (`<cache>/models-shared/<sha256>/<file>`)
    """
    if role is None or not role.publish:
        return
    if is_cached(Path(artifact)):
        host.noop(f"{model.file} already in the controller cache")
        return
    received = f"{artifact}.{_safe_name(host.name)}.partial"
    yield FunctionCommand(_mkdir_local, (str(Path(artifact).parent),), {})
    yield FileDownloadCommand(dest, received)
    yield FunctionCommand(_store, (received, artifact, f"model {model.file}", model.sha256), {})


@operation()
def install_model(dest: str, model: ModelFile, role: ShareRole | None, artifact: str) -> Commands:
    """Place a model from the controller cache, verified on the controller before it is sent and
    on the host before it is moved into place (the model in service stays otherwise).

    + dest: final path on the host
    + model: the catalogue entry (sha256, optional size)
    + role: this host's part in fetching the model; only an installing host places it
    + artifact: the path in the controller cache (`<cache>/models-shared/<sha256>/<file>`)
    """
    if role is None or not role.install:
        return
    unchanged = "the model in service is untouched"
    what = f"model {model.file}"
    yield FunctionCommand(_check_artifact, (artifact, what, role.source, unchanged), {})
    yield from _upload(artifact, f"{dest}.partial")
    yield _place_model(dest, model)


def _place_model(dest: str, model: ModelFile, url: str | None = None) -> StringCommand:
    """Verify `dest.partial` (size, then sha256), downloaded from `url` or uploaded, and move it
    into place; a file already good at `dest` is kept (host_scripts/place_model.sh)."""
    size = str(model.size or "")
    return shipped(PLACE_MODEL_SCRIPT, dest, model.sha256, size, OWNED_MARKER, url or "")


def _upload(local_path: str, remote_path: str) -> Commands:
    yield StringCommand("mkdir", "-p", QuoteString(posixpath.dirname(remote_path)))
    yield FileUploadCommand(local_path, remote_path)


LKG_DIR = "/var/lib/gemma4-fleet/last-known-good"


@operation(is_idempotent=False)
def verify_or_roll_back(
    unit: str, health_url: str, timeout: int, smoke_unit: str | None, report: str
) -> Commands:
    """Accept a (re)started unit, or restore its last-known-good unit and fail the host.

    Accepted when /health answers 200 within `timeout` (503 "Loading model" is waited out) and
    the smoke check passes (or is skipped because a user holds the slot); the unit file then
    becomes the last-known-good (with its smoke unit). Otherwise the last-known-good units
    (whose binary and models are kept on disk) are put back and restarted, and the host fails
    with the reason. The logic is the shipped host script verify.py.

    + unit: the llama-server unit
    + health_url: e.g. http://127.0.0.1:8080/health
    + timeout: seconds to wait for health
    + smoke_unit: the oneshot smoke-check unit, or None to skip the smoke check
    + report: the smoke check's JSON report on the host
    """
    args = ["--unit", unit, "--health-url", health_url, "--timeout", str(timeout)]
    args += ["--lkg-dir", LKG_DIR]
    if smoke_unit:
        args += ["--smoke-unit", smoke_unit, "--report", report]
    yield shipped(VERIFY_SCRIPT, *args, interpreter="python3")


@operation()
def prune(install_root: str, models_dir: str, unit_glob: str) -> Commands:
    """Delete builds and model versions this tool made that no unit, live or last-known-good,
    refers to (the shipped host script prune.py; directories without our marker are kept).

    + install_root: holds builds/<id>
    + models_dir: holds <sha256 prefix>/<file>
    + unit_glob: the llama-server units, e.g. llama-server-*.service
    """
    args = ["--unit-glob", unit_glob, "--lkg-dir", LKG_DIR, f"{install_root}/builds", models_dir]
    yield shipped(PRUNE_SCRIPT, *args, interpreter="python3")


def _drain(
    state: State, host: Host, unit: str, url: str, timeout: int, key_files: list[str]
) -> bool:
    """Run the drain script on the host and show its lines (what it waited for) in the log."""
    command = shipped(
        DRAIN_SCRIPT,
        *("--unit", unit, "--url", url, "--timeout", str(timeout)),
        *(part for path in key_files for part in ("--api-key-file", path)),
        interpreter="python3",
    )
    ok, output = host.run_shell_command(command, _timeout=timeout + 120)
    for line in output.stdout_lines:
        host.log_styled(line, fg="cyan")
    if not ok:
        host.log_styled(f"{unit}: drain failed: {output.stderr}", fg="red", log_func=logger.error)
    return bool(ok)


@operation(is_idempotent=False)
def drain(unit: str, url: str, timeout: int, key_files: list[str] | None = None) -> Commands:
    """Wait (at most `timeout` s) until `unit` has no request in flight; log what it waited for.

    Runs before a restart or stop, so no user's generation is cut off. It never fails for a
    busy server: after the timeout the caller goes ahead (and the log says so).

    + unit: the llama-server unit
    + url: where the server answers on the host, e.g. http://127.0.0.1:8080
    + timeout: seconds to wait at most (`llama_drain.timeout_s`)
    + key_files: files on the host holding the server's API key (the first readable is used)
    """
    yield FunctionCommand(_drain, (unit, url, timeout, list(key_files or [])), {})


@operation()
def secret_file(src: str, dest: str) -> Commands:
    """Upload a key file that only root can read (0600 in a 0700 directory); its text is never
    shown or put on a command line. Services get it as a systemd credential.

    + src: the file on the controller
    + dest: the path on the host
    """
    want = hashlib.sha256(Path(src).read_bytes()).hexdigest()
    info = host.get_fact(File, path=dest)
    if (
        info
        and info.get("mode") == 600
        and info.get("user") == "root"
        and host.get_fact(Sha256File, path=dest) == want
    ):
        host.noop(f"{dest} up to date")
        return
    directory = posixpath.dirname(dest)
    tmp = f"{dest}.tmp"
    yield StringCommand(
        "install", "-d", "-m", "0700", "-o", "root", "-g", "root", QuoteString(directory)
    )
    yield StringCommand("rm", "-f", QuoteString(tmp))
    yield FileUploadCommand(src, tmp)
    yield StringCommand(
        "chown",
        "root:root",
        QuoteString(tmp),
        "&&",
        "chmod",
        "0600",
        QuoteString(tmp),
        "&&",
        "mv",
        "-f",
        QuoteString(tmp),
        QuoteString(dest),
    )


@operation()
def rendered_file(src: str, dest: str, mode: str = "644", **data: Any) -> Commands:
    """Render a Jinja template to `dest` atomically: written next to it, then renamed.

    A host that loses power or a controller interrupted mid-write leaves the old file or the
    new one at `dest`, never half of one (systemd would read a truncated unit at boot).

    + src: the template on the controller
    + dest: the file on the host (its directory is created)
    + mode: octal file mode
    """
    text = get_template(src, {"trim_blocks": True, "lstrip_blocks": True}).render(data)
    want = (mode.lstrip("0"), hashlib.sha256(text.encode()).hexdigest())
    if host.get_fact(FileDigests, paths=[dest]).get(dest) == want:
        host.noop(f"{dest} is up to date")
        return
    yield from _place_atomically(StringIO(text), dest, mode)


@operation()
def service_account(user: str, comment: str, home: str, shell: str) -> Commands:
    """A system account and its own group, created or corrected, read in one round trip
    (pyinfra's server.user and server.group read every account on the host: ~8 commands).

    + user: account and group name
    + comment: GECOS (the mark that the account is the tool's)
    + home: home directory (not created)
    + shell: login shell
    """
    passwd, group_line = host.get_fact(ServiceAccount, user=user)
    name = QuoteString(user)
    if group_line is None:
        yield StringCommand("groupadd", "--system", name)
    entry = parse_passwd(passwd) if passwd else None
    if entry is None:
        yield StringCommand(
            *("useradd", "--system", "--no-create-home", "--gid", name),
            *("--home-dir", QuoteString(home), "--shell", QuoteString(shell)),
            *("--comment", QuoteString(comment), name),
        )
        return
    wanted = {"home": home, "shell": shell, "comment": comment}
    have = {"home": entry.home, "shell": entry.shell, "comment": entry.gecos}
    changes = [
        word for key in wanted if have[key] != wanted[key] for word in (f"--{key}", wanted[key])
    ]
    gid = group_line.split(":")[2] if group_line else None
    if str(entry.gid) != gid:
        changes += ["--gid", user]
    if changes:
        yield StringCommand("usermod", *(QuoteString(word) for word in changes), name)
    elif group_line is not None:
        host.noop(f"account {user} is up to date")


@operation()
def unit_running(unit: str, read_with: list[str] | None = None) -> Commands:
    """Start a unit that is not running and enable one that is not enabled, reading both in
    one round trip (pyinfra's systemd.service takes two).

    + unit: full unit name ("x.service", "x.timer")
    + read_with: other units whose state the deploy reads too: one `systemctl show` for all
    """
    units = sorted({unit, *(read_with or [])})
    now = host.get_fact(SystemdUnitStates, units=units).get(unit)
    if now is None:
        yield failure(f"systemctl show gave no state for {unit}")
        return
    if not now.running:
        yield StringCommand("systemctl", "start", "--", QuoteString(unit))
    if not now.enabled:
        yield StringCommand("systemctl", "enable", "--", QuoteString(unit))
    if now.running and now.enabled:
        host.noop(f"{unit} is running and enabled")


@operation()
def shipped_files(files: dict[str, str], mode: str = "755") -> Commands:
    """Place controller files on the host (dest -> local src), each atomically, checking all of
    them in one round trip; only those whose content or mode differ are sent.

    + files: host path -> path on the controller
    + mode: octal file mode of every file
    """
    have = host.get_fact(FileDigests, paths=list(files))
    stale = [
        dest
        for dest, src in files.items()
        if have.get(dest) != (mode.lstrip("0"), sha256_file(Path(src)))
    ]
    if not stale:
        host.noop(f"{len(files)} files up to date")
        return
    for dest in stale:
        yield from _place_atomically(files[dest], dest, mode)


def _place_atomically(src: str | StringIO, dest: str, mode: str) -> Commands:
    """Upload next to `dest`, then chmod and rename: `dest` is the old file or the new one."""
    tmp = f"{dest}.g4f-new"
    yield StringCommand("mkdir", "-p", QuoteString(posixpath.dirname(dest)))
    yield FileUploadCommand(src, tmp)
    yield StringCommand(
        "chmod", mode, QuoteString(tmp), "&&", "mv", "-f", QuoteString(tmp), QuoteString(dest)
    )
