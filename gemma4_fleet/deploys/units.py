"""llama-server units: the service user, one unit + smoke service + timer per instance, verify.

A (re)started instance must answer /health and pass its smoke check, else its last-known-good
units are restored and the host fails.
"""

from __future__ import annotations

from importlib.resources import files as package_files
from typing import Any

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.api.operation import OperationMeta
from pyinfra.facts.server import Groups
from pyinfra.operations import files, systemd
from pyinfra.operations.util import any_changed

from gemma4_fleet import operations as g4f
from gemma4_fleet.config import HostConfig, Instance
from gemma4_fleet.deploys.packages import install_missing
from gemma4_fleet.deploys.reporting import report_dir
from gemma4_fleet.facts import SystemdVersion, UnverifiedUnits
from gemma4_fleet.gpu_devices import needs_uvm
from gemma4_fleet.host_checks import SERVICE_ACCOUNT_MARK
from gemma4_fleet.pipeline import HostSetup
from gemma4_fleet.render import (
    SMOKE_STATE_DIR,
    api_key_path,
    credential_path,
    cuda_environment,
    exec_start,
    flag_names,
    server_argv,
    smoke_argv,
    smoke_report,
    systemd_escape,
)

# What the smoke check imports besides the standard library (it writes its metrics with it).
SMOKE_PACKAGES = ["python3-prometheus-client"]
HEALTH_TIMEOUT_S = 900  # the drafter adds load time; a 12B pair from cold disk takes minutes
# Unit files are rendered with g4f.rendered_file: written next to their path, then renamed.
RENDER: dict[str, Any] = {"mode": "644"}


def template_path(name: str) -> str:
    """Path of a packaged unit template."""
    return str(package_files("gemma4_fleet") / "templates" / name)


def service_basics(config: HostConfig) -> None:
    """The service user and the smoke check's library the units rely on (no apt update when it
    is there: hosts may be offline)."""
    install_missing(SMOKE_PACKAGES)
    g4f.service_account(
        name="Service user and group",
        user=config.service_user,
        comment=SERVICE_ACCOUNT_MARK,  # the pipeline refuses existing accounts without it
        home="/nonexistent",
        shell="/usr/sbin/nologin",
    )


@deploy("llama-server units")
def servers(setup: HostSetup, changed: list[OperationMeta]) -> list[OperationMeta]:
    """Render, check and (re)start one unit per instance; restart only on a change; verify.

    + setup: the host's config, VRAM plan (each instance's ctx) and GPU UUIDs
    + changed: build/model operations whose change must restart every instance
    """
    service_basics(setup.config)
    results: list[OperationMeta] = []
    for inst in setup.config.instances:
        results += instance_unit(setup, inst, changed)
    return results


