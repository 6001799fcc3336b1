"""Packaged pyinfra deploys: toolchain, llama.cpp build, models and llama-server units."""

from __future__ import annotations

import json
import os
import time
import weakref
from importlib.resources import files as package_files
from pathlib import Path
from typing import Any, NamedTuple

from pyinfra import host, state
from pyinfra.api import OperationError, QuoteString, State, StringCommand, deploy
from pyinfra.api.operation import OperationMeta
from pyinfra.facts.deb import DebPackages
from pyinfra.facts.server import Groups
from pyinfra.operations import apt, files, python, server, systemd
from pyinfra.operations.util import any_changed

from gemma4_fleet import operations as g4f
from gemma4_fleet.config import (
    ConfigError,
    GpuService,
    HostConfig,
    Instance,
    host_data_of,
    parse_host_config,
)
from gemma4_fleet.facts import (
    CudaToolkit,
    Gpu,
    LlamaCppBuildInfo,
    NvidiaGpus,
    SystemdUnitExists,
    SystemdVersion,
)
from gemma4_fleet.render import (
    SMOKE_SCRIPT,
    SMOKE_STATE_DIR,
    exec_start,
    flags_of,
    server_argv,
    smoke_argv,
    smoke_report,
)
from gemma4_fleet.vram_plan import HostPlan, plan_fleet

BUILD_PACKAGES = [
    "cmake",
    "g++",
    "git",
    "ccache",
    "ninja-build",
    "pkg-config",
    "libssl-dev",
    "curl",
    "python3",
    "ca-certificates",
]
CUDA_TOOLKIT_PACKAGES = ["nvidia-cuda-toolkit"]
GPU_DROPIN = "gemma4-fleet-gpu.conf"
HEALTH_TIMEOUT_S = 900  # the drafter adds load time; a 12B pair from cold disk takes minutes


class HostSetup(NamedTuple):
    """One host's validated config, its VRAM plan and its GPUs (read once per run)."""

    config: HostConfig
    plan: HostPlan
    gpus: list[Gpu]


_configs: weakref.WeakKeyDictionary[State, dict[str, HostSetup]] = weakref.WeakKeyDictionary()


class FleetConfigError(ConfigError, OperationError):
    """Configuration errors of one or more hosts, raised before any host is touched."""


def template(name: str) -> str:
    return str(package_files("gemma4_fleet") / "templates" / name)


def fleet_configs() -> dict[str, HostSetup]:
    """Validated configuration and VRAM plan of every host in this run, computed once.

    The first host to ask validates them all, so one bad host stops the run before any
    operation; every host's errors are reported together, each naming host and field.
    """
    if state not in _configs:
        configs, errors = {}, []
        for each in state.inventory.get_active_hosts():
            try:
                configs[each.name] = parse_host_config(each.name, host_data_of(each.data.get))
            except ConfigError as exc:
                errors.append(str(exc))
        if errors:
            raise FleetConfigError(_invalid(errors))
        # nvidia-smi once per host and run; empty on a host without NVIDIA tools.
        gpus = {name: state.inventory.get_host(name).get_fact(NvidiaGpus) for name in configs}
        configs = {name: with_gpu_architectures(c, gpus[name]) for name, c in configs.items()}
        try:
            plans = plan_fleet(configs, gpus)
        except ConfigError as exc:
            raise FleetConfigError(_invalid([str(exc)])) from None
        _configs[state] = {
            name: HostSetup(configs[name], plans[name], gpus[name]) for name in configs
        }
    return _configs[state]


def _invalid(errors: list[str]) -> str:
    lines = [line for error in errors for line in error.splitlines()]
    return "invalid configuration\n  " + "\n  ".join(lines)


def host_config() -> HostSetup:
    return fleet_configs()[host.name]


@deploy("Build toolchain")
def toolchain(config: HostConfig, gpus: list[Gpu]) -> None:
    """Install missing build packages (no apt update when all are present: hosts may be offline).

    With CUDA, the driver and toolkit must be there; the toolkit is installed from the
    distribution only when `llamacpp_build.install_cuda_toolkit` says so. The driver is never
    touched.
    """
    installed = host.get_fact(DebPackages)
    wanted = BUILD_PACKAGES + (CUDA_TOOLKIT_PACKAGES if config.build.install_cuda_toolkit else [])
    missing = [name for name in wanted if name not in installed]
    if missing:
        apt.packages(
            name=f"Install {' '.join(missing)}", packages=missing, update=True, no_recommends=True
        )
    if not config.build.cuda:
        return
    if not gpus:
        g4f.fail(
            name="NVIDIA driver",
            reason=(
                f"host {host.name}: llamacpp_build.cuda is on but nvidia-smi finds no GPU "
                "(install the NVIDIA driver; this tool never touches it)"
            ),
        )
    elif host.get_fact(CudaToolkit) is None and not config.build.install_cuda_toolkit:
        g4f.fail(
            name="CUDA toolkit",
            reason=(
                f"host {host.name}: no nvcc (PATH, /usr/local/cuda); install the CUDA toolkit "
                "or set llamacpp_build.install_cuda_toolkit: true"
            ),
        )


