"""The planner's KV cache prediction equals what the deployed llama-server allocates."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gemma4_fleet.gguf_meta import read_meta
from gemma4_fleet.memory_model import kv_cache_bytes
from gemma4_fleet.testfleet.hosts import Fleet
from gemma4_fleet.testfleet.inventory import demo_data
from tests.fleet.conftest import PyinfraRun, data_arg, run_pyinfra
from tests.fleet.test_deploy import unit_state

pytestmark = pytest.mark.fleet
MIB = 1024 * 1024


@pytest.mark.parametrize(
    ("ctx", "parallel", "cache"),
    [(4096, 1, "q8_0"), (4096, 1, "f16"), (8192, 2, "q8_0")],
)
@pytest.mark.usefixtures("demo_restored_after_module")
def test_kv_prediction_matches_the_server_log(
    fleet: Fleet, deployed: PyinfraRun, gemma3_270m: Path, ctx: int, parallel: int, cache: str
) -> None:
    name = "g4f-node1"
    demo = demo_data(fleet.mirror_url, fleet.mirror_commit)
    instance = {
        **demo["llama_instances"][0],
        "ctx_size": ctx,
        "parallel": parallel,
        "cache_type_k": cache,
        "cache_type_v": cache,
        "extra_args": ["--log-verbosity", "4"],  # the KV size lines are printed at level 4
    }
    run = run_pyinfra(
        "deploys/gemma4_mtp.py", "--limit", name, *data_arg("llama_instances", [instance])
    )
    assert run.returncode == 0, run.output[-3000:]
    invocation = unit_state(fleet, name)["InvocationID"]
    log = fleet.ssh(name, f"journalctl -o cat _SYSTEMD_INVOCATION_ID={invocation}").stdout
    # The target's caches come first (non-SWA, then SWA; cells per stream), then the draft's.
    logged = re.findall(r"llama_kv_cache: size =\s+([\d.]+) MiB \(\s*(\d+) cells", log)[:2]
    kv = kv_cache_bytes(
        read_meta(gemma3_270m),
        n_ctx=ctx,
        parallel=parallel,
        unified=False,
        type_k=cache,
        type_v=cache,
        flash_attn=True,
    )
    predicted = [
        (f"{kv.full_bytes / MIB:.2f}", str(kv.cells_full)),
        (f"{kv.swa_bytes / MIB:.2f}", str(kv.cells_swa)),
    ]
    print(f"\n{ctx=} {parallel=} {cache=}: predicted {predicted}, logged {logged}")
    assert logged == predicted
