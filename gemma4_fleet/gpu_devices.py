"""The NVIDIA UVM device oneshot every GPU unit depends on (the silent CPU fallback, closed).

When /dev/nvidia-uvm is missing (nvidia_uvm not loaded after a boot), llama-server cannot
initialise CUDA, keeps /health at 200 and serves on the CPU; the hardened unit cannot load the
module itself. A root oneshot (host_scripts/nvidia_uvm.sh: `nvidia-modprobe -u -c=0` where it
exists, else mknod from /proc/devices) runs before each GPU unit starts: the llama-server template
and the GPU-service drop-in carry `Requires=`/`After=` on UVM_UNIT. Only where the host has GPUs
(nvidia-smi lists them): a host without one has no device to make, and gets neither the oneshot
nor the dependency on it.
"""

from __future__ import annotations

from importlib.resources import files as package_files
from pathlib import Path

from pyinfra.api import deploy
from pyinfra.api.operation import OperationMeta
from pyinfra.operations import files, systemd
from pyinfra.operations.util import any_changed

from gemma4_fleet.pipeline import HostSetup

UVM_UNIT = "gemma4-fleet-nvidia-uvm.service"
UVM_SCRIPT = "/usr/local/lib/gemma4-fleet/nvidia-uvm.sh"


def needs_uvm(setup: HostSetup) -> bool:
    """Whether the host has GPUs and a GPU unit (an instance on a GPU, or a pinned service)."""
    config = setup.config
    gpu_units = bool(config.gpu_services) or any(i.gpu is not None for i in config.instances)
    return gpu_units and bool(setup.gpus)


@deploy("NVIDIA UVM device")
def gpu_devices(setup: HostSetup) -> list[OperationMeta]:
    """Install the UVM oneshot (script + unit) where GPU units run on GPUs; remove it elsewhere
    (a host that got it from an earlier deploy: nothing Requires= it any more)."""
    if not needs_uvm(setup):
        gone = [
            files.file(
                name=f"{Path(path).name} absent (no GPU unit on a GPU here)",
                path=path,
                present=False,
            )
            for path in (f"/etc/systemd/system/{UVM_UNIT}", UVM_SCRIPT)
        ]
        systemd.daemon_reload(name=f"daemon-reload for {UVM_UNIT}", _if=any_changed(gone[0]))
        return gone
    script = files.put(
        name="NVIDIA UVM script",
        src=str(package_files("gemma4_fleet") / "host_scripts" / "nvidia_uvm.sh"),
        dest=UVM_SCRIPT,
        mode="755",
        create_remote_dir=True,
    )
    unit = files.template(
        name=f"Unit {UVM_UNIT}",
        src=str(package_files("gemma4_fleet") / "templates" / "nvidia-uvm.service.j2"),
        dest=f"/etc/systemd/system/{UVM_UNIT}",
        script=UVM_SCRIPT,
        mode="644",
    )
    systemd.daemon_reload(name=f"daemon-reload for {UVM_UNIT}", _if=any_changed(unit))
    return [script, unit]
