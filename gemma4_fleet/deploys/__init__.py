"""Packaged pyinfra deploys: the whole job per host (`gemma4_mtp`) and one unit (`redeploy_unit`).

Each host's setup comes from :func:`gemma4_fleet.pipeline.host_setups`, computed once per run for
every active host, so one bad host stops the run before any operation. pyinfra loads the deploy
for all hosts at once (one greenlet each): the first to ask computes the fleet-wide setup and
share plans under a lock while the others wait, and the facts those need are read from every host
at once, so preparing N hosts costs about the round trips of one, not N times the fleet's.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import gevent
import gevent.lock
from pyinfra import host, logger, state
from pyinfra.api import State, deploy
from pyinfra.api.host import Host
from pyinfra.context import ctx_host
from pyinfra.operations import python
from pyinfra.operations.util import any_changed

from gemma4_fleet import fact_batch, pyinfra_patches
from gemma4_fleet import operations as g4f
from gemma4_fleet.config import HostConfig, server_unit
from gemma4_fleet.deploys.build import llama_cpp, toolchain
from gemma4_fleet.deploys.gpu_services import gpu_services, pin_gpu_service
from gemma4_fleet.deploys.models import models
from gemma4_fleet.deploys.removal import retired
from gemma4_fleet.deploys.reporting import collected_reports, print_fleet_table
from gemma4_fleet.deploys.scripts import host_scripts
from gemma4_fleet.deploys.units import instance_unit, servers, service_basics
from gemma4_fleet.facts import (
    Gpu,
    LlamaCppBuildInfo,
    ModelFileStamp,
    NvidiaGpus,
    OsRelease,
    ServiceAccount,
    model_verified,
)
from gemma4_fleet.fleet_share import (
    ShareHost,
    ShareRole,
    artifact_path,
    builder_problems,
    is_cached,
    model_artifact_path,
    plan_sharing,
    share_key,
)
from gemma4_fleet.gpu_devices import gpu_devices
from gemma4_fleet.pipeline import FleetConfigError, HostSetup, host_setups

__all__ = ["build_role", "gemma4_mtp", "host_setup", "model_roles", "redeploy_unit"]

pyinfra_patches.install()  # lost hosts fail alone; no send delay; faster op order
fact_batch.install()  # last run's fact reads in one round trip per host

_setups: weakref.WeakKeyDictionary[State, dict[str, HostSetup]] = weakref.WeakKeyDictionary()
_roles: weakref.WeakKeyDictionary[State, dict[str, tuple[ShareRole, str]]] = (
    weakref.WeakKeyDictionary()
)
_model_roles: weakref.WeakKeyDictionary[State, dict[str, dict[str, ShareRole]]] = (
    weakref.WeakKeyDictionary()
)
# Held by the host's greenlet that computes a fleet-wide value; reentrant (plans need the setup).
_fleet_lock = gevent.lock.RLock()
T = TypeVar("T")


def each_host(hosts: Iterable[Host], read: Callable[[Host], T]) -> dict[str, T]:
    """`read(host)` for every host at once, one greenlet each (not pyinfra's pool, which the
    hosts' deploy greenlets may fill): a fleet-wide read costs one round trip, not one per host."""

    def one(h: Host) -> T:
        with ctx_host.use(h):  # the host context is per greenlet; the state is global
            return read(h)

    greenlets = {h.name: gevent.spawn(one, h) for h in hosts}
    gevent.joinall(list(greenlets.values()), raise_error=True)
    return {name: g.get() for name, g in greenlets.items()}


def _planned_hosts(setups: dict[str, HostSetup]) -> list[Host]:
    """The active hosts with a setup, in inventory order: the share plans break ties by it
    (pyinfra keeps its active hosts in a set)."""
    active = set(state.inventory.get_active_hosts())
    return [h for h in state.inventory if h in active and h.name in setups]


def _gpu_facts(
    hosts: list[tuple[Any, HostConfig]],
) -> tuple[dict[str, list[Gpu]], dict[str, str]]:
    """nvidia-smi once per host and run; empty on a host without NVIDIA tools."""
    return each_host((h for h, _ in hosts), lambda h: h.get_fact(NvidiaGpus)), {}


def _account_facts(hosts: list[tuple[Any, HostConfig]]) -> dict[str, str | None]:
    """`getent passwd` of each host's service account (the tool's own, or absent); the same
    read the `service_account` operation makes, so a run asks once."""
    users = {h.name: config.service_user for h, config in hosts}
    return each_host(
        (h for h, _ in hosts), lambda h: h.get_fact(ServiceAccount, user=users[h.name])[0]
    )


def host_setup() -> HostSetup:
    """This host's validated config, plan and GPUs; the first host to ask sets up every host."""
    with _fleet_lock:
        if state not in _setups:
            deploy = state.current_deploy_filename or "deploy"
            each_host(state.inventory.get_active_hosts(), lambda h: fact_batch.prefetch(h, deploy))
            _setups[state] = host_setups(
                state.inventory.get_active_hosts(), _gpu_facts, read_accounts=_account_facts
            )
            for warning in (w for setup in _setups[state].values() for w in setup.warnings):
                logger.warning(f"warning: {warning}")
    return _setups[state][host.name]


def build_role() -> tuple[ShareRole, str]:
    """This host's part in the fleet's builds, and the build's artifact path in the controller
    cache; the first host to ask plans every host's.

    Reads each active host's build directory and release once, and which builds the controller
    cache holds.
    """
    with _fleet_lock:
        if state not in _roles:
            host_setup()
            setups = _setups[state]
            hosts = _planned_hosts(setups)

            def read(h: Host) -> ShareHost:
                config = setups[h.name].config
                return ShareHost(
                    h.name,
                    share_key(config.build_id, h.get_fact(OsRelease)),
                    h.get_fact(LlamaCppBuildInfo, build_dir=config.build_dir) is not None,
                    config.builder,
                )

            fleet = each_host(hosts, read)
            problems = builder_problems(list(fleet.values()))
            if problems:  # before any operation: nothing has been touched
                raise FleetConfigError(problems)
            cached = {b.key for b in fleet.values() if is_cached(artifact_path(b.key))}
            roles = plan_sharing(list(fleet.values()), cached)
            _roles[state] = {
                name: (role, str(artifact_path(fleet[name].key))) for name, role in roles.items()
            }
    return _roles[state][host.name]


def model_roles() -> dict[str, ShareRole]:
    """This host's part in fetching each of its downloaded models (by sha256), once per fleet.

    Reads each active host's model stamps once, and which models the controller cache holds.
    Models uploaded from the controller (`local_path`) are not shared: every host gets them
    from there anyway.
    """
    with _fleet_lock:
        if state not in _model_roles:
            host_setup()
            setups = _setups[state]
            hosts = _planned_hosts(setups)

            def read(h: Host) -> list[ShareHost]:
                return [
                    ShareHost(
                        h.name,
                        model.sha256,
                        model_verified(h.get_fact(ModelFileStamp, path=path), model.sha256),
                    )
                    for path, model in setups[h.name].config.placed_models().items()
                    if model.url
                ]

            files = {m.sha256: m.file for s in setups.values() for m in s.config.models.values()}
            wanted: dict[str, list[ShareHost]] = {}
            for holders in each_host(hosts, read).values():
                for holder in holders:
                    wanted.setdefault(holder.key, []).append(holder)
            roles: dict[str, dict[str, ShareRole]] = {}
            for sha, holders in wanted.items():
                cached = {sha} if is_cached(model_artifact_path(sha, files[sha])) else set()
                for name, role in plan_sharing(holders, cached).items():
                    roles.setdefault(name, {})[sha] = role
            _model_roles[state] = roles
    return _model_roles[state].get(host.name, {})


@deploy("Gemma 4 + MTP llama-server")
def gemma4_mtp() -> None:
    """The whole job for one host: toolchain, host scripts, build, models, removal of what is no
    longer listed, units, GPU services, prune."""
    setup = host_setup()
    config = setup.config
    toolchain(config, setup.gpus)
    host_scripts()
    built = llama_cpp(config, *build_role())
    placed = models(config, model_roles())
    gpu_devices(setup)
    # Before the new units start: a removed instance may hold the port a new one wants.
    removed = retired(config)
    changed = servers(setup, changed=[*built, *placed])
    gpu_services(setup)
    g4f.prune(
        name="Unused builds and model versions",
        install_root=config.build.install_root,
        models_dir=config.models_dir,
        unit_glob=server_unit("*"),
        _if=any_changed(*built, *placed, *changed, *removed),
    )
    since = time.time()
    python.call(
        name="Fleet smoke table",
        function=print_fleet_table,
        since=since,
        _run_once=True,
        _if=lambda: bool(collected_reports(since)),
    )


@deploy("Redeploy one unit")
def redeploy_unit(name: str) -> None:
    """Re-render and restart one llama-server instance or one pinned GPU service, nothing else.

    No build, no download, no other unit. A unit whose build is not installed fails its flag
    check, one whose model is not placed fails its health check and is rolled back: run the
    full deploy for those.

    + name: an instance name ("gemma4"), its unit, or a `gpu_services` unit
    """
    setup = host_setup()
    config = setup.config
    if not name:
        raise FleetConfigError([f"host {host.name}: unit: say which, e.g. --data unit=gemma4"])
    gpu_devices(setup)
    for inst in config.instances:
        if name in (inst.name, inst.unit, inst.unit.removesuffix(".service")):
            host_scripts()
            service_basics(config)
            instance_unit(setup, inst, changed=[])
            return
    for svc in config.gpu_services:
        if name in (svc.unit, svc.unit.removesuffix(".service")):
            pin_gpu_service(setup, svc)
            return
    known = [i.name for i in config.instances] + [s.unit for s in config.gpu_services]
    raise FleetConfigError(
        [
            f"host {host.name}: unit: {name!r} is neither a llama-server instance nor a GPU "
            f"service of this host (have: {', '.join(known)})"
        ]
    )
