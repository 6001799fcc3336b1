"""Converge benchmark on the local test fleet: first converge, no-op, surgical redeploy.

For each host count it boots that many fresh test hosts per run (a named fleet of its own,
`g4b` on 10.213.3.0/24 unless told otherwise), then times, as a user runs them:

1. first converge: `pyinfra -y INVENTORY deploys/gemma4_mtp.py` on the fresh hosts;
2. no-op converge: the same again;
3. surgical redeploy: `deploys/redeploy_unit.py --limit <first host> --data unit=gemma3` with
   one instance field changed (draft_n_max), so the unit really restarts and is verified.

It counts, per first converge, the compiles (hosts where the "Build llama.cpp" operation
changed), the builds placed from the controller cache, the model fetches (hosts where a "Model"
operation downloaded) and the models placed from the controller cache, and prints medians over
the runs as a Markdown table.

    bench/converge.py --hosts 1,3 --runs 3                 # each run: empty controller cache
    bench/converge.py --hosts 8 --runs 3 --ccache empty    # each host compiles from nothing
    bench/converge.py --hosts 1,3 --cache-dir /tmp/g4f-bench-cache   # keep artifacts

Run as root from the repository root, with no other fleet on the same name.
`--ccache shared` (the default) binds the harness's shared ccache into every host, as the demo
does, so a compile takes about a minute instead of 6-7; `empty` leaves each host its own empty
ccache. Every run starts with an empty controller cache (G4F_CACHE) unless `--cache-dir` names
one to keep between runs: with the build's artifact in it, a first converge compiles nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gemma4_fleet.testfleet.hosts import HOST_CCACHE_DIR, Fleet  # noqa: E402
from gemma4_fleet.testfleet.inventory import demo_data  # noqa: E402
from gemma4_fleet.testfleet.results import changed_ops, results_table  # noqa: E402

PYINFRA = str(Path(sys.executable).with_name("pyinfra"))


@dataclass
class Run:
    seconds: float
    returncode: int
    changed: dict[str, int] = field(default_factory=dict)
    output: str = ""
    cpu: float = 0.0  # the controller's CPU seconds (user + system) for the run
    host_cpu: float = 0.0  # the test hosts' CPU seconds, where measured (bench/noop_scale.py)

    @property
    def tail(self) -> str:
        return self.output[-3000:]

    def count(self, pattern: str) -> int:
        """Hosts changed by the operations whose name matches `pattern` (a regex)."""
        return sum(n for op, n in self.changed.items() if re.search(pattern, op))


def pyinfra(inventory: str, deploy: str, *args: str, env: dict[str, str], cwd: Path = ROOT) -> Run:
    """`pyinfra -y` of `deploy` as a user runs it, from `cwd` (a checkout of this repository)."""
    began, used = time.monotonic(), _children_cpu()
    result = subprocess.run(
        [PYINFRA, "-y", *args, inventory, deploy],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        check=False,
    )
    seconds, cpu = time.monotonic() - began, _children_cpu() - used
    output = result.stdout + result.stderr
    return Run(seconds, result.returncode, changed_ops(results_table(output)), output, cpu)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def write_inventory(
    fleet: Fleet, path: Path, ccache: str, count: int | None = None
) -> dict[str, Any]:
    """An inventory of the fleet's hosts (the first `count` of them) with the demo data."""
    data = demo_data(fleet.mirror_url, fleet.mirror_commit)
    data["llamacpp_build"] = {"cuda": False}
    if ccache == "shared":
        data["llamacpp_build"]["ccache_dir"] = HOST_CCACHE_DIR
    hosts = [(name, {**ssh, **data}) for name, ssh in fleet.inventory()][:count]
    path.write_text(f"hosts = {hosts!r}\n")
    return data


def one_run(fleet: Fleet, count: int, args: argparse.Namespace, cache: Path) -> dict[str, Any]:
    boot = time.monotonic()
    fleet.up(count)
    boot = time.monotonic() - boot
    with tempfile.TemporaryDirectory() as tmp:
        inventory = Path(tmp) / "bench_inventory.py"
        data = write_inventory(fleet, inventory, args.ccache)
        env = {"G4F_CACHE": str(cache), "G4F_PROGRESS_INTERVAL": "600"}
        parallel = ["--parallel", str(args.parallel)] if args.parallel else []
        first = pyinfra(str(inventory), "deploys/gemma4_mtp.py", *parallel, env=env)
        if first.returncode:
            raise SystemExit(f"first converge of {count} hosts failed:\n{first.tail}")
        noop = pyinfra(str(inventory), "deploys/gemma4_mtp.py", *parallel, env=env)
        if noop.returncode or noop.changed:
            raise SystemExit(f"no-op converge changed {noop.changed}:\n{noop.tail}")
        instance = {**data["llama_instances"][0], "draft_n_max": 3}
        surgical = pyinfra(
            str(inventory),
            "deploys/redeploy_unit.py",
            "--limit",
            next(iter(fleet.hosts)),
            "--data",
            "unit=gemma3",
            "--data",
            f"llama_instances={json.dumps([instance])}",
            env=env,
        )
        if surgical.returncode:
            raise SystemExit(f"surgical redeploy failed:\n{surgical.tail}")
    return {
        "boot_s": boot,
        "first_s": first.seconds,
        "noop_s": noop.seconds,
        "surgical_s": surgical.seconds,
        "compiles": first.count("Build llama.cpp"),
        "from_cache": first.count(r"llama\.cpp \S+ from the controller cache"),
        # Downloads from the model's URL; the other hosts place the controller's copy.
        "model_fetches": first.count(r"(^|\| )Model [^|]*\.gguf"),
        "models_from_cache": first.count(r"\.gguf from the controller cache"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", default="1,2,4,8", help="host counts, e.g. 1,3")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--ccache", choices=("shared", "empty"), default="shared")
    parser.add_argument("--cache-dir", type=Path, help="controller cache kept between runs")
    parser.add_argument("--parallel", type=int, default=0, help="pyinfra --parallel (0: all)")
    parser.add_argument("--fleet", default="g4b")
    parser.add_argument("--network", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write every run's figures here")
    args = parser.parse_args()
    fleet = Fleet(name=args.fleet, network=args.network)
    results: dict[int, list[dict[str, Any]]] = {}
    try:
        with tempfile.TemporaryDirectory() as cold:
            for count in (int(n) for n in args.hosts.split(",")):
                for i in range(args.runs):
                    cache = args.cache_dir or Path(cold) / f"{count}-{i}"
                    run = one_run(fleet, count, args, cache)
                    results.setdefault(count, []).append(run)
                    print(f"{count} hosts, run {i + 1}: {json.dumps(run)}", flush=True)
    finally:
        fleet.down()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print(
        "\n| hosts | first converge s | no-op s | surgical s | compiles | builds from cache "
        "| model fetches | models from cache |\n|---|---|---|---|---|---|---|---|"
    )
    for count, runs in results.items():

        def median(key: str, runs: list[dict[str, Any]] = runs) -> float:
            return float(statistics.median(r[key] for r in runs))

        print(
            f"| {count} | {median('first_s'):.1f} | {median('noop_s'):.1f} "
            f"| {median('surgical_s'):.1f} | {median('compiles'):g} | {median('from_cache'):g} "
            f"| {median('model_fetches'):g} | {median('models_from_cache'):g} |"
        )


if __name__ == "__main__":
    main()
