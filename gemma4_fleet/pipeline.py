"""From pyinfra inventory hosts to validated, GPU-resolved, planned hosts: the one way in.

Every host's data (group data, inventory, ``--data``, as pyinfra merged them), with the host's
tuned profile applied where host data leaves a field unset (``tuned/<host>.json``,
:mod:`gemma4_fleet.tuning`), is validated into a
:class:`~gemma4_fleet.config.HostConfig`; its GPUs (the ``NvidiaGpus`` fact, when read) resolve
each configured GPU reference (index or UUID) once; unset CUDA architectures become the GPUs';
then the VRAM plan. The deploys and every CLI command start here. Problems of all hosts are
collected and raised together as one :class:`FleetConfigError`:

    invalid configuration
      host <name>: <host-data field>: <what>
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyinfra.api import OperationError

from gemma4_fleet.config import (
    ConfigError,
    HostConfig,
    host_data_of,
    parse_host_config,
    stand_in_checksums,
)
from gemma4_fleet.facts import Gpu
from gemma4_fleet.host_checks import host_problems, inventory_problems
from gemma4_fleet.tuning import annotate_plan_errors, apply_profile
from gemma4_fleet.vram_plan import (
    HostPlan,
    MetaFor,
    PlanConfigError,
    memoized,
    meta_for_model,
    plan_host,
)

# (host, its config) pairs -> ({host name: its GPUs}, {host name: why they could not be read});
# a host in neither was not read: its plan takes budgets from gpu_memory_mib only
GpuReader = Callable[[list[tuple[Any, HostConfig]]], tuple[dict[str, list[Gpu]], dict[str, str]]]
# (host, its config) pairs -> {host name: `getent passwd <service user>` line, None if absent}
AccountReader = Callable[[list[tuple[Any, HostConfig]]], dict[str, str | None]]


class FleetConfigError(ConfigError, OperationError):
    """Configuration errors of one or more hosts, raised before any host is touched."""

    def __init__(self, errors: Sequence[str]) -> None:
        self.errors = tuple(line for error in errors for line in str(error).splitlines())
        super().__init__("invalid configuration\n  " + "\n  ".join(self.errors))


@dataclass(frozen=True)
class HostSetup:
    """One host's validated config, its VRAM plan and its GPUs (read once per run)."""

    config: HostConfig
    plan: HostPlan
    gpus: list[Gpu]
    # each configured GPU reference -> the UUID its units and drop-ins are pinned to
    uuids: Mapping[str, str] = field(default_factory=dict)
    # what will deploy but not work as users expect (no chat template), or not deploy yet
    warnings: tuple[str, ...] = ()

    def gpu_uuid(self, ref: str | None) -> str | None:
        """The UUID for a configured GPU reference (None for no GPU)."""
        return None if ref is None else self.uuids[ref]


def gpu_refs(config: HostConfig) -> dict[str, str]:
    """Every GPU reference in a host's data -> the host-data field that holds it."""
    refs: dict[str, str] = {}
    for inst in config.instances:
        if inst.gpu is not None:
            refs.setdefault(inst.gpu, f"llama_instances[{inst.name}].gpu")
    for svc in config.gpu_services:
        refs.setdefault(svc.gpu, f"gpu_services[{svc.unit}].gpu")
    return refs


def resolve_gpus(
    host_name: str, config: HostConfig, gpus: list[Gpu] | None
) -> tuple[dict[str, Gpu], dict[str, str], list[str]]:
    """(reference -> GPU, reference -> UUID, errors) for every GPU reference of a host.

    `gpus` None: not read (a plan from host data); a UUID then stands for itself. Read but empty
    (no NVIDIA tools on the host): a UUID is taken as given, an index is an error.
    """
    found: dict[str, Gpu] = {}
    uuids: dict[str, str] = {}
    errors: list[str] = []
    for ref, where in gpu_refs(config).items():
        gpu = next((g for g in gpus or [] if ref in (str(g.index), g.uuid)), None)
        if gpu is not None:
            found[ref], uuids[ref] = gpu, gpu.uuid
        elif not gpus and ref.startswith(("GPU-", "MIG-")):
            uuids[ref] = ref  # nothing to check it against
        elif gpus is not None:
            have = ", ".join(f"{g.index} {g.uuid}" for g in gpus) or "none (no nvidia-smi)"
            errors.append(
                f"host {host_name}: {where}: no GPU {ref!r} on the host (nvidia-smi lists: {have})"
            )
    return found, uuids, errors


