"""VRAM plan per host: auto/fixed ctx against the budget, refusals naming host and field, the CLI.

Expected numbers come from the KV formula written out below, the memory model's terms (tested on
their own against llama-server's logs) or are written down by hand, never from the plan under test.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from functools import partial
from http.server import ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gguf
import numpy as np
import pytest

from gemma4_fleet.config import ConfigError, HostConfig, ModelFile, parse_host_config
from gemma4_fleet.facts import Gpu
from gemma4_fleet.gguf_meta import ModelMeta, read_meta
from gemma4_fleet.memory_model import (
    CUDA_OVERHEAD_BYTES,
    DRAFT_CONTEXT_OVERHEAD_BYTES,
    MIB,
    CacheOptions,
    compute_buffer_bytes,
    gpu_usage,
    weight_bytes_on_gpu,
)
from gemma4_fleet.pipeline import FleetConfigError, host_setups, resolve_gpus
from gemma4_fleet.synthetic import SyntheticPair, shape_spec, write_pair
from gemma4_fleet.testfleet.assets import GEMMA3_270M_SHA256
from gemma4_fleet.testfleet.mirrors import RangeRequestHandler
from gemma4_fleet.vram_plan import (
    CPU_AUTO_CTX,
    HostPlan,
    Tenant,
    meta_for_model,
    plan_host,
)

pytestmark = pytest.mark.unit

HOST = "gpu-a"
COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"
SHA = "0" * 64
Q8 = CacheOptions(parallel=1, type_k="q8_0", type_v="q8_0", flash_attn=True)
HEADROOM_MIB = 512  # HostConfig default vram_headroom_mib
TINY = shape_spec("tiny")
BOX_A_CTX = 29184  # Gemma 3 270M, q8_0, in 1200 - 256 MiB (see test_cli_json_and_table)


# --- fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, gemma3_270m: Path) -> SyntheticPair:
    return write_pair(tmp_path_factory.mktemp("pair"), tokenizer_from=gemma3_270m)


@pytest.fixture(scope="module")
def mismatched(tmp_path_factory: pytest.TempPathFactory, gemma3_270m: Path) -> SyntheticPair:
    out = tmp_path_factory.mktemp("mismatched")
    return write_pair(out, tokenizer_from=gemma3_270m, mismatched_drafter=True)


@pytest.fixture(scope="module")
def meta_270m(gemma3_270m: Path) -> ModelMeta:
    return read_meta(gemma3_270m)


@pytest.fixture(scope="module")
def metas(pair: SyntheticPair) -> tuple[ModelMeta, ModelMeta]:
    return read_meta(pair.target), read_meta(pair.drafter)


def _model(role: str, source: Path | str) -> dict[str, Any]:
    where = {"url": source} if isinstance(source, str) else {"local_path": str(source)}
    return {"role": role, "file": "m.gguf", "sha256": SHA, **where}


def _data(
    models: dict[str, dict[str, Any]], instances: list[dict[str, Any]], **extra: Any
) -> dict[str, Any]:
    return {
        "llamacpp": {"git_url": "https://example.invalid/llama.cpp.git", "commit": COMMIT},
        "llama_models": models,
        "llama_instances": instances,
        **extra,
    }


def _host(
    models: dict[str, dict[str, Any]], instances: list[dict[str, Any]], **extra: Any
) -> HostConfig:
    return parse_host_config(HOST, _data(models, instances, **extra))


# The tests of ctx and fit use the recipe's q8_0 KV explicitly (the default "auto" is tested
# on its own below).
_Q8_0 = {"cache_type_k": "q8_0", "cache_type_v": "q8_0"}


def _g3(**inst: Any) -> dict[str, Any]:
    """One plain Gemma 3 270M instance (no drafter) on GPU 0, q8_0 KV."""
    return {
        "name": "gemma3",
        "target": "g3",
        "spec_type": "none",
        "gpu": "0",
        "ctx_size": 8192,
        **_Q8_0,
        **inst,
    }


def _g4(**inst: Any) -> dict[str, Any]:
    """The synthetic Gemma 4 target + assistant (draft-mtp) on GPU 0, q8_0 KV."""
    return {
        "name": "gemma4",
        "target": "g4",
        "drafter": "g4-asst",
        "gpu": "0",
        "ctx_size": 8192,
        **_Q8_0,
        **inst,
    }


def _pair_models(pair: SyntheticPair) -> dict[str, dict[str, Any]]:
    return {"g4": _model("target", pair.target), "g4-asst": _model("drafter", pair.drafter)}


def _plan(config: HostConfig, gpus: list[Gpu] | None = None) -> HostPlan:
    """The plan as the pipeline makes it: GPU references resolved first (None: GPUs not read)."""
    found, _, errors = resolve_gpus(HOST, config, gpus)
    if errors:
        raise ConfigError("\n".join(errors))
    return plan_host(HOST, config, found, meta_for_model)


def _plan_error(config: HostConfig, gpus: list[Gpu] | None = None) -> str:
    with pytest.raises(ConfigError) as err:
        _plan(config, gpus)
    return str(err.value)


def _pad(n: int) -> int:
    return -(-n // 256) * 256


def _q8_row(width: int) -> int:
    return width // 32 * 34


def kv_270m(n_ctx: int) -> int:
    """Gemma 3 270M, q8_0, -np 1: 3 full layers of n_ctx cells, 15 SWA layers of
    P(min(n_ctx, 512 + 512)) cells, K and V rows of 1 head x 256."""
    return 3 * n_ctx * 2 * _q8_row(256) + 15 * _pad(min(n_ctx, 512 + 512)) * 2 * _q8_row(256)


def kv_tiny(n_ctx: int) -> int:
    """Synthetic tiny gemma4 target, q8_0, -np 1: only the first n_layer - shared_kv_layers
    layers own KV; SWA layers hold P(min(n_ctx, n_swa + 512)) cells. The assistant has none."""
    total = 0
    for il in range(TINY.n_layer - TINY.shared_kv_layers):
        if TINY.swa_pattern[il]:
            width, cells = (
                TINY.n_head_kv_swa * TINY.head_dim_swa,
                _pad(min(n_ctx, TINY.sliding_window + 512)),
            )
        else:
            width, cells = TINY.n_head_kv_full * TINY.head_dim_full, n_ctx
        total += cells * 2 * _q8_row(width)
    return total


def _mib(n: int) -> str:
    return f"{n / MIB:.2f} MiB"


# --- auto and fixed ctx -----------------------------------------------------------------------


def test_auto_ctx_is_the_largest_multiple_of_256_that_fits(
    pair: SyntheticPair, metas: tuple[ModelMeta, ModelMeta]
) -> None:
    target, drafter = metas
    reserve = 100
    at_4096 = gpu_usage(target, n_ctx=4096, cache=Q8, drafter=drafter)
    budget_mib = -(-at_4096.total // MIB) + reserve + HEADROOM_MIB
    whisper = {"unit": "whisper.service", "gpu": "0", "vram_reserve_mib": reserve}
    config = _host(
        _pair_models(pair),
        [_g4(ctx_size="auto")],
        gpu_memory_mib={"0": budget_mib},
        gpu_services=[{**whisper, "share_gpu_with_llama": True}],
    )
    plan = _plan(config)
    ctx = plan.ctx_for("gemma4")

    def fits(n_ctx: int) -> bool:
        used = gpu_usage(target, n_ctx=n_ctx, cache=Q8, drafter=drafter).total
        return used + (reserve + HEADROOM_MIB) * MIB <= budget_mib * MIB

    assert ctx % 256 == 0 and 4096 <= ctx < TINY.context_length
    assert fits(ctx) and not fits(ctx + 256)

    row = plan.instance_plan("gemma4")
    assert row.kv == kv_tiny(ctx)
    assert row.weights == weight_bytes_on_gpu(target) + weight_bytes_on_gpu(drafter)
    # the assistant reads the target's KV cache: its compute buffer is sized over the target's
    target_compute = compute_buffer_bytes(target, n_ctx=ctx, cache=Q8)
    draft_compute = compute_buffer_bytes(drafter, n_ctx=ctx, cache=Q8, kv_from=target)
    assert row.compute == target_compute + draft_compute
    assert row.overhead == CUDA_OVERHEAD_BYTES + DRAFT_CONTEXT_OVERHEAD_BYTES
    assert row.tenants == (Tenant("whisper.service", reserve * MIB),)
    assert row.headroom == HEADROOM_MIB * MIB and row.budget == budget_mib * MIB
    assert row.free == budget_mib * MIB - (
        row.weights + row.kv + row.compute + row.overhead + (reserve + HEADROOM_MIB) * MIB
    )
    assert row.fits and row.budget_source == "gpu_memory_mib.0"


def test_auto_ctx_is_capped_at_n_ctx_train(
    gemma3_270m: Path, meta_270m: ModelMeta, pair: SyntheticPair
) -> None:
    models = {"g3": _model("target", gemma3_270m), **_pair_models(pair)}
    config = _host(
        models,
        [_g3(ctx_size="auto", port=8081), _g4(ctx_size="auto", gpu="1", parallel=1)],
        gpu_memory_mib={"0": 80000, "1": 80000},
    )
    plan = _plan(config)
    assert plan.ctx_for("gemma3") == meta_270m.context_length == 32768
    assert plan.ctx_for("gemma4") == TINY.context_length
    # parallel N: up to n_ctx_train tokens per slot
    two = _host(models, [_g3(ctx_size="auto", parallel=2)], gpu_memory_mib={"0": 80000})
    assert _plan(two).ctx_for("gemma3") == 2 * 32768


def test_fixed_ctx_that_fits_passes_through(gemma3_270m: Path, meta_270m: ModelMeta) -> None:
    config = _host(
        {"g3": _model("target", gemma3_270m)}, [_g3(ctx_size=4000)], gpu_memory_mib={"0": 2000}
    )
    row = _plan(config).instance_plan("gemma3")
    assert row.ctx == 4000  # what goes into --ctx-size; llama.cpp pads the cache to 4096
    assert row.kv == kv_270m(4096)
    assert row.compute == compute_buffer_bytes(meta_270m, n_ctx=4096, cache=Q8)
    assert row.weights == weight_bytes_on_gpu(meta_270m)


def test_fixed_ctx_over_budget_is_refused_with_the_breakdown(
    gemma3_270m: Path, meta_270m: ModelMeta
) -> None:
    budget_mib = -(-gpu_usage(meta_270m, n_ctx=8192, cache=Q8).total // MIB)
    budget_mib += HEADROOM_MIB
    config = _host(
        {"g3": _model("target", gemma3_270m)},
        [_g3(ctx_size=32768)],
        gpu_memory_mib={"0": budget_mib},
    )
    message = _plan_error(config)
    assert message.startswith(
        f"host {HOST}: llama_instances[gemma3].ctx_size: ctx 32768 does not fit GPU 0: "
    )
    weights = weight_bytes_on_gpu(meta_270m)
    kv = kv_270m(32768)
    compute = compute_buffer_bytes(meta_270m, n_ctx=32768, cache=Q8)
    used = weights + kv + compute + CUDA_OVERHEAD_BYTES + HEADROOM_MIB * MIB
    for part in (
        f"weights {_mib(weights)}",
        f"KV {_mib(kv)}",
        f"compute {_mib(compute)}",
        f"CUDA overhead {_mib(CUDA_OVERHEAD_BYTES)}",
        "other tenants 0.00 MiB",
        f"headroom {HEADROOM_MIB}.00 MiB",
        f"= {_mib(used)}, budget {budget_mib}.00 MiB (gpu_memory_mib.0)",
    ):
        assert part in message, part
    # written down (the budget is the 8192 plan rounded up to MiB), and shown below to be the
    # last multiple of 256 that fits
    largest = int(message.rsplit(" ", 1)[1])
    assert budget_mib == 1384 and largest == 8192

    def used(n_ctx: int) -> int:
        return (
            weights
            + kv_270m(n_ctx)
            + compute_buffer_bytes(meta_270m, n_ctx=n_ctx, cache=Q8)
            + CUDA_OVERHEAD_BYTES
            + HEADROOM_MIB * MIB
        )

    assert used(largest) <= budget_mib * MIB < used(largest + 256)


def test_budget_smaller_than_the_weights(gemma3_270m: Path, meta_270m: ModelMeta) -> None:
    models = {"g3": _model("target", gemma3_270m)}
    config = _host(models, [_g3(ctx_size="auto")], gpu_memory_mib={"0": 700}, vram_headroom_mib=0)
    message = _plan_error(config)
    weights = weight_bytes_on_gpu(meta_270m)
    assert message.startswith(
        f"host {HOST}: gpu_memory_mib.0: GPU 0 budget 700.00 MiB leaves "
        f"{_mib(700 * MIB - CUDA_OVERHEAD_BYTES)} for the weights of llama_instances[gemma3]"
    )
    assert f"the weights (g3) need {_mib(weights)}" in message
    # the budget read from nvidia-smi: the field is the instance's GPU
    small = Gpu(0, "GPU-0000", "NVIDIA T400", 700, 0, "7.5")
    config = _host(models, [_g3(ctx_size="auto")], vram_headroom_mib=0)
    assert _plan_error(config, [small]).startswith(
        f"host {HOST}: llama_instances[gemma3].gpu: GPU 0 budget 700.00 MiB leaves"
    )


def test_auto_that_fits_nothing_names_ctx_size(gemma3_270m: Path, meta_270m: ModelMeta) -> None:
    # the weights fit, but not even 256 tokens of KV and compute do
    lean = weight_bytes_on_gpu(meta_270m) + CUDA_OVERHEAD_BYTES
    config = _host(
        {"g3": _model("target", gemma3_270m)},
        [_g3(ctx_size="auto")],
        gpu_memory_mib={"0": -(-lean // MIB) + 1},
        vram_headroom_mib=0,
    )
    assert _plan_error(config).startswith(
        f"host {HOST}: llama_instances[gemma3].ctx_size: auto: not even ctx 256 fits GPU 0: "
    )


def test_ctx_above_n_ctx_train(gemma3_270m: Path) -> None:
    models = {"g3": _model("target", gemma3_270m)}
    gpu = _host(models, [_g3(ctx_size=40000)], gpu_memory_mib={"0": 80000})
    expected = (
        f"host {HOST}: llama_instances[gemma3].ctx_size: ctx 40000 gives {_pad(40000)} tokens "
        "per slot (parallel 1), above n_ctx_train 32768 of g3"
    )
    assert _plan_error(gpu).startswith(expected)
    cpu = _host(models, [_g3(ctx_size=40000, gpu=None)], llamacpp_build={"cuda": False})
    assert _plan_error(cpu).startswith(expected)


def test_cpu_instances(gemma3_270m: Path, meta_270m: ModelMeta) -> None:
    config = _host(
        {"g3": _model("target", gemma3_270m)},
        [
            _g3(name="auto", ctx_size="auto", gpu=None),
            _g3(name="fixed", ctx_size=2048, gpu=None, port=8081),
        ],
        llamacpp_build={"cuda": False},
    )
    plan = _plan(config)
    assert plan.ctx_for("auto") == min(meta_270m.context_length, CPU_AUTO_CTX) == 8192
    assert plan.ctx_for("fixed") == 2048
    row = plan.instance_plan("fixed")
    assert row.gpu is None and row.budget is None and row.fits
    assert row.kv == kv_270m(2048) and row.weights == meta_270m.total_tensor_bytes
    with pytest.raises(ConfigError, match="no planned instance named 'nope'"):
        plan.ctx_for("nope")


# --- GPUs, budgets and tenants ----------------------------------------------------------------


H100 = Gpu(0, "GPU-11111111-2222-3333-4444-555555555555", "NVIDIA H100 80GB HBM3", 81559, 7, "9.0")


def test_budget_from_nvidia_smi_or_host_data(gemma3_270m: Path) -> None:
    models = {"g3": _model("target", gemma3_270m)}
    by_uuid = _host(models, [_g3(gpu=H100.uuid)])
    row = _plan(by_uuid, [H100]).instance_plan("gemma3")
    assert row.budget == H100.memory_total_mib * MIB and row.budget_source == "nvidia-smi"
    assert (row.gpu_index, row.gpu_uuid, row.gpu_name) == (0, H100.uuid, H100.name)
    # gpu_memory_mib wins, under the index even when the instance names the UUID
    capped = _host(models, [_g3(gpu=H100.uuid)], gpu_memory_mib={"0": 20000})
    row = _plan(capped, [H100]).instance_plan("gemma3")
    assert row.budget == 20000 * MIB and row.budget_source == "gpu_memory_mib.0"

    assert _plan_error(_host(models, [_g3(gpu="3")]), [H100]).startswith(
        f"host {HOST}: llama_instances[gemma3].gpu: no GPU '3' on the host (nvidia-smi lists: "
        f"0 {H100.uuid})"
    )
    assert _plan_error(_host(models, [_g3()])).startswith(
        f"host {HOST}: gpu_memory_mib: no VRAM budget for GPU '0' (llama_instances[gemma3].gpu)"
    )


def test_instances_and_services_sharing_a_gpu(
    gemma3_270m: Path, pair: SyntheticPair, meta_270m: ModelMeta
) -> None:
    models = {"g3": _model("target", gemma3_270m), **_pair_models(pair)}
    whisper = {"unit": "whisper.service", "gpu": "0", "vram_reserve_mib": 2000}
    config = _host(
        models,
        [_g3(ctx_size=4096, port=8081), _g4(ctx_size="auto")],
        gpu_memory_mib={"0": 24000},
        gpu_services=[{**whisper, "share_gpu_with_llama": True}],
    )
    plan = _plan(config)
    small, big = plan.instance_plan("gemma3"), plan.instance_plan("gemma4")
    small_total = (
        weight_bytes_on_gpu(meta_270m)
        + kv_270m(4096)
        + compute_buffer_bytes(meta_270m, n_ctx=4096, cache=Q8)
        + CUDA_OVERHEAD_BYTES
    )
    big_total = big.weights + big.kv + big.compute + big.overhead
    assert big.tenants == (
        Tenant("whisper.service", 2000 * MIB),
        Tenant("llama-server-gemma3.service", small_total, "instance"),
    )
    assert small.tenants == (
        Tenant("whisper.service", 2000 * MIB),
        Tenant("llama-server-gemma4.service", big_total, "instance"),
    )
    assert small.free == big.free
    assert small.free is not None and small.free >= 0

    two_autos = _host(
        models,
        [_g3(ctx_size="auto", port=8081), _g4(ctx_size="auto")],
        gpu_memory_mib={"0": 24000},
    )
    assert _plan_error(two_autos).startswith(
        f"host {HOST}: llama_instances[gemma4].ctx_size: auto on GPU 0, which "
        "llama_instances[gemma3] also sizes with auto"
    )
    # a fixed ctx that leaves the other instance nothing: refused at the auto instance
    crowded = _host(
        models,
        [_g3(ctx_size=32768, port=8081), _g4(ctx_size="auto")],
        gpu_memory_mib={"0": 1500},
        vram_headroom_mib=0,
    )
    message = _plan_error(crowded)
    assert message.startswith(f"host {HOST}: gpu_memory_mib.0: GPU 0 budget 1500.00 MiB leaves")
    assert "llama-server-gemma3.service" in message


# --- pairing and model metadata errors --------------------------------------------------------


def test_pairing_mismatch_names_the_values(pair: SyntheticPair, mismatched: SyntheticPair) -> None:
    models = {"g4": _model("target", pair.target), "g4-asst": _model("drafter", mismatched.drafter)}
    config = _host(models, [_g4(ctx_size=4096)], gpu_memory_mib={"0": 80000})
    message = _plan_error(config)
    assert message.startswith(
        f"host {HOST}: llama_instances[gemma4].drafter: g4-asst cannot draft for g4: "
    )
    assert (
        f"target embedding_length {TINY.n_embd} != drafter embedding_length_out {TINY.n_embd + 32}"
    ) in message


def test_unknown_architecture(tmp_path: Path) -> None:
    path = tmp_path / "llama.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(2)
    writer.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    config = _host({"weird": _model("target", path)}, [_g3(target="weird")])
    message = _plan_error(config)
    assert message.startswith(f"host {HOST}: llama_models.weird.local_path: ")
    assert "unknown architecture 'llama'" in message


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(base URL, root) of a local HTTP server with Range support (the test fleet's mirror)."""
    root = tmp_path / "www"
    root.mkdir()
    server = ThreadingHTTPServer(
        ("127.0.0.1", 0), partial(RangeRequestHandler, directory=str(root))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()
    server.server_close()
    thread.join()


def test_model_urls(
    mirror: tuple[str, Path],
    gemma3_270m: Path,
    meta_270m: ModelMeta,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("G4F_CACHE", str(tmp_path / "cache"))
    base, root = mirror
    (root / "g3.gguf").symlink_to(gemma3_270m)
    with gemma3_270m.open("rb") as fh:
        (root / "truncated.gguf").write_bytes(fh.read(100_000))
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]

    good = {**_model("target", f"{base}/g3.gguf"), "sha256": GEMMA3_270M_SHA256}
    config = _host({"g3": good}, [_g3()], gpu_memory_mib={"0": 2000})
    assert _plan(config).instance_plan("gemma3").kv == kv_270m(8192)
    assert len(list((tmp_path / "cache" / "gguf-meta").glob(f"{GEMMA3_270M_SHA256}-*.json"))) == 1
    assert meta_for_model(ModelFile.model_validate(good)) == meta_270m

    models = {
        "g3": _model("target", f"http://127.0.0.1:{closed}/g3.gguf"),
        "cut": _model("target", f"{base}/truncated.gguf"),
    }
    config = _host(models, [_g3(), _g3(name="other", target="cut", port=8081)])
    lines = _plan_error(config).splitlines()
    assert lines[0].startswith(f"host {HOST}: llama_models.g3.url: http://127.0.0.1:{closed}/")
    assert "unreachable" in lines[0]
    assert lines[1].startswith(f"host {HOST}: llama_models.cut.url: {base}/truncated.gguf: ")
    assert "truncated GGUF header" in lines[1]


class _Host:
    """What the pipeline reads of a pyinfra inventory host: its name, groups and merged data."""

    def __init__(self, name: str, data: dict[str, Any]) -> None:
        self.name = name
        self.groups: list[str] = []
        self.data = SimpleNamespace(get=data.get, dict=lambda: dict(data))


def test_pipeline_reports_every_host_and_reads_each_model_once(
    gemma3_270m: Path, pair: SyntheticPair, mismatched: SyntheticPair
) -> None:
    models = {
        "g3": _model("target", gemma3_270m),
        "g4": _model("target", pair.target),
        "g4-asst": _model("drafter", mismatched.drafter),
    }
    budget = {"gpu_memory_mib": {"0": 80000}}
    hosts = [
        _Host("a", _data(models, [_g3(ctx_size=65536)], **budget)),
        _Host("b", _data(models, [_g4(ctx_size=4096)], **budget)),
        _Host("c", _data(models, [_g3(ctx_size=1024)], **budget)),
        _Host("d", _data(models, [_g3(cache_type_k="q9_0")])),
    ]
    reads: list[str] = []

    def counting(model: ModelFile) -> ModelMeta:
        reads.append(str(model.local_path))
        return meta_for_model(model)

    with pytest.raises(FleetConfigError) as err:
        host_setups(hosts, None, meta_for=counting)
    lines = str(err.value).splitlines()
    assert lines[0] == "invalid configuration"
    assert [line.split(":", 2)[:2] for line in lines[1:]] == [
        ["  host d", " llama_instances[gemma3].cache_type_k"],
        ["  host a", " llama_instances[gemma3].ctx_size"],
        ["  host b", " llama_instances[gemma4].drafter"],
    ]
    assert err.value.errors == tuple(line.strip() for line in lines[1:])
    assert sorted(reads) == sorted({str(gemma3_270m), str(pair.target), str(mismatched.drafter)})
    setups = host_setups(hosts[2:3], None)
    assert setups["c"].plan.ctx_for("gemma3") == 1024 and setups["c"].gpus == []


def test_pipeline_resolves_each_gpu_once(gemma3_270m: Path) -> None:
    """An index or a UUID becomes the host's GPU for the plan (budget) and the units (UUID)."""
    models = {"g3": _model("target", gemma3_270m)}
    whisper = {"unit": "whisper.service", "gpu": H100.uuid, "share_gpu_with_llama": True}
    host = _Host("h", _data(models, [_g3(gpu="0", ctx_size=4096)], gpu_services=[whisper]))
    reader_saw: list[str] = []

    def read(pairs: list[tuple[Any, HostConfig]]) -> tuple[dict[str, list[Gpu]], dict[str, str]]:
        reader_saw.extend(h.name for h, _ in pairs)
        return {"h": [H100]}, {}

    setup = host_setups([host], read)["h"]
    assert reader_saw == ["h"]
    assert setup.gpu_uuid("0") == setup.gpu_uuid(H100.uuid) == H100.uuid
    assert setup.gpu_uuid(None) is None
    row = setup.plan.instance_plan("gemma3")
    assert row.budget_source == "nvidia-smi" and row.gpu_uuid == H100.uuid
    assert setup.config.build.cuda_architectures == [90]  # from the GPU's compute capability

    # nvidia-smi found nothing: a UUID is taken as given, an index is refused before planning
    def none(pairs: list[tuple[Any, HostConfig]]) -> tuple[dict[str, list[Gpu]], dict[str, str]]:
        return {"h": []}, {}

    with pytest.raises(FleetConfigError) as err:
        host_setups([host], none)
    assert err.value.errors == (
        "host h: llama_instances[gemma3].gpu: no GPU '0' on the host (nvidia-smi lists: "
        "none (no nvidia-smi))",
    )

    def unreachable(
        pairs: list[tuple[Any, HostConfig]],
    ) -> tuple[dict[str, list[Gpu]], dict[str, str]]:
        return {}, {"h": "nvidia-smi: cannot read it: timed out"}

    with pytest.raises(FleetConfigError) as err:
        host_setups([host], unreachable)
    assert err.value.errors == ("host h: nvidia-smi: cannot read it: timed out",)


# --- the plan command -------------------------------------------------------------------------


def _cli(cwd: Path, *args: str, path: str | None = None) -> subprocess.CompletedProcess[str]:
    """`gemma4-fleet ARGS` via main() in a child: pyinfra_cli monkey-patches the stdlib for
    gevent on import, which must not leak into this test process."""
    env = dict(os.environ)
    if path is not None:
        env["PATH"] = path
    code = "import sys; from gemma4_fleet.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def project(tmp_path: Path, gemma3_270m: Path, pair: SyntheticPair) -> Path:
    """A deploy directory: group_data/all.py in the cwd, an inventory with its own group_data."""
    (tmp_path / "group_data").mkdir()
    (tmp_path / "group_data" / "all.py").write_text(
        f"llamacpp = {{'git_url': 'https://example.invalid/l.git', 'commit': '{COMMIT}'}}\n"
        "llama_server = {'ctx_size': 'auto', 'cache_type_k': 'q8_0', 'cache_type_v': 'q8_0'}\n"
        f"llama_models = {{'g3': {_model('target', gemma3_270m)!r},"
        f" 'g4': {_model('target', pair.target)!r},"
        f" 'g4-asst': {_model('drafter', pair.drafter)!r}}}\n"
    )
    inventories = tmp_path / "inventories"
    (inventories / "group_data").mkdir(parents=True)
    (inventories / "group_data" / "gpu_hosts.py").write_text("vram_headroom_mib = 256\n")
    (inventories / "fleet.py").write_text(
        "gpu_hosts = [\n"
        "    ('box-a', {'gpu_memory_mib': {'0': 1200}, 'llama_instances': [\n"
        "        {'name': 'gemma3', 'target': 'g3', 'spec_type': 'none', 'gpu': '0'}]}),\n"
        "]\n"
        "cpu_hosts = [\n"
        "    ('box-b', {'llamacpp_build': {'cuda': False}, 'llama_instances': [\n"
        "        {'name': 'gemma4', 'target': 'g4', 'drafter': 'g4-asst', 'ctx_size': 2048}]}),\n"
        "    ('box-c', {'gpu_memory_mib': {'0': 700}, 'llama_instances': [\n"
        "        {'name': 'gemma3', 'target': 'g3', 'spec_type': 'none', 'gpu': '0',\n"
        "         'ctx_size': 4096}]}),\n"
        "]\n"
    )
    return tmp_path


def test_cli_json_and_table(project: Path, meta_270m: ModelMeta) -> None:
    # box-a: 1200 MiB with the inventory folder's group_data headroom of 256 MiB; the ctx is
    # written down, and shown below to be the last multiple of 256 that fits
    ctx = BOX_A_CTX
    weights = weight_bytes_on_gpu(meta_270m)

    def used(n_ctx: int) -> int:
        compute = compute_buffer_bytes(meta_270m, n_ctx=n_ctx, cache=Q8)
        return weights + kv_270m(n_ctx) + compute + CUDA_OVERHEAD_BYTES + 256 * MIB

    assert used(ctx) <= 1200 * MIB < used(ctx + 256)
    kv = kv_270m(ctx)
    compute = compute_buffer_bytes(meta_270m, n_ctx=ctx, cache=Q8)
    free = 1200 * MIB - used(ctx)

    done = _cli(project, "plan", "inventories/fleet.py", "--limit", "box-a,box-b", "--json")
    assert done.returncode == 0, done.stderr
    hosts = json.loads(done.stdout)["hosts"]
    assert list(hosts) == ["box-a", "box-b"]
    row = hosts["box-a"]["instances"][0]
    assert row["instance"] == "gemma3" and row["gpu"] == "0" and row["fits"] is True
    assert row["ctx_size"] == "auto" and row["ctx"] == ctx
    assert row["bytes"] == {
        "budget": 1200 * MIB,
        "weights": weights,
        "kv": kv,
        "compute": compute,
        "overhead": CUDA_OVERHEAD_BYTES,
        "tenants": 0,
        "headroom": 256 * MIB,
        "free": free,
    }
    cpu = hosts["box-b"]["instances"][0]
    assert cpu["gpu"] is None and cpu["ctx"] == 2048 and cpu["bytes"]["kv"] == kv_tiny(2048)

    done = _cli(project, "plan", "inventories/fleet.py", "--limit", "box-a")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "host box-a (MiB)"
    assert lines[1].split() == [
        "instance", "GPU", "budget", "weights", "KV", "compute", "overhead", "tenants",
        "headroom", "free", "ctx", "cache", "fits",
    ]  # fmt: skip
    assert lines[2].split() == [
        "gemma3", "0", "1200", str(round(weights / MIB)), str(round(kv / MIB)),
        str(round(compute / MIB)), "590", "0", "256", str(round(free / MIB)),
        str(ctx), "auto", "q8_0", "yes",
    ]  # fmt: skip
    assert lines[3] == "  GPU 0: budget from gpu_memory_mib.0"
    assert lines[4].startswith("  gemma3: model id 'g3'; chat template: ")
    assert lines[5] == "  KV gemma3: q8_0: set in host data"


def test_cli_errors_exit_1(project: Path) -> None:
    done = _cli(project, "plan", "inventories/fleet.py", "--json")
    assert done.returncode == 1
    errors = json.loads(done.stdout)["errors"]
    assert len(errors) == 1 and errors[0].startswith("host box-c: gpu_memory_mib.0: GPU 0 budget")
    assert "gemma4-fleet: invalid configuration\n  host box-c: gpu_memory_mib.0:" in done.stderr

    done = _cli(project, "plan", "inventories/fleet.py", "--limit", "nope")
    assert done.returncode == 1 and "--limit nope: no host or group" in done.stderr


def test_cli_from_hosts_reads_nvidia_smi(project: Path, tmp_path: Path) -> None:
    """--from-hosts on the @local connector, with a stand-in nvidia-smi first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text(
        "#!/bin/sh\n"
        f"echo '{H100.index}, {H100.uuid}, {H100.name}, {H100.memory_total_mib}, 7, 9.0'\n"
    )
    smi.chmod(0o755)
    (project / "local.py").write_text(
        "instance = {'name': 'gemma4', 'target': 'g4', 'drafter': 'g4-asst'}\n"
        f"hosts = [('@local', {{'llama_instances': [{{**instance, 'gpu': '{H100.uuid}'}}]}})]\n"
    )
    path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    done = _cli(project, "plan", "local.py", "--from-hosts", "--json", path=path)
    assert done.returncode == 0, done.stderr
    row = json.loads(done.stdout)["hosts"]["@local"]["instances"][0]
    assert row["bytes"]["budget"] == H100.memory_total_mib * MIB
    assert row["budget_source"] == "nvidia-smi" and row["gpu_index"] == 0
    assert row["ctx"] == TINY.context_length

    done = _cli(project, "plan", "local.py")
    assert done.returncode == 1
    assert re.search(r"host @local: gpu_memory_mib: no VRAM budget for GPU 'GPU-1", done.stderr)


def test_a_service_on_llamas_gpu_is_refused_by_index_and_by_uuid(pair: SyntheticPair) -> None:
    other = Gpu(1, "GPU-99999999-2222-3333-4444-555555555555", "NVIDIA H100", 81559, 0, "9.0")
    gpus = [H100, other]

    def host(ref: str) -> HostConfig:
        return _host(
            _pair_models(pair),
            [_g4(ctx_size=8192)],
            gpu_services=[{"unit": "whisper.service", "gpu": ref}],
        )

    with pytest.raises(ConfigError) as by_index:  # the same spelling: refused by the config
        host("0")
    by_uuid = _plan_error(host(H100.uuid), gpus)  # the same GPU: refused by the plan
    for error in (str(by_index.value), by_uuid):
        assert "gpu_services[whisper.service].gpu" in error, error
    assert _plan(host(gpus[1].uuid), gpus).fits


# --- cache_type auto (issue 14) ---------------------------------------------------------------
# Gemma 3 270M at ctx 32768, -np 1, by hand (../shared/briefs/llama-cpp.md): 3 full-attention
# layers of 32768 cells and 15 SWA layers of P(min(32768, 512 + 512)) = 1024 cells, K and V rows
# of 1 KV head x 256.
#   f16:  3 * 32768 * 2 * 512 B + 15 * 1024 * 2 * 512 B = 96 MiB + 15 MiB            = 111 MiB
#   q8_0: a row is 256 / 32 * 34 = 272 B: 3 * 32768 * 2 * 272 + 15 * 1024 * 2 * 272   = 59.0 MiB
KV_F16_32K = 3 * 32768 * 2 * 512 + 15 * 1024 * 2 * 512
KV_Q8_32K = 3 * 32768 * 2 * 272 + 15 * 1024 * 2 * 272
F16 = CacheOptions(parallel=1, type_k="f16", type_v="f16", flash_attn=True)


def _auto_total(meta: ModelMeta, kv: int, cache: CacheOptions) -> int:
    """Everything on the GPU at ctx 32768 with no headroom: weights + KV + compute + CUDA."""
    compute = compute_buffer_bytes(meta, n_ctx=32768, cache=cache)
    return weight_bytes_on_gpu(meta) + kv + compute + CUDA_OVERHEAD_BYTES


def _auto_g3(gemma3_270m: Path, budget_mib: int, **inst: Any) -> HostConfig:
    instance = {"name": "gemma3", "target": "g3", "spec_type": "none", "gpu": "0", **inst}
    return _host(
        {"g3": _model("target", gemma3_270m)},
        [{"ctx_size": 32768, **instance}],
        gpu_memory_mib={"0": budget_mib},
        vram_headroom_mib=0,
    )


def test_auto_kv_hand_computed_sizes_match_the_plan(gemma3_270m: Path) -> None:
    assert KV_F16_32K == 111 * MIB
    config = _auto_g3(gemma3_270m, 4000, cache_type_k="f16", cache_type_v="f16")
    assert plan_host(HOST, config, {}, meta_for_model).instance_plan("gemma3").kv == KV_F16_32K
    assert kv_270m(32768) == KV_Q8_32K


def test_auto_kv_picks_f16_when_it_fits(gemma3_270m: Path, meta_270m: ModelMeta) -> None:
    budget_mib = -(-_auto_total(meta_270m, KV_F16_32K, F16) // MIB)  # f16 just fits
    row = plan_host(HOST, _auto_g3(gemma3_270m, budget_mib), {}, meta_for_model).instance_plan(
        "gemma3"
    )
    assert row.cache_types == ("f16", "f16", "f16", "f16")
    assert row.kv == KV_F16_32K and row.fits
    assert row.kv_reason == "auto: the fastest of f16 > q8_0, default order, fits"


def test_auto_kv_picks_q8_0_when_the_budget_forces_it(
    gemma3_270m: Path, meta_270m: ModelMeta
) -> None:
    f16_total = _auto_total(meta_270m, KV_F16_32K, F16)
    q8_total = _auto_total(meta_270m, KV_Q8_32K, Q8)
    budget_mib = -(-q8_total // MIB)
    assert budget_mib * MIB < f16_total  # the budget leaves no room for f16
    config = _auto_g3(gemma3_270m, budget_mib)
    plan = plan_host(HOST, config, {}, meta_for_model)
    row = plan.instance_plan("gemma3")
    assert row.cache_types == ("q8_0", "q8_0", "q8_0", "q8_0")
    assert row.kv == KV_Q8_32K and row.fits
    short = f16_total - budget_mib * MIB
    assert row.kv_reason == (
        f"auto: f16 needs {_mib(short)} more; q8_0 fits (f16 > q8_0, default order)"
    )
    settled = plan.settle(config.instances[0])
    assert (settled.cache_type_k, settled.cache_type_v, settled.ctx_size) == ("q8_0", "q8_0", 32768)
    table = plan.table().splitlines()
    assert table[2].split()[-2:] == ["q8_0", "yes"]
    assert table[-1] == f"  KV gemma3: q8_0: {row.kv_reason}"


def test_auto_kv_refuses_with_the_breakdown_when_nothing_fits(
    gemma3_270m: Path, meta_270m: ModelMeta
) -> None:
    budget_mib = _auto_total(meta_270m, KV_Q8_32K, Q8) // MIB - 1
    message = _plan_error(_auto_g3(gemma3_270m, budget_mib))
    assert message.startswith(
        f"host {HOST}: llama_instances[gemma3].ctx_size: ctx 32768 does not fit GPU 0: "
    )
    assert f"KV {_mib(KV_Q8_32K)}" in message
    assert "none of f16 > q8_0, default order fits" in message
    assert "the largest ctx that fits is" in message


def test_auto_kv_measured_order_wins(gemma3_270m: Path, meta_270m: ModelMeta) -> None:
    config = _auto_g3(gemma3_270m, 4000, kv_order=["q8_0", "f16"])
    row = plan_host(HOST, config, {}, meta_for_model).instance_plan("gemma3")
    assert row.cache_types[:2] == ("q8_0", "q8_0")
    assert row.kv_reason == "auto: the fastest of q8_0 > f16, measured order, tuned profile, fits"


def test_auto_kv_without_flash_attention_is_f16_and_explicit_types_stay(
    gemma3_270m: Path, meta_270m: ModelMeta
) -> None:
    budget_mib = -(-_auto_total(meta_270m, KV_Q8_32K, Q8) // MIB)  # only q8_0 would fit
    config = _auto_g3(gemma3_270m, budget_mib, flash_attn="off")
    message = _plan_error(config)
    assert "none of f16, default order fits" in message
    row = plan_host(
        HOST, _auto_g3(gemma3_270m, 4000, cache_type_k="q4_0"), {}, meta_for_model
    ).instance_plan("gemma3")
    # K explicit, V auto: V takes the fastest type that fits
    assert row.cache_types[:2] == ("q4_0", "f16")


def test_auto_kv_on_the_cpu_is_the_first_of_the_order(gemma3_270m: Path) -> None:
    config = _host(
        {"g3": _model("target", gemma3_270m)},
        [{"name": "gemma3", "target": "g3", "spec_type": "none", "ctx_size": 32768}],
        llamacpp_build={"cuda": False},
    )
    row = plan_host(HOST, config, {}, meta_for_model).instance_plan("gemma3")
    assert row.cache_types == ("f16", "f16", "f16", "f16") and row.kv == KV_F16_32K
    assert "CPU" in row.kv_reason