def instance_unit(
    setup: HostSetup, inst: Instance, changed: list[OperationMeta]
) -> list[OperationMeta]:
    """One instance's unit, smoke units and timer; (re)start on change, then verify.

    Returns what may have changed.
    """
    config = setup.config
    uuid = setup.gpu_uuid(inst.gpu)
    argv = server_argv(config, setup.plan.settle(inst))
    key = api_key(inst)
    g4f.flags_known(
        name=f"{inst.unit}: flags known to the build",
        binary=config.server_binary,
        flags=flag_names(argv),
    )
    chat_template = chat_template_file(inst)
    host_groups = host.get_fact(Groups)
    unit = g4f.rendered_file(
        name=f"Unit {inst.unit}",
        src=template_path("llama-server.service.j2"),
        dest=f"/etc/systemd/system/{inst.unit}",
        **server_unit_values(
            config,
            inst,
            argv,
            uuid,
            groups=[g for g in ("video", "render") if g in host_groups],
            restart_backoff=host.get_fact(SystemdVersion) >= 254,
            uvm=needs_uvm(setup),
        ),
        **RENDER,
    )
    # Units a cut-short run wrote but never verified (read before this run writes anything).
    unverified = host.get_fact(
        UnverifiedUnits,
        units=[inst.unit, *([inst.smoke_unit] if config.smoke.enabled else [])],
        lkg_dir=g4f.LKG_DIR,
    )
    smoke = smoke_units(config, inst)
    # A unit a cut-short run wrote may never have been loaded: systemd would restart the old one.
    systemd.daemon_reload(
        name=f"daemon-reload for {inst.unit}",
        _if=lambda: bool(unverified) or bool(any_changed(unit, *smoke)()),
    )
    # Both units' state in one read.
    running = [inst.unit, *([inst.smoke_timer] if smoke else [])]
    if smoke:
        g4f.unit_running(
            name=f"{inst.smoke_timer} enabled", unit=inst.smoke_timer, read_with=running
        )
    # Errors here are judged (and rolled back) by the verification below.
    started = g4f.unit_running(
        name=f"{inst.unit} enabled and running",
        unit=inst.unit,
        read_with=running,
        _ignore_errors=True,
    )

    def restart_due() -> bool:
        due = bool(any_changed(unit, key, *chat_template, *changed)()) or inst.unit in unverified
        return due and not started.did_change()

    # Requests in flight finish first (bounded by llama_drain.timeout_s).
    g4f.drain(
        name=f"{inst.unit}: drain before restart",
        unit=inst.unit,
        url=inst.local_url,
        timeout=config.drain.timeout_s,
        key_files=[credential_path(inst.unit), api_key_path(inst)],
        _if=restart_due,
    )
    restarted = systemd.service(
        name=f"{inst.unit} restarted (unit, key, build or model changed, or not yet verified)",
        service=inst.unit,
        restarted=True,
        _ignore_errors=True,
        _if=restart_due,
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
            or bool(unverified)
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
    return [unit, key, *chat_template, *smoke, started, restarted, verified]


def chat_template_file(inst: Instance) -> list[OperationMeta]:
    """The instance's chat_template_file, uploaded where its unit reads it."""
    if inst.chat_template_file is None or inst.chat_template_path is None:
        return []
    return [
        files.put(
            name=f"Chat template of {inst.name}",
            src=inst.chat_template_file,
            dest=inst.chat_template_path,
            mode="644",
            create_remote_dir=True,
        )
    ]


def api_key(inst: Instance) -> OperationMeta:
    """The instance's key file on the host (root only), or no key file when none is set."""
    if inst.api_key_file is None:
        return files.file(
            name=f"{inst.unit}: no API key file", path=api_key_path(inst), present=False
        )
    return g4f.secret_file(
        name=f"{inst.unit}: API key (credential)", src=inst.api_key_file, dest=api_key_path(inst)
    )


def server_unit_values(
    config: HostConfig,
    inst: Instance,
    argv: list[str],
    gpu_uuid: str | None,
    *,
    groups: list[str],
    restart_backoff: bool,
    uvm: bool,
) -> dict[str, Any]:
    """What llama-server.service.j2 places: every free value already escaped for systemd."""
    return {
        "instance": inst,
        "exec_start": exec_start(argv),
        "service_user": systemd_escape(config.service_user),
        "cuda_env": cuda_environment(gpu_uuid) if gpu_uuid else None,
        "groups": [systemd_escape(group) for group in groups],
        "restart_backoff": restart_backoff,
        "uvm": uvm,  # the host has the UVM oneshot (gemma4_fleet.gpu_devices)
        "read_only_paths": systemd_escape(config.models_dir),
        "api_key_path": systemd_escape(api_key_path(inst)) if inst.api_key_file else None,
    }


def smoke_unit_values(config: HostConfig, inst: Instance) -> dict[str, Any]:
    """What llama-smoke.service.j2 places: every free value already escaped for systemd."""
    return {
        "instance": inst,
        "exec_start": exec_start(smoke_argv(config, inst)),
        "state_dir": SMOKE_STATE_DIR,
        "service_user": systemd_escape(config.service_user),
        "gpu": inst.gpu is not None,
        "api_key_path": systemd_escape(api_key_path(inst)) if inst.api_key_file else None,
    }


def smoke_units(config: HostConfig, inst: Instance) -> list[OperationMeta]:
    """The oneshot smoke-check service and its timer (the same check the deploy runs)."""
    if not config.smoke.enabled:
        return []
    timer = inst.smoke_timer
    service = g4f.rendered_file(
        name=f"Unit {inst.smoke_unit}",
        src=template_path("llama-smoke.service.j2"),
        dest=f"/etc/systemd/system/{inst.smoke_unit}",
        **smoke_unit_values(config, inst),
        **RENDER,
    )
    timer_file = g4f.rendered_file(
        name=f"Unit {timer}",
        src=template_path("llama-smoke.timer.j2"),
        dest=f"/etc/systemd/system/{timer}",
        instance=inst,
        smoke=config.smoke,
        smoke_unit=inst.smoke_unit,
        **RENDER,
    )
    return [service, timer_file]
