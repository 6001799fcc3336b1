"""Other GPU services (whisper, TTS) pinned to their GPU by a drop-in; their units stay theirs."""

from __future__ import annotations

from pyinfra import host
from pyinfra.api import QuoteString, StringCommand, deploy
from pyinfra.api.operation import OperationMeta
from pyinfra.operations import server, systemd

from gemma4_fleet import operations as g4f
from gemma4_fleet.config import GpuService
from gemma4_fleet.deploys.units import RENDER, template_path
from gemma4_fleet.facts import GPU_DROPIN_NAME, SystemdUnitExists
from gemma4_fleet.gpu_devices import needs_uvm
from gemma4_fleet.pipeline import HostSetup
from gemma4_fleet.render import cuda_environment

GPU_DROPIN = GPU_DROPIN_NAME


@deploy("GPU services pinned")
def gpu_services(setup: HostSetup) -> list[OperationMeta]:
    """Pin each listed GPU service to its GPU with a drop-in; restart on change."""
    return [op for svc in setup.config.gpu_services for op in pin_gpu_service(setup, svc)]


def pin_gpu_service(setup: HostSetup, svc: GpuService) -> list[OperationMeta]:
    """A drop-in setting CUDA_VISIBLE_DEVICES; the service's own unit is never touched."""
    if not host.get_fact(SystemdUnitExists, unit=svc.unit):
        g4f.fail(
            name=f"GPU service {svc.unit}",
            reason=f"host {host.name}: gpu_services: {svc.unit} is not installed",
        )
        return []
    dropin = g4f.rendered_file(
        name=f"Drop-in {svc.unit}.d/{GPU_DROPIN}",
        src=template_path("gpu-pin.conf.j2"),
        dest=f"/etc/systemd/system/{svc.unit}.d/{GPU_DROPIN}",
        cuda_env=cuda_environment(setup.uuids[svc.gpu]),
        uvm=needs_uvm(setup),
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
