"""Packaged pyinfra deploys: toolchain, llama.cpp build, models and llama-server units."""

from __future__ import annotations

import weakref
from importlib.resources import files as package_files

from pyinfra import host, state
from pyinfra.api import OperationError, State, deploy
from pyinfra.api.operation import OperationMeta
from pyinfra.facts.deb import DebPackages
from pyinfra.facts.server import Groups
from pyinfra.operations import apt, files, server, systemd
from pyinfra.operations.util import any_changed

from gemma4_fleet import operations as g4f
from gemma4_fleet.command_line import exec_start, flags_of, server_argv
from gemma4_fleet.config import ConfigError, HostConfig, Instance, parse_host_config
from gemma4_fleet.facts import CudaToolkit, Gpu, LlamaCppBuildInfo, NvidiaGpus, SystemdVersion

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
HEALTH_TIMEOUT_S = 900  # the drafter adds load time; a 12B pair from cold disk takes minutes
_configs: weakref.WeakKeyDictionary[State, dict[str, HostConfig]] = weakref.WeakKeyDictionary()


class FleetConfigError(ConfigError, OperationError):
    """Configuration errors of one or more hosts, raised before any host is touched."""


def template(name: str) -> str:
    return str(package_files("gemma4_fleet") / "templates" / name)


def fleet_configs() -> dict[str, HostConfig]:
    """Validated configuration of every host in this run, computed once (first host to ask)."""
    if state not in _configs:
        configs, errors = {}, []
        for each in state.inventory.get_active_hosts():
            data = {
                key: each.data.get(key)
                for key in (
                    "llamacpp",
                    "llamacpp_build",
                    "llama_models",
                    "llama_server",
                    "llama_instances",
                    "llama_models_dir",
                    "llama_service_user",
                )
            }
            try:
                configs[each.name] = parse_host_config(each.name, data)
            except ConfigError as exc:
                errors.append(str(exc))
        if errors:
            raise FleetConfigError("\n".join(errors))
        _configs[state] = configs
    return _configs[state]


def host_config() -> HostConfig:
    return fleet_configs()[host.name]


@deploy("Build toolchain")
def toolchain(config: HostConfig) -> None:
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
    if not host.get_fact(NvidiaGpus):
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


def cuda_architectures(config: HostConfig, gpus: list[Gpu]) -> list[int]:
    """Explicit architectures, else this host's GPUs' (build for them only: no PTX JIT)."""
    if config.build.cuda_architectures:
        return sorted(set(config.build.cuda_architectures))
    return sorted({gpu.cuda_architecture for gpu in gpus})


@deploy("llama.cpp build")
def llama_cpp(config: HostConfig) -> OperationMeta:
    """Check out the pinned commit and build it into builds/<commit-options>, once.

    Nothing is fetched or built when that build directory is already complete.
    """
    archs = cuda_architectures(config, host.get_fact(NvidiaGpus)) if config.build.cuda else []
    if config.build.cuda and not archs:
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
    return g4f.build(
        name=f"Build llama.cpp {config.build_id}", config=config, cuda_architectures=archs
    )


@deploy("Models")
def models(config: HostConfig) -> list[OperationMeta]:
    """Place every model this host's instances use, sha256-verified."""
    files.directory(name="Models directory", path=config.models_dir, mode="755")
    by_file = {model.file: model for model in config.used_models().values()}
    return [
        g4f.model_file(name=f"Model {file}", dest=f"{config.models_dir}/{file}", model=model)
        for file, model in by_file.items()
    ]


def gpu_uuid(inst: Instance, gpus: list[Gpu]) -> str | None:
    """The assigned GPU's UUID (from an index or a UUID); None without a GPU assignment."""
    if inst.gpu is None:
        return None
    for gpu in gpus:
        if inst.gpu in (str(gpu.index), gpu.uuid):
            return gpu.uuid
    return ""


@deploy("llama-server units")
def servers(config: HostConfig, changed: list[OperationMeta]) -> None:
    """Render, check and (re)start one unit per instance; restart only on a change.

    + changed: build/model operations whose change must restart every instance
    """
    gpus = host.get_fact(NvidiaGpus) if config.build.cuda else []
    groups = [g for g in ("video", "render") if g in host.get_fact(Groups)]
    backoff = host.get_fact(SystemdVersion) >= 254
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
    for inst in config.instances:
        uuid = gpu_uuid(inst, gpus)
        if uuid == "":
            g4f.fail(
                name=f"GPU for {inst.name}",
                reason=(
                    f"host {host.name}: llama_instances[{inst.name}].gpu {inst.gpu!r}: no such GPU"
                    f" (have: {', '.join(f'{g.index} {g.uuid}' for g in gpus) or 'none'})"
                ),
            )
            continue
        argv = server_argv(config, inst)
        g4f.flags_known(
            name=f"{inst.unit}: flags known to the build",
            binary=config.server_binary,
            flags=flags_of(argv),
        )
        unit = files.template(
            name=f"Unit {inst.unit}",
            src=template("llama-server.service.j2"),
            dest=f"/etc/systemd/system/{inst.unit}",
            mode="644",
            jinja_env_kwargs={"trim_blocks": True, "lstrip_blocks": True},
            instance=inst,
            exec_start=exec_start(argv),
            service_user=config.service_user,
            gpu_uuid=uuid,
            groups=groups,
            restart_backoff=backoff,
            models_dir=config.models_dir,
        )
        systemd.daemon_reload(name="systemd daemon-reload", _if=unit.did_change)
        started = systemd.service(
            name=f"{inst.unit} enabled and running", service=inst.unit, running=True, enabled=True
        )
        restarted = systemd.service(
            name=f"{inst.unit} restarted (unit, build or model changed)",
            service=inst.unit,
            restarted=True,
            _if=lambda started=started, unit=unit: (
                any_changed(unit, *changed)() and not started.did_change()
            ),
        )
        health = "127.0.0.1" if inst.host in ("0.0.0.0", "::") else inst.host
        g4f.wait_http_ok(
            name=f"{inst.unit} /health 200",
            url=f"http://{health}:{inst.port}/health",
            timeout=HEALTH_TIMEOUT_S,
            unit=inst.unit,
            _if=any_changed(started, restarted),
        )


@deploy("Gemma 4 + MTP llama-server")
def gemma4_mtp() -> None:
    """The whole job for one host: toolchain, build, models, units (config validated first)."""
    config = host_config()
    toolchain(config)
    build = llama_cpp(config)
    placed = models(config)
    servers(config, changed=[build, *placed])
