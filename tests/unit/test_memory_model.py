"""Memory model: KV, compute and weight bytes checked against llama-server's own logs; pairing."""

from __future__ import annotations

import re
import struct
from pathlib import Path
from typing import Any, Literal

import pytest

from gemma4_fleet import synthetic
from gemma4_fleet.gguf_meta import ModelMeta, read_meta
from gemma4_fleet.memory_model import (
    CUDA_OVERHEAD_BYTES,
    DRAFT_CONTEXT_OVERHEAD_BYTES,
    MIB,
    CacheOptions,
    PairingError,
    PlanError,
    check_pairing,
    compute_buffer_bytes,
    gpu_usage,
    kv_cache_bytes,
    weight_bytes_on_gpu,
)

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def meta_270m(gemma3_270m: Path) -> ModelMeta:
    return read_meta(gemma3_270m)


# Gemma 3 270M: 18 layers, SWA period 6 -> 3 full layers (5, 11, 17) and 15 SWA layers,
# n_swa 512, head_count_kv 1, head_dim 256: K and V rows of 1 * 256 elements per cell and layer.
# Row bytes: f16/bf16 256 * 2 = 512, f32 1024, q8_0 256 / 32 * 34 = 272, q4_0 * 18 = 144,
# q4_1 * 20 = 160, q5_0 * 22 = 176, q5_1 * 24 = 192.
# "logged": llama_kv_cache "size = X MiB" (non-SWA line, SWA line) printed by the CPU build of
# llama-server at this pin for `nice llama-server -m gemma-3-270m-q4_k_m.gguf --port 18211 -t 2
# --no-warmup -lv 4 ARGS`.
KV_CASES: list[tuple[str, dict[str, Any], int, int, tuple[str, str]]] = [
    (
        "-c 4096 -np 1 -ctk q8_0 -ctv q8_0 -fa on",
        {"n_ctx": 4096, "parallel": 1, "type_k": "q8_0", "type_v": "q8_0"},
        # 1 stream; full 4096 cells; SWA P(min(4096, 512 + 512)) = 1024 cells
        3 * 4096 * (272 + 272),
        15 * 1024 * (272 + 272),
        ("6.38", "7.97"),
    ),
    (
        "-c 4096 -np 1 -ctk f16 -ctv f16 -fa on",
        {"n_ctx": 4096, "parallel": 1, "type_k": "f16", "type_v": "f16"},
        3 * 4096 * (512 + 512),
        15 * 1024 * (512 + 512),
        ("12.00", "15.00"),
    ),
    (
        "-c 8192 -np 2 -ctk q8_0 -ctv q8_0 -fa on",
        {"n_ctx": 8192, "parallel": 2, "type_k": "q8_0", "type_v": "q8_0"},
        # 2 streams of P(8192 / 2) = 4096 cells; SWA P(min(4096, 512 + 512)) = 1024
        2 * 3 * 4096 * (272 + 272),
        2 * 15 * 1024 * (272 + 272),
        ("12.75", "15.94"),
    ),
    (
        "-c 8192 -np 1 -fa off",
        {"n_ctx": 8192, "parallel": 1, "type_k": "f16", "type_v": "f16", "flash_attn": False},
        3 * 8192 * (512 + 512),
        15 * 1024 * (512 + 512),
        ("24.00", "15.00"),
    ),
    (
        "-c 2048 -np 2 -kvu -ctk q8_0 -ctv q8_0 -fa on",
        {"n_ctx": 2048, "parallel": 2, "unified": True, "type_k": "q8_0", "type_v": "q8_0"},
        # unified: 1 stream of 2048 cells; SWA P(min(2048, 512 * 2 + 512)) = 1536
        3 * 2048 * (272 + 272),
        15 * 1536 * (272 + 272),
        ("3.19", "11.95"),
    ),
    (
        "-c 1000 -np 3 -ctk q4_0 -ctv q5_1 -fa on",
        {"n_ctx": 1000, "parallel": 3, "type_k": "q4_0", "type_v": "q5_1"},
        # P(1000) = 1024; 3 streams of P(1024 // 3 = 341) = 512 cells; SWA P(min(512, 1024)) = 512
        3 * 3 * 512 * (144 + 192),
        3 * 15 * 512 * (144 + 192),
        ("1.48", "7.38"),
    ),
    (
        "-c 4096 -np 1 --swa-full -ctk bf16 -ctv q4_1 -fa on",
        {"n_ctx": 4096, "parallel": 1, "type_k": "bf16", "type_v": "q4_1", "swa_full": True},
        3 * 4096 * (512 + 160),
        15 * 4096 * (512 + 160),
        ("7.88", "39.38"),
    ),
    (
        "-c 16384 -np 4 -ctk q5_0 -ctv f32 -fa off",
        {"n_ctx": 16384, "parallel": 4, "type_k": "q5_0", "type_v": "f32", "flash_attn": False},
        4 * 3 * 4096 * (176 + 1024),
        4 * 15 * 1024 * (176 + 1024),
        ("56.25", "70.31"),
    ),
    (
        "-c 4096 -np 1 -ub 256 -ctk q8_0 -ctv q8_0 -fa on",
        {"n_ctx": 4096, "parallel": 1, "type_k": "q8_0", "type_v": "q8_0", "n_ubatch": 256},
        # SWA P(min(4096, 512 + 256)) = 768 cells
        3 * 4096 * (272 + 272),
        15 * 768 * (272 + 272),
        ("6.38", "5.98"),
    ),
]