def with_gpu_architectures(config: HostConfig, gpus: list[Gpu]) -> HostConfig:
    """Unset CUDA architectures become this host's GPUs' (build for them only: no PTX JIT).

    They are part of the build id, so a GPU of another generation means a new build.
    """
    if not config.build.cuda or config.build.cuda_architectures or not gpus:
        return config
    archs = sorted({gpu.cuda_architecture for gpu in gpus})
    build = config.build.model_copy(update={"cuda_architectures": archs})
    return config.model_copy(update={"build": build})


def host_data(host: Any) -> dict[str, Any]:
    """All of a host's data (pyinfra's keys too: parse_host_config reports typos of ours)."""
    return {**host.data.dict(), **host_data_of(host.data.get)}


def host_configs(
    hosts: Iterable[Any],
    *,
    placeholders: bool = False,
    tuned: bool = True,
    tuned_dir: Path | None = None,
) -> tuple[dict[str, HostConfig], list[str], dict[str, dict[str, str]]]:
    """(validated config per host, errors, {host: {stand-in sha256: warning}}).

    + placeholders: plan hosts whose sha256 values are not filled in yet (the example
      inventory's `FILL-IN`) with a stand-in and a warning each; the deploy never does
    + tuned: apply each host's tuned profile where host data is silent (False: the recipe)
    + tuned_dir: where the profiles are (None: `tuned/` or G4F_TUNED_DIR)
    """
    configs: dict[str, HostConfig] = {}
    errors: list[str] = []
    stand_ins: dict[str, dict[str, str]] = {}
    for host in hosts:
        data = host_data(host)
        if placeholders:
            data, stand_ins[host.name] = stand_in_checksums(host.name, data)
        try:
            if tuned:
                data = apply_profile(host.name, data, tuned_dir)
            configs[host.name] = parse_host_config(host.name, data)
        except ConfigError as exc:
            errors.append(str(exc))
    return configs, errors, stand_ins


def host_setups(
    hosts: Iterable[Any],
    read_gpus: GpuReader | None,
    *,
    read_accounts: AccountReader | None = None,
    meta_for: MetaFor = meta_for_model,
    placeholders: bool = False,
    tuned: bool = True,
    tuned_dir: Path | None = None,
) -> dict[str, HostSetup]:
    """Validated, GPU-resolved and planned setup of every host; FleetConfigError lists all.

    + hosts: pyinfra inventory hosts (their `data` already merged by pyinfra, `--data` included)
    + read_gpus: reads the GPUs of the hosts it is given (the deploy: every host's NvidiaGpus
      fact); None plans from host data alone
    + read_accounts: looks up each host's service account (the deploy: the ServiceAccount fact);
      None skips that check (the `plan` command)
    + meta_for: GGUF metadata of a model (read once per model for the whole fleet)
    + placeholders: plan checksums not filled in yet, with a warning (`gemma4-fleet plan`)
    + tuned: apply each host's tuned profile (False: host data alone, the recipe)
    + tuned_dir: where the profiles are (None: `tuned/` or G4F_TUNED_DIR)
    """
    hosts = list(hosts)
    configs, errors, stand_ins = host_configs(
        hosts, placeholders=placeholders, tuned=tuned, tuned_dir=tuned_dir
    )
    errors = inventory_problems(hosts) + errors
    read: dict[str, list[Gpu]] = {}
    unreadable: dict[str, str] = {}
    if read_gpus is not None and configs:
        read, unreadable = read_gpus([(h, configs[h.name]) for h in hosts if h.name in configs])
        errors += [f"host {name}: {why}" for name, why in unreadable.items()]
    accounts: dict[str, str | None] = {}
    if read_accounts is not None and configs:
        accounts = read_accounts([(h, configs[h.name]) for h in hosts if h.name in configs])

    uncached = {sha for per_host in stand_ins.values() for sha in per_host}
    setups: dict[str, HostSetup] = {}
    read_meta = memoized(
        lambda model: (
            meta_for_model(model, cache=False) if model.sha256 in uncached else meta_for(model)
        )
    )
    for name, config in configs.items():
        if name in unreadable:
            continue
        gpus = read.get(name)
        checked = host_problems(
            name, config, gpus, accounts.get(name), account_read=name in accounts
        )
        if checked:  # GPUs by identity, the service account (gemma4_fleet.host_checks)
            errors += checked
            continue
        found, uuids, gpu_errors = resolve_gpus(name, config, gpus)
        if gpu_errors:
            errors += gpu_errors
            continue
        config = with_gpu_architectures(config, gpus or [])
        try:
            plan = plan_host(name, config, found, read_meta)
        except PlanConfigError as exc:
            errors += annotate_plan_errors(name, exc.errors, tuned_dir) if tuned else exc.errors
            continue
        warnings = (*stand_ins.get(name, {}).values(), *plan.warnings)
        setups[name] = HostSetup(config, plan, gpus or [], uuids, warnings)
    if errors:
        raise FleetConfigError(errors)
    return setups