def with_gpu_architectures(config: HostConfig, gpus: list[Gpu]) -> HostConfig:
    """Unset CUDA architectures become this host's GPUs' (build for them only: no PTX JIT).

    They are part of the build id, so a GPU of another generation means a new build.
    """
    if not config.build.cuda or config.build.cuda_architectures or not gpus:
        return config
    archs = sorted({gpu.cuda_architecture for gpu in gpus})
    build = config.build.model_copy(update={"cuda_architectures": archs})
    return config.model_copy(update={"build": build})


@deploy("llama.cpp build")
def llama_cpp(config: HostConfig) -> OperationMeta:
    """Check out the pinned commit and build it into builds/<commit-options>, once.

    Nothing is fetched or built when that build directory is already complete.
    """
    if config.build.cuda and not config.build.cuda_architectures:
        g4f.fail(
            name="CUDA architectures",
            reason=(
                f"host {host.name}: llamacpp_build.cuda_architectures is unset and no GPU was found"
            ),
        )
    root = config.build.install_root
    files.directory(name="llama.cpp install root", path=root, mode="755")

    def missing() -> bool:
        return host.get_fact(LlamaCppBuildInfo, build_dir=config.build_dir) is None

    g4f.source(
        name=f"llama.cpp source at {config.llamacpp.short}",
        src_dir=f"{root}/src",
        git_url=config.llamacpp.git_url,
        commit=config.llamacpp.commit,
        _if=missing,
    )
    return g4f.build(name=f"Build llama.cpp {config.build_id}", config=config)


@deploy("Models")
def models(config: HostConfig) -> list[OperationMeta]:
    """Place every model this host's instances use, sha256-verified."""
    files.directory(name="Models directory", path=config.models_dir, mode="755")
    by_path = {config.model_path(name): model for name, model in config.used_models().items()}
    return [
        g4f.model_file(name=f"Model {model.file}", dest=path, model=model)
        for path, model in by_path.items()
    ]


def gpu_uuid(gpu: str | None, gpus: list[Gpu]) -> str | None:
    """The UUID of a GPU given by index or UUID; None for no GPU, "" when it is not there.

    A UUID is taken as given on a host without NVIDIA tools (nothing to check it against).
    """
    if gpu is None:
        return None
    for each in gpus:
        if gpu in (str(each.index), each.uuid):
            return each.uuid
    return gpu if not gpus and gpu.startswith(("GPU-", "MIG-")) else ""


def no_gpu(gpu: str | None, gpus: list[Gpu]) -> str:
    have = ", ".join(f"{g.index} {g.uuid}" for g in gpus) or "none (no nvidia-smi)"
    return f"{gpu!r} is not a GPU of this host (have: {have})"


RENDER: dict[str, Any] = {
    "jinja_env_kwargs": {"trim_blocks": True, "lstrip_blocks": True},
    "mode": "644",
}


def service_basics(config: HostConfig) -> OperationMeta:
    """The service user and the smoke-check script every instance's units rely on."""
    server.group(name="Service group", group=config.service_user, system=True)
    server.user(
        name="Service user",
        user=config.service_user,
        group=config.service_user,
        system=True,
        home="/nonexistent",
        shell="/usr/sbin/nologin",
        create_home=False,
    )
    return files.put(
        name="Smoke check script",
        src=str(package_files("gemma4_fleet") / "smoke_check.py"),
        dest=SMOKE_SCRIPT,
        mode="755",
    )


@deploy("llama-server units")
def servers(
    config: HostConfig, plan: HostPlan, gpus: list[Gpu], changed: list[OperationMeta]
) -> list[OperationMeta]:
    """Render, check and (re)start one unit per instance; restart only on a change; verify.

    + plan: the host's VRAM plan (the context size each instance gets)
    + gpus: the host's GPUs (for CUDA_VISIBLE_DEVICES by UUID)
    + changed: build/model operations whose change must restart every instance
    """
    results = [service_basics(config)]
    for inst in config.instances:
        results += instance_unit(config, plan, inst, gpus, changed)
    return results


