"""Checks that need a host's facts, made before any operation: which GPUs it has, and whether
the service account is the tool's own. Pure functions of (config, facts); each returns
(host-data field, problem) pairs, as `HostConfig.cross_field_problems` does."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from gemma4_fleet.config import HostConfig
from gemma4_fleet.facts import Gpu

# GECOS of the account the tool creates: the mark that it is the tool's to change.
SERVICE_ACCOUNT_MARK = "gemma4-fleet service account"

Problems = list[tuple[str, str]]


@dataclass(frozen=True)
class PasswdEntry:
    """One line of `getent passwd NAME`."""

    name: str
    uid: int
    gid: int
    gecos: str
    home: str
    shell: str


def host_problems(
    host_name: str,
    config: HostConfig,
    gpus: Sequence[Gpu] | None,
    passwd_line: str | None,
    *,
    account_read: bool = True,
) -> list[str]:
    """Every fact-dependent problem of one host, as `host <name>: <field>: <problem>` lines.

    `gpus` None: nvidia-smi was not read; `account_read` False: the account was not looked up.
    """
    found = gpu_problems(config, gpus)
    if account_read:
        found += account_problems(config, parse_passwd(passwd_line) if passwd_line else None)
    return [f"host {host_name}: {field}: {why}" for field, why in found]


def parse_passwd(line: str) -> PasswdEntry | None:
    parts = line.strip().split(":")
    if len(parts) != 7 or not parts[2].isdigit() or not parts[3].isdigit():
        return None
    name, _, uid, gid, gecos, home, shell = parts
    return PasswdEntry(name, int(uid), int(gid), gecos, home, shell)


def account_problems(config: HostConfig, entry: PasswdEntry | None) -> Problems:
    """The service account must be absent (the deploy creates and marks it) or marked as ours.

    Anything else is an account of the system or other software: the deploy would change its
    shell and home and run model servers as it, so it is refused.
    """
    if entry is None:
        return []
    user = config.service_user
    if entry.uid == 0:
        return [("llama_service_user", f"{user!r} has uid 0 (root); use the tool's own account")]
    if entry.gecos.split(",")[0] == SERVICE_ACCOUNT_MARK:
        return []
    return [
        (
            "llama_service_user",
            f"account {user!r} already exists on the host (uid {entry.uid}, home {entry.home}, "
            f"shell {entry.shell}) and was not created by gemma4-fleet; choose another name. "
            f"If it is this tool's account from before accounts were marked: "
            f"usermod -c '{SERVICE_ACCOUNT_MARK}' {user}",
        )
    ]


def _refs(config: HostConfig) -> list[tuple[str, str]]:
    """(field, GPU as written) of every GPU the config names."""
    refs = [(f"gpu_memory_mib.{key}", key) for key in config.gpu_memory_mib]
    refs += [
        (f"llama_instances[{inst.name}].gpu", inst.gpu)
        for inst in config.instances
        if inst.gpu is not None
    ]
    refs += [(f"gpu_services[{svc.unit}].gpu", svc.gpu) for svc in config.gpu_services]
    return refs


def gpu_identity(ref: str, gpus: Sequence[Gpu]) -> str | None:
    """The UUID of the GPU an index or UUID names; None when the host has no such GPU."""
    return next((g.uuid for g in gpus if ref in (str(g.index), g.uuid)), None)


def gpu_problems(config: HostConfig, gpus: Sequence[Gpu] | None) -> Problems:
    """Every GPU named in config is one the host has, compared by identity, not spelling.

    `gpus`: the host's NvidiaGpus fact, or None when it was not read (then spellings are all
    there is; the planner asks for a budget per spelling). On a host where nvidia-smi finds no
    GPU, an instance's GPU and any index are errors; a UUID of a GPU service or budget is taken
    as given (nothing to check it against; the test fleet pins stand-in services that way).
    """
    if gpus is None:
        return []
    problems: Problems = []
    ids: dict[str, str] = {}
    for field, ref in _refs(config):
        if not gpus:
            # llama-server needs a real GPU; a UUID elsewhere is taken as given.
            if field.startswith("llama_instances") or not ref.startswith(("GPU-", "MIG-")):
                problems.append(
                    (field, f"no GPU {ref!r} on the host (nvidia-smi lists: none (no nvidia-smi))")
                )
            ids[ref] = ref
            continue
        found = gpu_identity(ref, gpus)
        if found is None:
            have = ", ".join(f"{g.index} {g.uuid}" for g in gpus)
            problems.append((field, f"no GPU {ref!r} on the host (nvidia-smi lists: {have})"))
        else:
            ids[ref] = found
    if not gpus:
        return problems
    # Budgets: one per physical GPU.
    seen: dict[str, str] = {}
    for key in config.gpu_memory_mib:
        if key in ids and ids[key] in seen:
            problems.append(
                (
                    f"gpu_memory_mib.{key}",
                    f"{key!r} and {seen[ids[key]]!r} are the same GPU; give it one budget",
                )
            )
        seen.setdefault(ids.get(key, key), key)
    # A service on a llama-server GPU spelled differently (the same spelling is a config error).
    llama = {ids[i.gpu]: i.gpu for i in config.instances if i.gpu is not None and i.gpu in ids}
    for svc in config.gpu_services:
        same = llama.get(ids.get(svc.gpu, ""))
        if same is not None and same != svc.gpu and not svc.share_gpu_with_llama:
            problems.append(
                (
                    f"gpu_services[{svc.unit}].gpu",
                    f"GPU {svc.gpu} is GPU {same}, which llama-server uses; move {svc.unit} to "
                    "another GPU or set share_gpu_with_llama: true (its vram_reserve_mib then "
                    "counts in that GPU's budget)",
                )
            )
    return problems


def inventory_problems(hosts: Iterable[Any]) -> list[str]:
    """A host listed twice in one group, or two names for one address (both would deploy).

    `hosts`: pyinfra Hosts (pyinfra merges a repeated host's data silently; its groups list
    keeps the repeat).
    """
    problems = []
    for each in hosts:
        if each.name.startswith("@"):
            continue  # a connector (@local, @docker/...): pyinfra repeats its groups itself
        for group in sorted({g for g in each.groups if each.groups.count(g) > 1}):
            problems.append(f"host {each.name}: inventory: listed twice in group {group}")
    by_address: dict[str, list[str]] = {}
    for each in hosts:
        if not each.name.startswith("@"):
            address = str(each.data.get("ssh_hostname") or each.name)
            by_address.setdefault(address, []).append(each.name)
    for address, names in by_address.items():
        for name in names if len(names) > 1 else []:
            others = ", ".join(sorted(set(names) - {name}))
            problems.append(
                f"host {name}: inventory: the same machine ({address}) as host {others}; "
                "list each machine once"
            )
    return problems
