"""The UVM oneshot (script + unit), its place before every GPU unit, and the GPU host's helpers."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import jinja2
import pytest

from gemma4_fleet.config import parse_host_config
from gemma4_fleet.facts import Gpu
from gemma4_fleet.gpu_devices import UVM_SCRIPT, UVM_UNIT, needs_uvm
from gemma4_fleet.host_scripts.smoke_check import cpu_fallback_lines
from gemma4_fleet.pipeline import HostSetup
from gemma4_fleet.render import cuda_environment
from gemma4_fleet.testfleet.gpuhost import parse_ldconfig
from tests.unit.test_config import host_data

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "gemma4_fleet" / "host_scripts" / "nvidia_uvm.sh"
# /proc/devices of the H200 GPU machine (../shared/briefs/gpu-host.md), character devices part.
H200_DEVICES = (
    "Character devices:\n  1 mem\n195 nvidia\n195 nvidiactl\n238 nvidia-uvm\n241 nvidia-caps\n"
)
CPU_DEVICES = "Character devices:\n  1 mem\n  4 tty\n 10 misc\n"


def run_script(tmp_path: Path, devices: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "devices").write_text(devices)
    (tmp_path / "dev").mkdir(exist_ok=True)
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",  # no nvidia-modprobe here
        "G4F_PROC_DEVICES": str(tmp_path / "devices"),
        "G4F_DEV": str(tmp_path / "dev"),
    }
    return subprocess.run(["sh", str(SCRIPT)], capture_output=True, text=True, env=env, check=False)


def test_no_nvidia_driver_is_nothing_to_do(tmp_path: Path) -> None:
    result = run_script(tmp_path, CPU_DEVICES)
    assert result.returncode == 0, result.stderr
    assert "nothing to do" in result.stdout
    assert list((tmp_path / "dev").iterdir()) == []


def test_driver_without_uvm_module_and_no_nvidia_modprobe_fails_loudly(tmp_path: Path) -> None:
    result = run_script(tmp_path, "Character devices:\n195 nvidia\n195 nvidiactl\n")
    assert result.returncode == 1
    assert "CUDA would fall back to the CPU" in result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod needs root")
def test_missing_uvm_node_is_made_with_the_major_from_proc_devices(tmp_path: Path) -> None:
    result = run_script(tmp_path, H200_DEVICES)
    assert result.returncode == 0, result.stderr
    node = (tmp_path / "dev" / "nvidia-uvm").stat()
    tools = (tmp_path / "dev" / "nvidia-uvm-tools").stat()
    assert stat.S_ISCHR(node.st_mode) and stat.S_ISCHR(tools.st_mode)
    assert (os.major(node.st_rdev), os.minor(node.st_rdev)) == (238, 0)
    assert (os.major(tools.st_rdev), os.minor(tools.st_rdev)) == (238, 1)
    assert stat.S_IMODE(node.st_mode) == 0o666
    again = run_script(tmp_path, H200_DEVICES)
    assert again.returncode == 0 and "present" in again.stdout


def render(name: str, **values: object) -> str:
    env = jinja2.Environment(  # noqa: S701 - systemd units, not HTML
        loader=jinja2.FileSystemLoader(ROOT / "templates"), trim_blocks=True, lstrip_blocks=True
    )
    return env.get_template(name).render(**values)


def server_unit(gpu_uuid: str | None, uvm: bool = True) -> str:
    class Inst:
        name, spec_type, port = "gemma4", "draft-mtp", 8080

    return render(
        "llama-server.service.j2",
        instance=Inst,
        exec_start="/opt/llama.cpp/builds/x/bin/llama-server",
        service_user="llama",
        cuda_env=cuda_environment(gpu_uuid) if gpu_uuid else None,
        groups=["video"],
        restart_backoff=False,
        read_only_paths="/var/lib/llama-models",
        uvm=uvm and gpu_uuid is not None,
    )


def unit_lines(text: str, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in text.splitlines() if line.startswith(f"{key}=")]


def test_gpu_server_unit_requires_and_follows_the_uvm_oneshot() -> None:
    text = server_unit("GPU-5e1c2a7b-8f41-4c9e-9d0a-3b6f1e2d4c5a")
    assert UVM_UNIT in unit_lines(text, "Requires")
    assert any(UVM_UNIT in line.split() for line in unit_lines(text, "After"))


def test_device_allow_names_exist_in_proc_devices() -> None:
    text = server_unit("GPU-5e1c2a7b-8f41-4c9e-9d0a-3b6f1e2d4c5a")
    names = {line.split()[1] for line in H200_DEVICES.splitlines()[1:]}
    allowed = [line.split()[0].removeprefix("char-") for line in unit_lines(text, "DeviceAllow")]
    assert allowed and set(allowed) <= names, allowed
    assert unit_lines(text, "DevicePolicy") == ["closed"]


def test_cpu_server_unit_has_no_uvm_dependency() -> None:
    text = server_unit(None)
    assert UVM_UNIT not in text
    assert unit_lines(text, "PrivateDevices") == ["yes"]


def test_gpu_dropin_requires_and_follows_the_uvm_oneshot() -> None:
    env = cuda_environment("GPU-5e1c2a7b-8f41-4c9e-9d0a-3b6f1e2d4c5a")
    text = render("gpu-pin.conf.j2", cuda_env=env, uvm=True)
    assert unit_lines(text, "Requires") == [UVM_UNIT]
    assert unit_lines(text, "After") == [UVM_UNIT]
    assert unit_lines(text, "Environment") == [env]


def test_without_the_oneshot_nothing_requires_it() -> None:
    """A host where nvidia-smi lists no GPU gets no oneshot: a Requires= on it would fail."""
    env = cuda_environment("GPU-5e1c2a7b-8f41-4c9e-9d0a-3b6f1e2d4c5a")
    dropin = render("gpu-pin.conf.j2", cuda_env=env, uvm=False)
    assert UVM_UNIT not in dropin and unit_lines(dropin, "Environment") == [env]
    server = server_unit("GPU-5e1c2a7b-8f41-4c9e-9d0a-3b6f1e2d4c5a", uvm=False)
    assert UVM_UNIT not in server and unit_lines(server, "DevicePolicy") == ["closed"]


def setup_of(gpus: list[Gpu], **data: Any) -> HostSetup:
    return HostSetup(parse_host_config("box1", host_data(**data)), plan=None, gpus=gpus)  # type: ignore[arg-type]


H200 = Gpu(0, "GPU-5e1c2a7b-8f41-4c9e-9d0a-3b6f1e2d4c5a", "NVIDIA H200", 143771, 0, "9.0")
CPU_INSTANCE = [{"name": "cpu", "target": "t", "drafter": "d"}]


def test_the_oneshot_goes_only_where_gpu_units_run_on_gpus() -> None:
    assert needs_uvm(setup_of([H200]))  # an instance on GPU 0
    assert needs_uvm(
        setup_of(
            [H200], llama_instances=CPU_INSTANCE, gpu_services=[{"unit": "tts.service", "gpu": "0"}]
        )
    )
    assert not needs_uvm(setup_of([H200], llama_instances=CPU_INSTANCE))
    # nvidia-smi lists no GPU (the CPU test fleet): a pinned service gets no oneshot
    assert not needs_uvm(
        setup_of(
            [],
            llama_instances=CPU_INSTANCE,
            gpu_services=[{"unit": "tts.service", "gpu": H200.uuid}],
        )
    )


def test_uvm_unit_is_a_oneshot_run_on_every_start() -> None:
    text = render("nvidia-uvm.service.j2", script=UVM_SCRIPT)
    assert unit_lines(text, "Type") == ["oneshot"]
    assert unit_lines(text, "ExecStart") == [UVM_SCRIPT]
    # RemainAfterExit would make a restart of a GPU unit skip it (the node may be gone since).
    assert unit_lines(text, "RemainAfterExit") == []


def test_driver_libraries_are_found_in_ldconfig_output() -> None:
    text = (
        "812 libs found in cache `/etc/ld.so.cache'\n"
        "\tlibnvidia-ml.so.1 (libc6,x86-64) => /lib/x86_64-linux-gnu/libnvidia-ml.so.1\n"
        "\tlibcuda.so.1 (libc6,x86-64) => /lib/x86_64-linux-gnu/libcuda.so.1\n"
        "\tlibcuda.so.1 (libc6) => /lib/i386-linux-gnu/libcuda.so.1\n"
        "\tlibcudart.so.13 (libc6,x86-64) => /usr/local/cuda/lib64/libcudart.so.13\n"
        "\tlibc.so.6 (libc6,x86-64, OS ABI: Linux 3.2.0) => /lib/x86_64-linux-gnu/libc.so.6\n"
    )
    assert parse_ldconfig(text) == {
        "libnvidia-ml.so.1": "/lib/x86_64-linux-gnu/libnvidia-ml.so.1",
        "libcuda.so.1": "/lib/x86_64-linux-gnu/libcuda.so.1",
    }


def test_cpu_fallback_lines_recorded_on_the_gpu_host_are_found() -> None:
    # llama-server's journal on the 2x H200 host with /dev/nvidia-uvm removed (docs/gpu-proof.md).
    log = (
        "0.00.003.067 E ggml_cuda_init: failed to initialize CUDA: unknown error\n"
        "warning: no usable GPU found, --gpu-layers option will be ignored\n"
        "0.00.869.031 I srv  llama_server: listening on http://127.0.0.1:8081\n"
    )
    assert cpu_fallback_lines(log) == [
        "0.00.003.067 E ggml_cuda_init: failed to initialize CUDA: unknown error",
        "warning: no usable GPU found, --gpu-layers option will be ignored",
    ]
    assert cpu_fallback_lines("ggml_cuda_init: found 1 CUDA devices\nload_tensors: CUDA0\n") == []