@pytest.mark.parametrize(
    ("args", "kwargs", "full", "swa", "logged"), KV_CASES, ids=[c[0] for c in KV_CASES]
)
def test_kv_bytes_match_llama_server(
    meta_270m: ModelMeta,
    args: str,
    kwargs: dict[str, Any],
    full: int,
    swa: int,
    logged: tuple[str, str],
) -> None:
    options: dict[str, Any] = {"unified": False, "flash_attn": True, **kwargs}
    size = kv_cache_bytes(meta_270m, **options)
    assert (size.full_bytes, size.swa_bytes) == (full, swa)
    assert (f"{full / MIB:.2f}", f"{swa / MIB:.2f}") == logged
    assert size.total == full + swa


def _meta(**overrides: Any) -> ModelMeta:
    """A gemma3-shaped 12B-class model (48 layers, n_embd 3840, 8 KV heads of 256)."""
    n_layer = overrides.get("block_count", 48)
    fields: dict[str, Any] = {
        "name": "gemma-3-12b",
        "architecture": "gemma3",
        "block_count": n_layer,
        "context_length": 131072,
        "embedding_length": 3840,
        "embedding_length_out": 3840,
        "vocab_size": 262208,
        "head_count": (16,) * n_layer,
        "head_count_kv": (8,) * n_layer,
        "key_length": 256,
        "value_length": 256,
        "key_length_swa": 256,
        "value_length_swa": 256,
        "sliding_window": 1024,
        "swa_layers": tuple(il % 6 < 5 for il in range(n_layer)),
        "shared_kv_layers": 0,
        "has_chat_template": True,
        "tensor_bytes": {},
    }
    fields.update(overrides)
    return ModelMeta(**fields)


def _with_gpu_weights(meta: ModelMeta, gpu_bytes: int, embd_bytes: int) -> ModelMeta:
    """Give meta tied embeddings of embd_bytes and layers so that -ngl all puts gpu_bytes on GPU."""
    per_layer, rest = divmod(gpu_bytes - embd_bytes - 15360, meta.block_count)
    tensors = {f"blk.{il}.ffn_up.weight": per_layer for il in range(meta.block_count)}
    tensors["blk.0.ffn_up.weight"] += rest
    tensors.update({"token_embd.weight": embd_bytes, "output_norm.weight": 15360})
    return meta.model_copy(update={"tensor_bytes": tensors})


Q8_FA = CacheOptions(parallel=1, type_k="q8_0", type_v="q8_0", flash_attn=True)


