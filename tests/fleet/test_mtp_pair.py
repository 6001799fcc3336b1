"""The Gemma 4 draft-mtp path end to end on the CPU fleet, with a synthetic gemma4 pair."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from gemma4_fleet.common import sha256_file
from gemma4_fleet.host_scripts.smoke_check import parse_metrics_text
from gemma4_fleet.synthetic import SyntheticPair, write_pair
from gemma4_fleet.testfleet.hosts import Fleet
from gemma4_fleet.testfleet.inventory import demo_data
from tests.fleet.conftest import PyinfraRun, data_arg, run_pyinfra

pytestmark = pytest.mark.fleet
UNIT = "llama-server-gemma4.service"
DRAFTS = "llamacpp:spec_decode_num_drafts_total"


@pytest.fixture(scope="module")
def pairs(
    fleet: Fleet, deployed: PyinfraRun, gemma3_270m: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[SyntheticPair, SyntheticPair]]:
    out = tmp_path_factory.mktemp("gemma4-pair")
    good = write_pair(out, tokenizer_from=gemma3_270m)
    bad = write_pair(out, tokenizer_from=gemma3_270m, mismatched_drafter=True)
    yield good, bad
    for name in fleet.hosts:
        fleet.ssh(name, f"systemctl disable --now {UNIT} llama-smoke-gemma4.timer", check=False)


def host_data(fleet: Fleet, target: Path, drafter: Path) -> list[str]:
    """The demo instance plus a gemma4 instance (its own unit and port) on the synthetic pair."""
    demo = demo_data(fleet.mirror_url, fleet.mirror_commit)
    models: dict[str, Any] = {
        **demo["llama_models"],
        "g4-target": {
            "role": "target",
            "file": target.name,
            "sha256": sha256_file(target),
            "url": fleet.add_mirror_file(target),
        },
        "g4-assistant": {
            "role": "drafter",
            "file": drafter.name,
            "sha256": sha256_file(drafter),
            "url": fleet.add_mirror_file(drafter),
        },
    }
    gemma4 = {
        "name": "gemma4",
        "target": "g4-target",
        "drafter": "g4-assistant",
        "ctx_size": 2048,
        "host": "0.0.0.0",
        "allow_unauthenticated": True,  # the fleet's bridge is private to this machine
        # The recipe's q8_0 KV, said explicitly: the default "auto" takes f16 on a CPU host.
        "cache_type_k": "q8_0",
        "cache_type_v": "q8_0",
        "port": 8081,
        "threads": 1,
    }
    return [
        *data_arg("llama_models", models),
        *data_arg("llama_instances", [*demo["llama_instances"], gemma4]),
    ]


def metric(address: str, name: str) -> float:
    text = requests.get(f"http://{address}:8081/metrics", timeout=30).text
    return sum(
        value for (metric_name, _), value in parse_metrics_text(text).items() if metric_name == name
    )


def test_the_pair_deploys_with_the_recipe_and_drafts(
    fleet: Fleet, pairs: tuple[SyntheticPair, SyntheticPair]
) -> None:
    good, _ = pairs
    run = run_pyinfra("deploys/gemma4_mtp.py", *host_data(fleet, good.target, good.drafter))
    assert run.returncode == 0, run.output[-4000:]
    for name, host in fleet.hosts.items():
        exec_start = fleet.ssh(name, f"systemctl show -p ExecStart {UNIT}").stdout
        for flags in (
            "--spec-type draft-mtp",
            "--spec-draft-n-max 3",
            "--cache-type-k q8_0",
            "--cache-type-v q8_0",
            "--cache-type-k-draft q8_0",
            "--cache-type-v-draft q8_0",
            "--parallel 1",
            "--fit off",
            "--flash-attn on",
        ):
            assert flags in exec_start, flags
        assert requests.get(f"http://{host.address}:8081/health", timeout=10).status_code == 200
        before = metric(host.address, DRAFTS)
        completion = requests.post(
            f"http://{host.address}:8081/completion",
            timeout=300,
            json={"prompt": "The fleet of GPU hosts", "n_predict": 48, "temperature": 0},
        ).json()
        assert completion["timings"]["draft_n"] > 0, completion["timings"]
        # The synthetic drafter agrees with its target by construction: drafts are accepted.
        assert completion["timings"]["draft_n_accepted"] > 0, completion["timings"]
        assert metric(host.address, DRAFTS) > before


def test_a_mismatched_drafter_is_refused_before_any_host_is_touched(
    fleet: Fleet, pairs: tuple[SyntheticPair, SyntheticPair]
) -> None:
    good, bad = pairs
    run = run_pyinfra("deploys/gemma4_mtp.py", *host_data(fleet, good.target, bad.drafter))
    assert run.returncode != 0
    assert "Starting operation" not in run.output
    for name in fleet.hosts:
        line = next(
            line
            for line in run.output.splitlines()
            if f"host {name}:" in line and "drafter" in line
        )
        assert "g4-assistant" in line and "g4-target" in line, line
