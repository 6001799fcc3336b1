"""The `gemma4-fleet` command: VRAM plans and status of an inventory, a local test fleet by hand."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from fnmatch import fnmatch
from functools import partial
from typing import TYPE_CHECKING, Any

from gemma4_fleet.config import ConfigError, HostConfig

if TYPE_CHECKING:
    from gemma4_fleet.facts import Gpu


def override_data(pairs: list[str]) -> dict[str, Any]:
    """`--data KEY=VALUE` as pyinfra's CLI reads it: true/false, integers, JSON, else a string."""
    from pyinfra_cli.util import parse_cli_arg

    data: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--data {pair}: expected KEY=VALUE")
        data[key] = parse_cli_arg(value)
    return data


def _load_inventory(path: str, data: list[str] | None = None) -> tuple[Any, Any]:
    """(State, Inventory) loaded exactly as the pyinfra CLI does (group_data from the current
    directory and the inventory's folder, host data precedence, `--data` over all of it);
    nothing is connected."""
    # pyinfra_cli monkey-patches the stdlib for gevent on import: only plan and status pay.
    from pyinfra.api import State
    from pyinfra.context import ctx_state
    from pyinfra_cli.inventory import make_inventory

    from gemma4_fleet import pyinfra_patches

    pyinfra_patches.install()  # SSH as the deploys use it: lost hosts fail alone, no send delay

    overrides = override_data(data or [])

    cwd = os.getcwd()
    if cwd not in sys.path:  # as pyinfra's CLI: group data and inventories may import from cwd
        sys.path.append(cwd)
    state = State(check_for_changes=False)
    state.cwd = cwd
    try:
        with ctx_state.use(state):
            inventory = make_inventory(path, override_data=overrides, cwd=cwd)
    except Exception as exc:  # user code in the inventory and group data runs here
        raise ConfigError(load_error(path, exc)) from None
    if not list(inventory):
        raise ConfigError(f"inventory {path}: no hosts (it lists none)")
    return state, inventory


def load_error(inventory: str, exc: BaseException) -> str:
    """One line for a broken inventory or group_data file: the file, the line, what is wrong."""
    # pyinfra wraps errors raised by user code with the file it ran; syntax errors arrive bare.
    cause = getattr(exc, "exception", exc)
    filename = getattr(exc, "filename", None) or getattr(cause, "filename", None)
    line = getattr(cause, "lineno", None) if isinstance(cause, SyntaxError) else None
    if line is None and filename:
        frames = traceback.extract_tb(cause.__traceback__)
        line = next((f.lineno for f in reversed(frames) if f.filename == filename), None)
    what = f"{type(cause).__name__}: {getattr(cause, 'msg', None) or cause}"
    if hasattr(exc, "format_message") and cause is exc:
        what = exc.format_message()
    if not filename:
        return f"inventory {inventory}: {what}"
    where = os.path.relpath(filename) if os.path.isabs(filename) else filename
    return f"{where}{f':{line}' if line else ''}: {what}"


def _limited_hosts(inventory: Any, patterns: list[str]) -> list[Any]:
    """Hosts of the inventory, limited like pyinfra's --limit (group names or host globs)."""
    from pyinfra.api.exceptions import NoGroupError

    hosts = list(inventory)
    if not patterns:
        return hosts
    chosen: set[Any] = set()
    for pattern in (p for arg in patterns for p in arg.split(",") if p):
        try:
            matched = list(inventory.get_group(pattern))
        except NoGroupError:
            matched = [h for h in hosts if fnmatch(h.name, pattern)]
        if not matched:
            raise ConfigError(f"--limit {pattern}: no host or group of that name")
        chosen.update(matched)
    return [h for h in hosts if h in chosen]


def _uses_gpu(config: HostConfig) -> bool:
    return any(inst.gpu is not None for inst in config.instances)


