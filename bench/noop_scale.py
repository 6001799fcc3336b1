"""No-op converge of 1 host against N hosts, side by side: how flat the converge stays.

Boots N fresh test hosts once (a named fleet, `g4b` on 10.213.3.0/24 unless told otherwise),
converges them (with the controller cache `G4F_CACHE` as it is: with the build's artifact
there, nothing compiles), then alternates, `--runs` times, a no-op of the first host alone
(`--limit`) and a no-op of all N, and prints the medians, their ratio, and the commands pyinfra
ran per host in one no-op (from `--debug`: fact reads and anything executed).

    bench/noop_scale.py --hosts 8 --runs 5

Run as root from the repository root, with no other fleet on the same name.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.converge import pyinfra, write_inventory  # noqa: E402
from gemma4_fleet.testfleet.hosts import Fleet  # noqa: E402

ENV = {"G4F_PROGRESS_INTERVAL": "600"}


def converge(inventory: Path, *args: str) -> tuple[float, str]:
    """One timed `pyinfra -y` of the demo job; (seconds, output), or exit with its tail."""
    run = pyinfra(str(inventory), "deploys/gemma4_mtp.py", *args, env=ENV)
    if run.returncode:
        raise SystemExit(f"pyinfra {' '.join(args)} failed:\n{run.tail}")
    return run.seconds, run.output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, default=8)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--fleet", default="g4b")
    parser.add_argument("--network", type=int, default=3)
    args = parser.parse_args()
    fleet = Fleet(name=args.fleet, network=args.network)
    try:
        boot = time.monotonic()
        fleet.up(args.hosts)
        print(f"booted {args.hosts} hosts in {time.monotonic() - boot:.1f} s", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            inventory = Path(tmp) / "inventory.py"
            write_inventory(fleet, inventory, "shared")
            first, _ = converge(inventory)
            print(f"first converge of {args.hosts} hosts: {first:.1f} s", flush=True)
            one_host = ["--limit", next(iter(fleet.hosts))]
            one: list[float] = []
            all_: list[float] = []
            for _ in range(args.runs):
                one.append(converge(inventory, *one_host)[0])
                all_.append(converge(inventory)[0])
            _, debug = converge(inventory, "--debug")
    finally:
        fleet.down()
    commands = {
        name: len(re.findall(rf"Running command on {re.escape(name)}:", debug))
        for name in fleet_names(debug)
    }
    m1, mn = statistics.median(one), statistics.median(all_)
    print(f"\nno-op, medians of {args.runs} runs (alternating):")
    print("| hosts | no-op s | ratio to 1 host | commands per host |\n|---|---|---|---|")
    print(f"| 1 | {m1:.2f} | 1.00 | |")
    print(
        f"| {args.hosts} | {mn:.2f} | {mn / m1:.2f} | "
        f"{statistics.median(commands.values()) if commands else 0:g} |"
    )
    rounded = [[round(s, 2) for s in runs] for runs in (one, all_)]
    print(f"runs, 1 host: {rounded[0]}; {args.hosts} hosts: {rounded[1]}")


def fleet_names(debug: str) -> set[str]:
    return set(re.findall(r"Running command on (\S+):", debug))


if __name__ == "__main__":
    main()
