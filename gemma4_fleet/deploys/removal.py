"""Removal: units of instances and GPU services taken out of the inventory are taken down."""

from __future__ import annotations

from pyinfra import host
from pyinfra.api import QuoteString, StringCommand, deploy
from pyinfra.api.operation import OperationMeta
from pyinfra.operations import files, server, systemd

from gemma4_fleet import operations as g4f
from gemma4_fleet.config import HostConfig, smoke_unit
from gemma4_fleet.facts import SYSTEMD_DIR, ManagedInstance, ManagedUnitFiles
from gemma4_fleet.operations import LKG_DIR
from gemma4_fleet.render import KEYS_DIR, SMOKE_STATE_DIR, credential_path


@deploy("Removed from the inventory")
def retired(config: HostConfig) -> list[OperationMeta]:
    """Take down what this tool installed for instances and GPU services no longer listed.

    Only files with this tool's marker and names count (ManagedUnitFiles); a unit the user
    wrote is never touched. Instances are drained first, then stopped; their build and model
    are freed by the prune that follows (nothing refers to them any more).
    """
    managed = host.get_fact(ManagedUnitFiles)
    listed = {inst.name for inst in config.instances}
    ops: list[OperationMeta] = []
    for name, found in sorted(managed.instances.items()):
        if name not in listed:
            ops += retire_instance(found, config.drain.timeout_s)
    pinned = {svc.unit for svc in config.gpu_services}
    for unit, path in sorted(managed.gpu_dropins.items()):
        if unit not in pinned:
            ops += unpin_gpu_service(unit, path)
    return ops


def retire_instance(found: ManagedInstance, drain_timeout: int) -> list[OperationMeta]:
    """Drain, stop and disable one instance, then delete its units and everything kept for it.

    The unit files go last: if anything before fails, the next run finds them and tries again.
    """
    unit, smoke, timer = found.unit, smoke_unit(found.name), smoke_unit(found.name, "timer")
    why = "no longer in llama_instances"
    ops = []
    if found.local_url is not None:
        ops.append(
            g4f.drain(
                name=f"{unit}: drain before removal ({why})",
                unit=unit,
                url=found.local_url,
                timeout=drain_timeout,
                key_files=[credential_path(unit), f"{KEYS_DIR}/{found.name}.key"],
            )
        )
    # Only units whose files are there (smoke units are absent with llama_smoke.enabled off).
    present = [u for u in (timer, smoke, unit) if f"{SYSTEMD_DIR}/{u}" in found.files]
    ops.append(
        server.shell(
            name=f"{', '.join(present)} stopped and disabled ({why})",
            commands=[
                StringCommand(
                    "systemctl", "disable", "--now", "--", *(QuoteString(u) for u in present)
                ),
                # A unit that failed earlier would stay listed as failed after it is gone.
                StringCommand(
                    "systemctl",
                    "reset-failed",
                    "--",
                    *(QuoteString(u) for u in present),
                    "2>/dev/null",
                    "||",
                    "true",
                ),
            ],
        )
    )
    kept = [
        f"{LKG_DIR}/{unit}",
        f"{LKG_DIR}/{smoke}",
        f"{KEYS_DIR}/{found.name}.key",
        f"/var/lib/{SMOKE_STATE_DIR}/{found.name}.json",
        f"/var/lib/{SMOKE_STATE_DIR}/{found.name}.prom",
    ]
    for path in kept:
        ops.append(files.file(name=f"{path} removed", path=path, present=False))
    ops.append(
        files.directory(
            name=f"/var/lib/llama-server/{found.name} removed",
            path=f"/var/lib/llama-server/{found.name}",
            present=False,
        )
    )
    for path in found.files:
        ops.append(files.file(name=f"{path} removed ({why})", path=path, present=False))
    systemd.daemon_reload(name=f"daemon-reload after removing {unit}")
    return ops


def unpin_gpu_service(unit: str, dropin: str) -> list[OperationMeta]:
    """Delete our drop-in of a GPU service no longer listed; restart it only if it runs."""
    removed = files.file(
        name=f"Drop-in {dropin} removed (no longer in gpu_services)", path=dropin, present=False
    )
    server.shell(
        name=f"{unit}: empty drop-in directory removed",
        commands=[
            StringCommand(
                "rmdir", "--ignore-fail-on-non-empty", QuoteString(f"{dropin.rsplit('/', 1)[0]}")
            )
        ],
        _if=removed.did_change,
    )
    systemd.daemon_reload(name=f"daemon-reload for {unit}", _if=removed.did_change)
    server.shell(
        name=f"{unit} restarted without the GPU pin",
        commands=[StringCommand("systemctl", "try-restart", "--", QuoteString(unit))],
        _if=removed.did_change,
    )
    return [removed]