def test_kv_matches_h100_logs_of_a_12b_model() -> None:
    # 8 full layers x 8 heads x 256 x q8_0 (34/32 bytes) x (K + V) = 34816 bytes per cell
    q8 = {"parallel": 1, "unified": False, "type_k": "q8_0", "type_v": "q8_0", "flash_attn": True}
    size = kv_cache_bytes(_meta(), n_ctx=8192, **q8)
    assert size.full_bytes == 8 * 8192 * 2 * (8 * 256 // 32 * 34) == 272 * MIB
    assert size.cells_swa == 1536  # P(min(8192, 1024 + 512))
    assert size.swa_bytes == 40 * 1536 * 2 * (8 * 256 // 32 * 34) == 255 * MIB
    big = kv_cache_bytes(_meta(), n_ctx=65536, **q8)
    assert (big.full_bytes, big.swa_bytes) == (2176 * MIB, 255 * MIB)


def test_compute_and_overhead_reproduce_the_h100_calibration() -> None:
    # logged CUDA0 compute buffer of a gemma3-shaped 12B on an H100: 123.05 MiB at -c 8192 (the
    # FFN block sets it), 609.05 MiB at -c 65536 (the attention block)
    meta = _meta()
    assert abs(compute_buffer_bytes(meta, n_ctx=8192, cache=Q8_FA) / MIB - 123.05) < 1
    assert abs(compute_buffer_bytes(meta, n_ctx=65536, cache=Q8_FA) / MIB - 609.05) < 1
    # nvidia-smi: 7554 MiB at -c 8192, 9944 MiB at -c 65536 (model CUDA0 6314.36 MiB)
    meta = _with_gpu_weights(meta, round(6314.36 * MIB), round(540.13 * MIB))
    for n_ctx, smi_mib in ((8192, 7554), (65536, 9944)):
        plan = gpu_usage(meta, n_ctx=n_ctx, cache=Q8_FA)
        assert abs(plan.weights / MIB - 6314.36) < 0.01
        assert abs(plan.total / MIB - smi_mib) < 1


# --- the H100 proof run of the synthetic gemma4 pairs (docs/gpu-proof.md) -----------------------
# Expected values are parsed from the raw server logs in docs/gpu-proof/run-*.txt: the
# `sched_reserve: CUDA0 compute buffer size` lines (the target's first, then the drafter's, logged
# twice for one allocation) and the server PID's nvidia-smi used_memory.
PROOF_DIR = Path(__file__).resolve().parents[2] / "docs" / "gpu-proof"
PROOF_RUNS = ("none-8k", "none-32k", "none-64k", "mtp-8k", "mtp-64k", "tiny-none-8k", "tiny-mtp-8k")
COMPUTE_TOLERANCE_MIB = 1.0  # per logged compute buffer
TOTAL_TOLERANCE = 0.005  # predicted used vs nvidia-smi, relative


def _proof_run(name: str) -> tuple[str, int, bool, list[float], int]:
    """(shape, -c, with drafter, logged CUDA0 compute MiB (target[, drafter]), nvidia-smi MiB)."""
    text = (PROOF_DIR / f"run-{name}.txt").read_text()
    command = text.split("## command\n", 1)[1].splitlines()[0]
    shape = re.search(r"gemma4-synthetic-(\w+)-target\.gguf", command)
    ctx = re.search(r" -c (\d+) ", command)
    pid = re.search(r"\(server pid (\d+)\)\n\1, (\d+)\n", text)
    assert shape and ctx and pid, name
    compute = [
        float(m)
        for m in re.findall(r"sched_reserve: +CUDA0 compute buffer size = +([\d.]+) MiB", text)
    ]
    drafter = " -md " in command
    if drafter:
        assert len(compute) == 3 and compute[1] == compute[2], name  # one allocation, two lines
        compute = compute[:2]
    return shape.group(1), int(ctx.group(1)), drafter, compute, int(pid.group(2))


def _header_only_pair(
    out: Path, shape: Literal["tiny", "12b"], tokenizer: Path
) -> tuple[Path, Path]:
    """The GGUF headers (no tensor data) of synthetic.write_pair(shape): all read_meta needs; the
    device's files are byte-identical to write_pair's (docs/gpu-proof/gen-*.txt)."""
    spec = synthetic.shape_spec(shape)
    records, tokens = synthetic._tokenizer_records(tokenizer)
    favoured, _ = synthetic._pick_tokens(tokens)
    files = (
        (
            out / f"{shape}-target.gguf",
            [*synthetic._target_kvs(shape, spec), *records],
            synthetic._target_tensors(0, spec, len(tokens), favoured),
        ),
        (
            out / f"{shape}-assistant.gguf",
            [*synthetic._assistant_kvs(shape, spec, spec.n_embd), *records],
            synthetic._assistant_tensors(0, spec, len(tokens), favoured, spec.n_embd),
        ),
    )
    for path, kvs, tensors in files:
        with path.open("wb") as fh:
            fh.write(struct.pack("<IIQQ", 0x46554747, 3, len(tensors), len(kvs)))
            for record in kvs:
                fh.write(record)
            offset = 0
            for t in tensors:
                ne = tuple(reversed(t.shape))
                fh.write(struct.pack("<Q", len(t.name)) + t.name.encode())
                fh.write(struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne))
                fh.write(struct.pack("<IQ", t.qtype, offset))
                offset += -(-t.nbytes // 32) * 32
    return files[0][0], files[1][0]


@pytest.fixture(scope="module")
def proof_metas(
    tmp_path_factory: pytest.TempPathFactory, gemma3_270m: Path
) -> dict[str, tuple[ModelMeta, ModelMeta]]:
    out = tmp_path_factory.mktemp("proof")
    metas = {}
    for shape in ("tiny", "12b"):
        target, drafter = _header_only_pair(out, shape, gemma3_270m)
        metas[shape] = (read_meta(target), read_meta(drafter))
    return metas


def test_headers_give_the_proof_runs_weights(
    proof_metas: dict[str, tuple[ModelMeta, ModelMeta]],
) -> None:
    # load_tensors: CUDA0 model buffer size = 6449.25 / 188.65 / 9.15 / 4.52 MiB (tensor padding)
    logged = {"12b": (6449.25, 188.65), "tiny": (9.15, 4.52)}
    for shape, (target, drafter) in proof_metas.items():
        for meta, mib in zip((target, drafter), logged[shape], strict=True):
            assert abs(mib - weight_bytes_on_gpu(meta) / MIB) < 0.07


@pytest.mark.parametrize("name", PROOF_RUNS)
def test_compute_and_total_match_the_gpu_proof_runs(
    name: str, proof_metas: dict[str, tuple[ModelMeta, ModelMeta]]
) -> None:
    shape, n_ctx, with_drafter, logged, smi_mib = _proof_run(name)
    target, drafter = proof_metas[shape]
    predicted = [compute_buffer_bytes(target, n_ctx=n_ctx, cache=Q8_FA)]
    if with_drafter:
        # the assistant has no KV of its own: its buffer is sized over the target's cells
        predicted.append(compute_buffer_bytes(drafter, n_ctx=n_ctx, cache=Q8_FA, kv_from=target))
    assert len(predicted) == len(logged)
    for bytes_, mib in zip(predicted, logged, strict=True):
        assert abs(bytes_ / MIB - mib) < COMPUTE_TOLERANCE_MIB, (bytes_ / MIB, mib)

    plan = gpu_usage(target, n_ctx=n_ctx, cache=Q8_FA, drafter=drafter if with_drafter else None)
    assert plan.compute == sum(predicted)
    overhead = CUDA_OVERHEAD_BYTES + (DRAFT_CONTEXT_OVERHEAD_BYTES if with_drafter else 0)
    assert plan.overhead == overhead
    assert abs(plan.total / MIB - smi_mib) / smi_mib < TOTAL_TOLERANCE, (plan.total / MIB, smi_mib)


def test_assistant_compute_grows_with_the_targets_context(
    proof_metas: dict[str, tuple[ModelMeta, ModelMeta]],
) -> None:
    # logged: 97.78 MiB at -c 8192, 601.78 MiB at -c 65536 -> 9216 bytes per target cell: f16
    # copies of the target's q8_0 K and V (4 KV heads x 512) and the 512-token f16 mask
    (_, _, _, small, _), (_, _, _, big, _) = _proof_run("mtp-8k"), _proof_run("mtp-64k")
    logged_slope = (big[1] - small[1]) * MIB / (65536 - 8192)
    assert round(logged_slope) == 2 * 2 * (4 * 512) + 2 * 512
    target, drafter = proof_metas["12b"]

    def draft(n_ctx: int) -> int:
        return compute_buffer_bytes(drafter, n_ctx=n_ctx, cache=Q8_FA, kv_from=target)

    assert (draft(65536) - draft(8192)) / (65536 - 8192) == 9216
    # the target's buffer has the same slope where the attention block sets it (32768 -> 65536)
    (_, _, _, mid, _), (_, _, _, top, _) = _proof_run("none-32k"), _proof_run("none-64k")
    assert round((top[0] - mid[0]) * MIB / 32768) == 9216
    grow = compute_buffer_bytes(target, n_ctx=65536, cache=Q8_FA)
    assert grow - compute_buffer_bytes(target, n_ctx=32768, cache=Q8_FA) == 32768 * 9216


def test_cache_type_and_flash_attn_set_the_slope() -> None:
    meta = _meta()  # full-attention layers: 8 KV heads x 256 = 2048 wide K and V

    def slope(cache: CacheOptions) -> float:
        grow = compute_buffer_bytes(meta, n_ctx=65536, cache=cache)
        return (grow - compute_buffer_bytes(meta, n_ctx=32768, cache=cache)) / 32768

    # q8_0: f16 copies of K and V for the flash-attention kernel + the f16 mask of 512 tokens
    assert slope(Q8_FA) == 2 * 2 * 2048 + 2 * 512
    assert slope(CacheOptions(type_k="bf16", type_v="q4_0")) == 2 * 2 * 2048 + 2 * 512
    # an f16 cache is read in place: only the mask grows
    assert slope(CacheOptions(type_k="f16", type_v="f16")) == 2 * 512
    # -np 2: the copies cover both streams of 32768 / 2 cells, the mask [n_kv, 512] once
    two = CacheOptions(parallel=2, type_k="q8_0", type_v="q8_0")
    assert slope(two) == (2 * 2 * 2 * 2048 + 2 * 512) / 2
    # without flash attention: the f32 mask and the f32 KQ [n_kv, 512, 16 heads]
    assert slope(CacheOptions(flash_attn=False)) == 4 * 512 + 4 * 512 * 16


def test_gemma4_shared_layers_and_padded_v_without_flash_attention() -> None:
    # layers 0, 1, 3 SWA (4 KV heads x 64), 2 full (1 KV head x 128); 4 and 5 reuse earlier KV
    meta = _meta(
        architecture="gemma4",
        block_count=6,
        head_count=(8,) * 6,
        head_count_kv=(4, 4, 1, 4, 4, 1),
        key_length=128,
        value_length=128,
        key_length_swa=64,
        value_length_swa=64,
        sliding_window=512,
        swa_layers=(True, True, False, True, True, False),
        shared_kv_layers=2,
    )
    opts: dict[str, Any] = {"n_ctx": 4096, "parallel": 1, "unified": False}
    fa = kv_cache_bytes(meta, type_k="f16", type_v="f16", flash_attn=True, **opts)
    assert fa.full_bytes == 4096 * (128 * 2 + 128 * 2)  # layer 2 only
    assert fa.swa_bytes == 3 * 1024 * (256 * 2 + 256 * 2)  # layers 0, 1, 3
    assert fa.layer_bytes[4:] == (0, 0)
    # without flash attention V is transposed and padded to the widest V (4 x 64 = 256)
    no_fa = kv_cache_bytes(meta, type_k="f16", type_v="f16", flash_attn=False, **opts)
    assert no_fa.full_bytes == 4096 * (128 * 2 + 256 * 2)
    assert no_fa.swa_bytes == fa.swa_bytes
    with pytest.raises(PlanError, match="quantized V cache"):
        kv_cache_bytes(meta, type_k="q8_0", type_v="q8_0", flash_attn=False, **opts)


def test_assistant_has_no_kv_of_its_own() -> None:
    meta = _meta(architecture="gemma4-assistant", block_count=4, swa_layers=(True,) * 4)
    size = kv_cache_bytes(
        meta, n_ctx=65536, parallel=4, unified=False, type_k="f16", type_v="f16", flash_attn=True
    )
    assert size.total == 0


def test_weights_on_gpu_270m(meta_270m: ModelMeta) -> None:
    tensors = meta_270m.tensor_bytes
    embd = tensors["token_embd.weight"]
    assert "output.weight" not in tensors  # tied: the output layer gets its own copy
    assert weight_bytes_on_gpu(meta_270m) == meta_270m.total_tensor_bytes
    assert weight_bytes_on_gpu(meta_270m, 19) == meta_270m.total_tensor_bytes
    assert weight_bytes_on_gpu(meta_270m, 0) == 0
    output = tensors["output_norm.weight"] + embd
    assert weight_bytes_on_gpu(meta_270m, 1) == output
    # -ngl 4: the last 3 of 18 layers plus the output layer
    last3 = sum(b for n, b in tensors.items() if n.startswith(("blk.15.", "blk.16.", "blk.17.")))
    assert weight_bytes_on_gpu(meta_270m, 4) == last3 + output
    # and only their KV: layers 15, 16 SWA (1024 cells) and 17 full (4096 cells), q8_0
    plan = gpu_usage(meta_270m, n_ctx=4096, cache=Q8_FA, gpu_layers=4)
    assert plan.kv == 2 * 1024 * 544 + 4096 * 544


def _gemma4(**overrides: Any) -> ModelMeta:
    fields: dict[str, Any] = {"name": "gemma-4-31b", "architecture": "gemma4"}
    fields.update({"embedding_length": 5376, "embedding_length_out": 5376, "vocab_size": 262144})
    fields.update(overrides)
    return _meta(**fields)


def _assistant(**overrides: Any) -> ModelMeta:
    fields: dict[str, Any] = {
        "name": "gemma-4-31b-assistant",
        "architecture": "gemma4-assistant",
        "block_count": 4,
        "swa_layers": (True, True, True, False),
        "embedding_length": 1024,
        "embedding_length_out": 5376,
        "vocab_size": 262144,
    }
    fields.update(overrides)
    return _meta(**fields)


def test_pairing_ok() -> None:
    check_pairing(_gemma4(), _assistant(), "draft-mtp")
    # llama.cpp tolerates up to 128 tokens of vocab size difference for draft-simple
    check_pairing(
        _meta(vocab_size=262208), _meta(name="gemma-3-270m", vocab_size=262144), "draft-simple"
    )


@pytest.mark.parametrize(
    ("target", "drafter", "spec_type", "message"),
    [
        (
            _gemma4(embedding_length=2560),
            _assistant(),
            "draft-mtp",
            "target gemma-4-31b (gemma4), drafter gemma-4-31b-assistant (gemma4-assistant): "
            "target embedding_length 2560 != drafter embedding_length_out 5376",
        ),
        (
            _gemma4(),
            _assistant(vocab_size=256000),
            "draft-mtp",
            "target vocab size 262144 != drafter vocab size 256000",
        ),
        (_meta(), _assistant(), "draft-mtp", "a gemma4-assistant drafter needs a gemma4 target"),
        (_gemma4(), _assistant(), "draft-simple", "needs spec type draft-mtp"),
        (_gemma4(), _meta(name="gemma-3-270m"), "draft-mtp", "draft-mtp needs a gemma4-assistant"),
        (
            _meta(vocab_size=262208),
            _meta(name="other", vocab_size=256000),
            "draft-simple",
            "target vocab size 262208 and drafter vocab size 256000 differ by more than 128",
        ),
        (_gemma4(), _assistant(), "eagle", "unknown spec type 'eagle'"),
    ],
)
def test_pairing_errors(
    target: ModelMeta, drafter: ModelMeta, spec_type: str, message: str
) -> None:
    with pytest.raises(PairingError, match=re.escape(message)):
        check_pairing(target, drafter, spec_type)


def test_kv_cache_type_sizes_are_ggmls() -> None:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    from gemma4_fleet.memory_model import CACHE_TYPES

    for name, sizes in CACHE_TYPES.items():
        assert GGML_QUANT_SIZES[GGMLQuantizationType[name.upper()]] == sizes, name


def test_loading_the_deploys_does_not_import_numpy() -> None:
    """gguf (and numpy) load only where a GGUF header is parsed: not in a no-op converge."""
    import subprocess
    import sys

    probe = "import sys, gemma4_fleet.deploys; print('numpy' in sys.modules, 'gguf' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