def _read_gpus(
    state: Any, inventory: Any, hosts: list[tuple[Any, HostConfig]]
) -> tuple[dict[str, list[Gpu]], dict[str, str]]:
    """The NvidiaGpus fact of each host that runs an instance on a GPU (connecting with
    pyinfra), and why it could not be read, per host."""
    from pyinfra.api import Config
    from pyinfra.api.connect import disconnect_all
    from pyinfra.api.exceptions import PyinfraError
    from pyinfra.api.facts import get_fact
    from pyinfra.context import ctx_host, ctx_state

    from gemma4_fleet.facts import NvidiaGpus

    wanted = [host for host, config in hosts if _uses_gpu(config)]
    state.init(inventory, Config(), initial_limit=wanted)
    gpus: dict[str, list[Gpu]] = {}
    errors: dict[str, str] = {}
    with ctx_state.use(state):
        try:
            for host in wanted:  # one by one: nothing here runs under pyinfra's gevent loop
                try:
                    host.connect(show_errors=False, raise_exceptions=True)
                    state.activate_host(host)
                    with ctx_host.use(host):
                        found = get_fact(state, host, NvidiaGpus, apply_failed_hosts=False)
                except (PyinfraError, OSError) as exc:
                    errors[host.name] = f"nvidia-smi: cannot read it: {exc}"
                    continue
                if not found:
                    errors[host.name] = (
                        "nvidia-smi: no NVIDIA GPU found (or no nvidia-smi); "
                        "set gpu_memory_mib and plan without --from-hosts, or fix the driver"
                    )
                    continue
                gpus[host.name] = found
        finally:
            disconnect_all(state)
    return gpus, errors


def _plan(args: argparse.Namespace) -> int:
    # pyinfra_cli first: it monkey-patches ssl, which the pipeline's requests would import.
    state, inventory = _load_inventory(args.inventory, args.data)
    from gemma4_fleet.pipeline import FleetConfigError, host_setups

    hosts = _limited_hosts(inventory, args.limit)
    if not hosts:
        raise ConfigError(f"inventory {args.inventory}: no hosts")
    read = partial(_read_gpus, state, inventory) if args.from_hosts else None
    try:
        # Checksums not filled in yet are planned (headers are read all the same) with a
        # warning; the deploy refuses them.
        setups = host_setups(hosts, read, placeholders=True)
    except FleetConfigError as exc:
        if args.json:
            print(json.dumps({"errors": list(exc.errors)}, indent=2))
        raise
    if args.json:
        print(json.dumps({"hosts": {n: s.plan.to_json() for n, s in setups.items()}}, indent=2))
    else:
        print("\n\n".join(setup.plan.table() for setup in setups.values()))
    for warning in (w for setup in setups.values() for w in setup.warnings):
        print(f"gemma4-fleet: warning: {warning}", file=sys.stderr)
    return 0


def _status(args: argparse.Namespace) -> int:
    state, inventory = _load_inventory(args.inventory, args.data)
    from gemma4_fleet.pipeline import FleetConfigError, host_configs
    from gemma4_fleet.status import read_fleet, status_table

    hosts = _limited_hosts(inventory, args.limit)
    if not hosts:
        raise ConfigError(f"inventory {args.inventory}: no hosts")
    # Host data as the deploy reads it (no plan: that needs no host and may need their GPUs).
    configs, errors, _ = host_configs(hosts, placeholders=True)
    if errors:
        raise FleetConfigError(errors)
    rows = read_fleet(state, inventory, hosts, configs)
    if args.json:
        print(json.dumps({"instances": [row.to_json() for row in rows]}, indent=2))
    else:
        print(status_table(rows))
    return 0 if all(row.ok for row in rows) else 1