def instance_unit(
    config: HostConfig,
    plan: HostPlan,
    inst: Instance,
    gpus: list[Gpu],
    changed: list[OperationMeta],
) -> list[OperationMeta]:
    """One instance's unit, smoke units and timer; (re)start on change, then verify.

    A (re)started instance must answer /health and pass its smoke check, else its
    last-known-good unit is restored and the host fails. Returns what may have changed.
    """
    uuid = gpu_uuid(inst.gpu, gpus if config.build.cuda else [])
    if uuid == "":
        g4f.fail(
            name=f"GPU for {inst.name}",
            reason=f"host {host.name}: llama_instances[{inst.name}].gpu: {no_gpu(inst.gpu, gpus)}",
        )
        return []
    argv = server_argv(config, inst, ctx_size=plan.ctx_for(inst.name))
    g4f.flags_known(
        name=f"{inst.unit}: flags known to the build",
        binary=config.server_binary,
        flags=flags_of(argv),
    )
    unit = files.template(
        name=f"Unit {inst.unit}",
        src=template("llama-server.service.j2"),
        dest=f"/etc/systemd/system/{inst.unit}",
        instance=inst,
        exec_start=exec_start(argv),
        service_user=config.service_user,
        gpu_uuid=uuid,
        groups=[g for g in ("video", "render") if g in host.get_fact(Groups)],
        restart_backoff=host.get_fact(SystemdVersion) >= 254,
        models_dir=config.models_dir,
        **RENDER,
    )
    smoke = smoke_units(config, inst)
    systemd.daemon_reload(name=f"daemon-reload for {inst.unit}", _if=any_changed(unit, *smoke))
    if smoke:
        systemd.service(
            name=f"{inst.smoke_timer} enabled", service=inst.smoke_timer, running=True, enabled=True
        )
    # Errors here are judged (and rolled back) by the verification below.
    started = systemd.service(
        name=f"{inst.unit} enabled and running",
        service=inst.unit,
        running=True,
        enabled=True,
        _ignore_errors=True,
    )
    restarted = systemd.service(
        name=f"{inst.unit} restarted (unit, build or model changed)",
        service=inst.unit,
        restarted=True,
        _ignore_errors=True,
        _if=lambda: any_changed(unit, *changed)() and not started.did_change(),
    )
    verified = g4f.verify_or_roll_back(
        name=f"{inst.unit} healthy and smoke check passed",
        unit=inst.unit,
        health_url=f"{inst.local_url}/health",
        timeout=HEALTH_TIMEOUT_S,
        smoke_unit=inst.smoke_unit if smoke else None,
        report=smoke_report(inst, "json"),
        # After a (failed) start or restart, or when the smoke check itself changed.
        _if=lambda: (
            any(op.did_change() or op.did_error() for op in (started, restarted))
            or any_changed(*smoke)()
        ),
    )
    if smoke:
        files.get(
            name=f"{inst.unit} smoke report to the controller",
            src=smoke_report(inst, "json"),
            dest=str(report_dir() / host.name / f"{inst.name}.json"),
            create_local_dir=True,
            _if=verified.did_change,
        )
    return [unit, *smoke, started, restarted, verified]


@deploy("GPU services pinned")
def gpu_services(config: HostConfig, gpus: list[Gpu]) -> list[OperationMeta]:
    """Pin each listed GPU service (whisper, TTS) to its GPU with a drop-in; restart on change."""
    return [op for svc in config.gpu_services for op in pin_gpu_service(svc, gpus)]


def pin_gpu_service(svc: GpuService, gpus: list[Gpu]) -> list[OperationMeta]:
    """A drop-in setting CUDA_VISIBLE_DEVICES; the service's own unit is never touched."""
    uuid = gpu_uuid(svc.gpu, gpus)
    if not host.get_fact(SystemdUnitExists, unit=svc.unit):
        g4f.fail(
            name=f"GPU service {svc.unit}",
            reason=f"host {host.name}: gpu_services: {svc.unit} is not installed",
        )
        return []
    if not uuid:
        g4f.fail(
            name=f"GPU for {svc.unit}",
            reason=f"host {host.name}: gpu_services[{svc.unit}].gpu: {no_gpu(svc.gpu, gpus)}",
        )
        return []
    dropin = files.template(
        name=f"Drop-in {svc.unit}.d/{GPU_DROPIN}",
        src=template("gpu-pin.conf.j2"),
        dest=f"/etc/systemd/system/{svc.unit}.d/{GPU_DROPIN}",
        gpu_uuid=uuid,
        create_remote_dir=True,
        **RENDER,
    )
    systemd.daemon_reload(name=f"daemon-reload for {svc.unit}", _if=dropin.did_change)
    # try-restart: a service that is stopped stays stopped (it is not ours to start).
    server.shell(
        name=f"{svc.unit} restarted (drop-in changed)",
        commands=[StringCommand("systemctl", "try-restart", QuoteString(svc.unit))],
        _if=dropin.did_change,
    )
    return [dropin]


