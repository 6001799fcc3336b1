"""Toolchain and llama.cpp build: packages, driver/toolkit checks, one build per commit+options."""

from __future__ import annotations

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.api.operation import OperationMeta
from pyinfra.operations import files

from gemma4_fleet import operations as g4f
from gemma4_fleet.config import HostConfig
from gemma4_fleet.deploys.packages import install_missing
from gemma4_fleet.facts import CudaToolkit, Gpu, LlamaCppBuildInfo
from gemma4_fleet.fleet_share import ShareRole

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


@deploy("Build toolchain")
def toolchain(config: HostConfig, gpus: list[Gpu]) -> None:
    """Install missing build packages (no apt update when all are present: hosts may be offline).

    With CUDA, the driver and toolkit must be there; the toolkit is installed from the
    distribution only when `llamacpp_build.install_cuda_toolkit` says so. The driver is never
    touched.
    """
    install_missing(
        BUILD_PACKAGES + (CUDA_TOOLKIT_PACKAGES if config.build.install_cuda_toolkit else [])
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


@deploy("llama.cpp build")
def llama_cpp(config: HostConfig, role: ShareRole, artifact: str) -> list[OperationMeta]:
    """Check out the pinned commit and build it into builds/<commit-options>, once per fleet.

    Nothing is fetched or built when that build directory is already complete. Otherwise one
    host per build id compiles and packs its build into the controller cache, and the others
    unpack it from there (gemma4_fleet.fleet_share). Every host calls every operation, so the
    build and pack on one host run before the placing on the others.

    + role: this host's part in the fleet's build (deploys.build_role)
    + artifact: the build's artifact path in the controller cache
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
        return role.make and host.get_fact(LlamaCppBuildInfo, build_dir=config.build_dir) is None

    g4f.source(
        name=f"llama.cpp source at {config.llamacpp.short}",
        src_dir=f"{root}/src",
        git_url=config.llamacpp.git_url,
        commit=config.llamacpp.commit,
        _if=missing,
    )
    built = g4f.build(name=f"Build llama.cpp {config.build_id}", config=config, role=role)
    g4f.publish_build(
        name=f"Pack llama.cpp {config.build_id} into the controller cache",
        config=config,
        role=role,
        artifact=artifact,
    )
    placed = g4f.install_build(
        name=f"llama.cpp {config.build_id} from the controller cache",
        config=config,
        role=role,
        artifact=artifact,
    )
    return [built, placed]