def _prometheus_config(args: argparse.Namespace) -> int:
    """Print a Prometheus configuration scraping every instance and node_exporter."""
    _, inventory = _load_inventory(args.inventory, args.data)  # first: it patches the stdlib
    from gemma4_fleet import monitoring
    from gemma4_fleet.pipeline import FleetConfigError, host_configs

    hosts = _limited_hosts(inventory, args.limit)
    if not hosts:
        raise ConfigError(f"inventory {args.inventory}: no hosts")
    configs, errors, _ = host_configs(hosts)
    if errors:
        raise FleetConfigError(errors)
    scrape = [
        monitoring.ScrapeHost(h.name, str(h.data.get("ssh_hostname") or h.name), configs[h.name])
        for h in hosts
        if h.name in configs
    ]
    config, warnings = monitoring.scrape_config(
        scrape, node_exporter_port=args.node_exporter_port, rule_files=args.rules
    )
    for warning in warnings:
        print(f"gemma4-fleet: warning: {warning}", file=sys.stderr)
    print(monitoring.render(config, monitoring.HEADER), end="")
    return 0


def _tune(args: argparse.Namespace) -> int:
    state, inventory = _load_inventory(args.inventory, args.data)  # first: it patches the stdlib
    from gemma4_fleet.tune_command import tune

    hosts = _limited_hosts(inventory, args.limit)
    if not hosts:
        raise ConfigError(f"inventory {args.inventory}: no hosts")
    return tune(state, inventory, hosts, args)


def _fleet(args: argparse.Namespace) -> int:
    # The local test fleet: only this command loads it (the package never needs it).
    from gemma4_fleet.testfleet.hosts import Fleet, FleetError

    try:
        return _fleet_action(Fleet(), args)
    except FleetError as exc:
        raise ConfigError(str(exc)) from exc


def _fleet_action(fleet: Any, args: argparse.Namespace) -> int:
    if args.action == "up":
        began = time.monotonic()
        releases = {"releases": args.release.split(",")} if args.release else {}
        hosts = fleet.up(args.count, **releases)
        for host in hosts:
            print(
                f"{host.name}  {host.address}  {host.release}  booted in {host.boot_seconds:.1f} s"
            )
        print(
            f"fleet of {len(hosts)} up in {time.monotonic() - began:.1f} s; "
            f"mirror {fleet.mirror_url}"
            f" (llama.cpp commit {fleet.mirror_commit}); ssh key {fleet.key}"
        )
        print("deploy: pyinfra inventories/local.py deploys/gemma4_mtp.py")
    elif args.action == "down":
        fleet.down()
        print("fleet down")
    elif args.action == "status":
        print(
            json.dumps(
                {
                    "hosts": [h.name for h in fleet.hosts.values()],
                    "releases": {h.name: h.release for h in fleet.hosts.values()},
                    "leftovers": fleet.leftovers(),
                },
                indent=2,
            )
        )
    elif args.action == "stop":
        fleet.stop_host(args.name)
    elif args.action == "start":
        fleet.start_host(args.name)
    return 0


