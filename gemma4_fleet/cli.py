"""The `gemma4-fleet` command: a local test fleet by hand, and (later) plans for an inventory."""

from __future__ import annotations

import argparse
import json
import sys
import time

from gemma4_fleet.testfleet.hosts import Fleet, FleetError


def _fleet(args: argparse.Namespace) -> int:
    fleet = Fleet()
    if args.action == "up":
        began = time.monotonic()
        hosts = fleet.up(args.count)
        for host in hosts:
            print(f"{host.name}  {host.address}  booted in {host.boot_seconds:.1f} s")
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
                {"hosts": [h.name for h in fleet.hosts.values()], "leftovers": fleet.leftovers()},
                indent=2,
            )
        )
    elif args.action == "stop":
        fleet.stop_host(args.name)
    elif args.action == "start":
        fleet.start_host(args.name)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gemma4-fleet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    fleet = sub.add_parser("fleet", help="a local fleet of systemd-nspawn test hosts")
    fleet_sub = fleet.add_subparsers(dest="action", required=True)
    up = fleet_sub.add_parser("up", help="boot N hosts (tears down any earlier fleet first)")
    up.add_argument("count", type=int)
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
    plan.add_argument("inventory", help="pyinfra inventory (file, host list or module)")
    plan.add_argument(
        "--limit",
        action="append",
        default=[],
        metavar="NAME",
        help="only these hosts or groups (glob; repeat or comma-separate)",
    )
    plan.add_argument("--json", action="store_true", help="machine-readable output (bytes)")
    plan.add_argument(
        "--from-hosts",
        action="store_true",
        help="read each GPU's memory from the hosts' nvidia-smi (connects with pyinfra; "
        "gpu_memory_mib in host data still wins)",
    )
    plan.set_defaults(func=_plan)
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except (FleetError, ConfigError) as exc:
        print(f"gemma4-fleet: {exc}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