def smoke_units(config: HostConfig, inst: Instance) -> list[OperationMeta]:
    """The oneshot smoke-check service and its timer (the same check the deploy runs)."""
    if not config.smoke.enabled:
        return []
    timer = inst.smoke_timer
    service = files.template(
        name=f"Unit {inst.smoke_unit}",
        src=template("llama-smoke.service.j2"),
        dest=f"/etc/systemd/system/{inst.smoke_unit}",
        instance=inst,
        exec_start=exec_start(smoke_argv(config, inst)),
        state_dir=SMOKE_STATE_DIR,
        service_user=config.service_user,
        gpu=inst.gpu is not None,
        **RENDER,
    )
    timer_file = files.template(
        name=f"Unit {timer}",
        src=template("llama-smoke.timer.j2"),
        dest=f"/etc/systemd/system/{timer}",
        instance=inst,
        smoke=config.smoke,
        smoke_unit=inst.smoke_unit,
        **RENDER,
    )
    return [service, timer_file]


def report_dir() -> Path:
    """Where the controller collects smoke reports: ./out/smoke, or G4F_REPORT_DIR."""
    return Path(os.environ.get("G4F_REPORT_DIR", "out/smoke")).absolute()


@deploy("Gemma 4 + MTP llama-server")
def gemma4_mtp() -> None:
    """The whole job for one host: toolchain, build, models, units (config validated first)."""
    config, plan, gpus = host_config()
    toolchain(config, gpus)
    build = llama_cpp(config)
    placed = models(config)
    changed = servers(config, plan, gpus, changed=[build, *placed])
    gpu_services(config, gpus)
    g4f.prune(
        name="Unused builds and model versions",
        install_root=config.build.install_root,
        models_dir=config.models_dir,
        _if=any_changed(build, *placed, *changed),
    )
    since = time.time()
    python.call(
        name="Fleet smoke table",
        function=print_fleet_table,
        since=since,
        _run_once=True,
        _if=lambda: bool(collected_reports(since)),
    )


def collected_reports(since: float) -> list[Path]:
    """Smoke reports fetched to the controller by this run (hosts whose instances restarted)."""
    return [p for p in sorted(report_dir().glob("*/*.json")) if p.stat().st_mtime >= since]


def print_fleet_table(since: float) -> None:
    """One line per host/instance (re)started in this run: unit, model, build, health, smoke."""
    rows = []
    for path in collected_reports(since):
        r = json.loads(path.read_text())
        tps = (r.get("tokens_per_second") or {}).get("median")
        acceptance = r.get("acceptance")
        health = r.get("health") or {}
        rows.append(
            (
                path.parent.name,
                f"llama-server-{r.get('instance', path.stem)}",
                Path(r.get("model_path") or "-").name,
                r.get("build_info") or "-",
                "200" if health.get("ok") else str(health.get("status_code") or "down"),
                "-" if tps is None else f"{tps:.1f}",
                "-" if acceptance is None else f"{acceptance:.2f}",
                r.get("status", "?"),
            )
        )
    header = ("host", "unit", "model", "build", "health", "tok/s", "acceptance", "smoke")
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    print("--> Fleet smoke table")
    for row in [header, *rows]:
        print("    " + "  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)))


@deploy("Redeploy one unit")
def redeploy_unit(name: str) -> None:
    """Re-render and restart one llama-server instance or one pinned GPU service, nothing else.

    No build, no download, no other unit. A unit whose build is not installed fails its flag
    check, one whose model is not placed fails its health check and is rolled back: run the
    full deploy for those.

    + name: an instance name ("gemma4"), its unit, or a `gpu_services` unit
    """
    config, plan, gpus = host_config()
    if not name:
        raise FleetConfigError(f"host {host.name}: unit: say which, e.g. --data unit=gemma4")
    for inst in config.instances:
        if name in (inst.name, inst.unit, inst.unit.removesuffix(".service")):
            service_basics(config)
            instance_unit(config, plan, inst, gpus, changed=[])
            return
    for svc in config.gpu_services:
        if name in (svc.unit, svc.unit.removesuffix(".service")):
            pin_gpu_service(svc, gpus)
            return
    known = [i.name for i in config.instances] + [s.unit for s in config.gpu_services]
    raise FleetConfigError(
        f"host {host.name}: unit: {name!r} is neither a llama-server instance nor a GPU "
        f"service of this host (have: {', '.join(known)})"
    )