def _inventory_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inventory", help="pyinfra inventory (file, host list or module)")
    parser.add_argument(
        "--limit",
        action="append",
        default=[],
        metavar="NAME",
        help="only these hosts or groups (glob; repeat or comma-separate)",
    )
    parser.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override host data as pyinfra's --data does (JSON, true/false, integers, strings)",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gemma4-fleet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    fleet = sub.add_parser("fleet", help="a local fleet of systemd-nspawn test hosts")
    fleet_sub = fleet.add_subparsers(dest="action", required=True)
    up = fleet_sub.add_parser("up", help="boot N hosts (tears down any earlier fleet first)")
    up.add_argument("count", type=int)
    up.add_argument(
        "--release",
        metavar="NAME[,NAME...]",
        help="Debian release of the hosts: bookworm (the default) or trixie; a comma list is "
        "taken in turn, e.g. bookworm,trixie: node1 bookworm, node2 trixie",
    )
    fleet_sub.add_parser("down", help="tear down every host, mount, link and mirror")
    fleet_sub.add_parser("status", help="hosts and anything of ours left on this machine")
    for action in ("stop", "start"):
        one = fleet_sub.add_parser(action, help=f"{action} one host")
        one.add_argument("name")
    fleet.set_defaults(func=_fleet)
    plan = sub.add_parser(
        "plan",
        help="VRAM plan per host and GPU for an inventory (pairing, weights, KV, ctx); "
        "touches no host",
        description="Plan every host of a pyinfra inventory as the deploy would: drafter "
        "pairing, then per GPU the weights, KV cache, compute buffers, CUDA overhead, other "
        "tenants and headroom against the budget, and the ctx chosen for ctx_size auto. "
        "Exit status 1 with every error when a host is refused.",
    )
    _inventory_arguments(plan)
    plan.add_argument("--json", action="store_true", help="machine-readable output (bytes)")
    plan.add_argument(
        "--from-hosts",
        action="store_true",
        help="read each GPU's memory from the hosts' nvidia-smi (connects with pyinfra; "
        "gpu_memory_mib in host data still wins)",
    )
    plan.set_defaults(func=_plan)
    status = sub.add_parser(
        "status",
        help="the fleet table, read from the hosts over SSH; changes nothing",
        description="For every instance of every host: unit state, /health, model id and file, "
        "build, the last smoke report (status, age, tok/s, acceptance) and the GPU memory its "
        "server holds. A host that cannot be reached is a row that says so. Exit status 1 when "
        "any instance is not serving or its last smoke check failed.",
    )
    _inventory_arguments(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=_status)
    prom = sub.add_parser(
        "prometheus-config",
        help="print a Prometheus scrape configuration for an inventory; touches no host",
        description="Print prometheus.yml scraping every instance's llama-server /metrics "
        "(instances bound to a non-loopback address) and every host's node_exporter (the smoke "
        "check's textfile metrics), labelled host and instance_name for the shipped alerts.",
    )
    _inventory_arguments(prom)
    prom.add_argument("--node-exporter-port", type=int, default=9100, metavar="PORT")
    prom.add_argument(
        "--rules",
        action="append",
        default=[],
        metavar="FILE",
        help="add to rule_files (e.g. monitoring/alerts.yml); repeatable",
    )
    prom.set_defaults(func=_prometheus_config)
    tune = sub.add_parser(
        "tune",
        help="measure each host's instances on the host and write tuned/<host>.json",
        description="On each host and instance, with the build deployed there: llama-bench "
        "decode tok/s per KV type that fits, then temporary llama-servers (the instance's "
        "models and planned ctx, a spare port) for MTP off and --spec-draft-n-max 1..6 over a "
        "prompt set, and slot counts under concurrent clients when the instance asks for more "
        "than one. Waits for the service to be idle first and restores it after. Writes the "
        "fastest settings with their figures to tuned/<host>.json; the next deploy applies them "
        "(host data still wins). Exit status 1 when an instance could not be measured.",
    )
    _inventory_arguments(tune)
    tune.add_argument(
        "--instance", action="append", default=[], metavar="NAME", help="only these instances"
    )
    tune.add_argument("--prompts", metavar="FILE", help="JSON list or blank-line separated text")
    tune.add_argument("--n-predict", type=int, default=128, help="tokens per request (128)")
    tune.add_argument("--reps", type=int, default=2, help="passes over the prompts (2)")
    tune.add_argument("--depth", type=int, help="llama-bench depth (default ctx/2, max 32768)")
    tune.add_argument("--margin", type=float, default=0.05, help="keep the incumbent within it")
    tune.add_argument("--tuned-dir", metavar="DIR", help="profile folder (default tuned/)")
    tune.add_argument(
        "--rewrite", action="store_true", help="write the profile even when nothing changed"
    )
    tune.set_defaults(func=_tune)
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        lines = str(exc).splitlines()
        print(f"gemma4-fleet: {lines[0]}", *lines[1:], sep="\n", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
