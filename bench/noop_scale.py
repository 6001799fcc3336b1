"""No-op converge of 1 host against N hosts, side by side: how flat the converge stays.

Boots N fresh test hosts once (a named fleet, `g4b` on 10.213.3.0/24 unless told otherwise),
converges them (with the controller cache `G4F_CACHE` as it is: with the build's artifact
there, nothing compiles), then alternates, `--runs` times, a no-op of a 1-host inventory (the
first host) and of the N-host inventory, and prints the medians of wall time and of the
controller's CPU time, their ratios, and the SSH commands per host in one no-op (from
`--debug`: fact reads and anything executed).

With `--before DIR`, a checkout of an earlier commit (`git worktree add DIR <commit>`) runs
the same no-ops from DIR in the same rounds, for a before/after table measured side by side.

    bench/noop_scale.py --hosts 8 --runs 5 [--before /tmp/before]

Run as root from the repository root, with no other fleet on the same name.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.converge import Run, pyinfra, write_inventory  # noqa: E402
from gemma4_fleet.common import cache_dir  # noqa: E402
from gemma4_fleet.testfleet.hosts import Fleet  # noqa: E402

ENV = {"G4F_PROGRESS_INTERVAL": "600"}


def own_cache(base: Path, path: Path) -> Path:
    """A controller cache sharing `base`'s builds and models but with fact-read records of its
    own: each checkout batches what it read last time, not what the other one read."""
    path.mkdir()
    for entry in base.iterdir():
        if entry.name != "fact-reads":
            (path / entry.name).symlink_to(entry)
    return path


def tree_cpu(pids: list[int]) -> float:
    """CPU seconds (user + system, reaped children included) of these processes and all their
    descendants: the test hosts' whole containers, from their nspawn processes."""
    children: dict[int, list[int]] = {}
    own: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(entry.name))
        own[int(entry.name)] = sum(int(t) for t in fields[11:15])
    ticks, todo = 0, list(pids)
    while todo:
        pid = todo.pop()
        ticks += own.get(pid, 0)
        todo += children.get(pid, [])
    return ticks / os.sysconf("SC_CLK_TCK")


def converge(
    inventory: Path, checkout: Path, cache: Path, pids: list[int], *args: str, noop: bool = True
) -> Run:
    """One timed `pyinfra -y` of the demo job with `checkout`'s package, with the CPU the hosts
    `pids` spent meanwhile (`host_cpu`); exit with its tail if it failed (or, when `noop`,
    changed something)."""
    env = {**ENV, "PYTHONPATH": str(checkout), "G4F_CACHE": str(cache)}
    before = tree_cpu(pids)
    run = pyinfra(str(inventory), "deploys/gemma4_mtp.py", *args, env=env, cwd=checkout)
    time.sleep(0.5)  # the hosts' last processes of the run end and are reaped
    run.host_cpu = tree_cpu(pids) - before
    if run.returncode or (noop and run.changed):
        raise SystemExit(f"no-op from {checkout} failed or changed {run.changed}:\n{run.tail}")
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, default=8)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--fleet", default="g4b")
    parser.add_argument("--network", type=int, default=3)
    parser.add_argument("--before", type=Path, help="checkout of an earlier commit to compare")
    args = parser.parse_args()
    checkouts = {"after": ROOT, **({"before": args.before.resolve()} if args.before else {})}
    fleet = Fleet(name=args.fleet, network=args.network)
    try:
        boot = time.monotonic()
        fleet.up(args.hosts)
        print(f"booted {args.hosts} hosts in {time.monotonic() - boot:.1f} s", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            every, one = Path(tmp) / "fleet.py", Path(tmp) / "one.py"
            write_inventory(fleet, every, "shared")
            first = pyinfra(str(every), "deploys/gemma4_mtp.py", env=ENV)
            if first.returncode:
                raise SystemExit(f"first converge failed:\n{first.tail}")
            print(f"first converge of {args.hosts} hosts: {first.seconds:.1f} s", flush=True)
            write_inventory(fleet, one, "shared", count=1)
            pids = {one: [fleet.hosts[h].pid for h in list(fleet.hosts)[:1]]}
            pids[every] = [h.pid for h in fleet.hosts.values()]
            caches = {name: own_cache(cache_dir(), Path(tmp) / name) for name in checkouts}
            runs: dict[tuple[str, Path], list[Run]] = {}
            # Warm-up: the last run's facts for the batch; an older checkout may still change
            # what the current one left (before 2026-12-01, pyinfra's server.user made the
            # service account's home, /nonexistent, as a directory).
            for name, checkout in checkouts.items():
                for inventory in (one, every):
                    converge(inventory, checkout, caches[name], pids[inventory], noop=False)
            for _ in range(args.runs):
                for name, checkout in checkouts.items():
                    for inventory in (one, every):
                        runs.setdefault((name, inventory), []).append(
                            converge(inventory, checkout, caches[name], pids[inventory])
                        )
            debug = {
                name: converge(every, c, caches[name], pids[every], "--debug").output
                for name, c in checkouts.items()
            }
            hosts = list(fleet.hosts)
    finally:
        fleet.down()
    n = args.hosts
    print(
        f"\nno-op, medians of {args.runs} alternating runs (wall s; controller CPU s; CPU ms "
        "each host spent, from its container's processes):"
    )
    print(
        f"| package | 1 host | {n} hosts | wall ratio | CPU 1 host | CPU {n} hosts | CPU ratio "
        "| host CPU per host | SSH commands per host |\n|---|---|---|---|---|---|---|---|---|"
    )
    for name in checkouts:
        w1, wn = (statistics.median(r.seconds for r in runs[(name, inv)]) for inv in (one, every))
        c1, cn = (statistics.median(r.cpu for r in runs[(name, inv)]) for inv in (one, every))
        host_ms = statistics.median(r.host_cpu * 1000 / n for r in runs[(name, every)])
        commands = [
            len(re.findall(rf"Running command on {re.escape(h)}:", debug[name])) for h in hosts
        ]
        print(
            f"| {name} | {w1:.2f} | {wn:.2f} | {wn / w1:.2f} | {c1:.2f} | {cn:.2f} "
            f"| {cn / c1:.2f} | {host_ms:.0f} | {statistics.median(commands):g} |"
        )
    for (name, inventory), taken in runs.items():
        label = "1 host" if inventory == one else f"{n} hosts"
        print(f"{name}, {label}: {[round(r.seconds, 2) for r in taken]}")


if __name__ == "__main__":
    main()
