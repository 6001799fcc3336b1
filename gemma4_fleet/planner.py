"""GPU memory plan for one llama-server: weights, KV cache, compute buffer, CUDA overhead.

Pure functions over :class:`~gemma4_fleet.gguf_meta.ModelMeta`; no I/O.  The KV cache size is
exact (it reproduces llama-server's ``llama_kv_cache: size = ...`` lines); the compute buffer and
CUDA overhead are calibrated estimates (see ``compute_buffer_bytes``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from gemma4_fleet.gguf_meta import ModelMeta

MIB = 1 << 20
CTX_PAD = 256  # llama_context pads n_ctx and n_ctx_seq, llama_kv_cache_iswa the SWA size, to 256

# -ctk / -ctv values llama-server accepts (common/arg.cpp kv_cache_types)
CACHE_TYPES: dict[str, GGMLQuantizationType] = {
    "f32": GGMLQuantizationType.F32,
    "f16": GGMLQuantizationType.F16,
    "bf16": GGMLQuantizationType.BF16,
    "q8_0": GGMLQuantizationType.Q8_0,
    "q4_0": GGMLQuantizationType.Q4_0,
    "q4_1": GGMLQuantizationType.Q4_1,
    "iq4_nl": GGMLQuantizationType.IQ4_NL,
    "q5_0": GGMLQuantizationType.Q5_0,
    "q5_1": GGMLQuantizationType.Q5_1,
}

# llama-server's --spec-type values this planner knows how to pair (common/speculative.cpp)
SPEC_TYPES = ("draft-simple", "draft-mtp")
# common_speculative_are_compatible: draft-simple tolerates this vocab size difference
SPEC_VOCAB_MAX_SIZE_DIFFERENCE = 128

# --- calibration of what is not computable from the GGUF ------------------------------------
# Source: llama-server at this llama.cpp pin on an H100 (CUDA 13), a 12B-class gemma3-shaped model
# (48 layers, n_embd 3840, vocab 262208), -np 1, -ctk q8_0 -ctv q8_0, -fa on:
#   CUDA0 compute buffer 123.05 MiB at -c 8192 and 609.05 MiB at -c 65536;
#   nvidia-smi process memory minus the sum of the CUDA0 buffers (model + KV + compute) was about
#   590 MiB at both sizes (CUDA context, cuBLAS workspace, memory pools).
# Compute model: a + b * n_ctx * n_embd, the line through both points:
#   b = (609.05 - 123.05) MiB / ((65536 - 8192) * 3840) = 2.3143 bytes per (cell * n_embd)
#   a = 123.05 MiB - b * 8192 * 3840                        = 53.62 MiB
# It reproduces the two points exactly; other shapes (n_embd, -np > 1, the drafter's own context)
# are extrapolations of this single calibration.
_COMPUTE_PER_CELL_EMBD = (609.05 - 123.05) * MIB / ((65536 - 8192) * 3840)
_COMPUTE_BASE = 123.05 * MIB - _COMPUTE_PER_CELL_EMBD * 8192 * 3840
CUDA_OVERHEAD_BYTES = 590 * MIB

GpuLayers = int | Literal["all"]


class PlanError(ValueError):
    """The requested configuration does not fit or is not valid."""


class PairingError(ValueError):
    """The drafter cannot speculate for the target."""


@dataclass(frozen=True)
class CacheOptions:
    """llama-server flags that shape the KV cache (--parallel, --kv-unified, -ctk, -ctv, ...)."""

    parallel: int = 1
    unified: bool = False
    type_k: str = "f16"
    type_v: str = "f16"
    flash_attn: bool = True
    n_ubatch: int = 512
    swa_full: bool = False


@dataclass(frozen=True)
class KvSize:
    """A model's KV cache as llama.cpp allocates it."""

    streams: int
    cells_full: int  # per stream
    cells_swa: int  # per stream; 0 without SWA layers
    full_bytes: int  # the "non-SWA KV cache" size line
    swa_bytes: int  # the "SWA KV cache" size line
    layer_bytes: tuple[int, ...]  # K+V bytes each layer owns (0: no KV cache of its own)

    @property
    def total(self) -> int:
        return self.full_bytes + self.swa_bytes


@dataclass(frozen=True)
class GpuPlan:
    """Bytes on one GPU for a llama-server (target plus optional drafter) at a given n_ctx."""

    n_ctx: int  # as llama.cpp will use it: padded, a multiple of the slot count
    budget: int
    weights: int
    kv: int
    compute: int
    overhead: int
    reserved: int  # other tenants

    @property
    def used(self) -> int:
        return self.weights + self.kv + self.compute + self.overhead + self.reserved

    @property
    def headroom(self) -> int:
        return self.budget - self.used

    @property
    def fits(self) -> bool:
        return self.headroom >= 0

    def breakdown(self) -> str:
        return (
            f"n_ctx {self.n_ctx}: weights {_mib(self.weights)} + KV {_mib(self.kv)} + compute "
            f"{_mib(self.compute)} + CUDA overhead {_mib(self.overhead)} + other tenants "
            f"{_mib(self.reserved)} = {_mib(self.used)} of budget {_mib(self.budget)} "
            f"(headroom {_mib(self.headroom)})"
        )


def _mib(n: int) -> str:
    return f"{n / MIB:.2f} MiB"


def _pad(n: int) -> int:
    return -(-n // CTX_PAD) * CTX_PAD


def _row_bytes(type_name: str, width: int) -> int:
    try:
        sizes: tuple[int, int] = GGML_QUANT_SIZES[CACHE_TYPES[type_name]]
    except KeyError:
        raise PlanError(
            f"unknown KV cache type {type_name!r} (known: {', '.join(CACHE_TYPES)})"
        ) from None
    block, type_size = sizes
    if width % block:
        raise PlanError(f"KV cache type {type_name} needs widths divisible by {block}, got {width}")
    return width // block * type_size


def kv_cells(n_ctx: int, *, parallel: int, unified: bool) -> tuple[int, int]:
    """(streams, cells per stream) of the full-attention cache, as llama_context computes them."""
    if n_ctx < 1 or parallel < 1:
        raise PlanError(f"n_ctx and parallel must be positive, got {n_ctx} and {parallel}")
    if unified:
        return 1, _pad(n_ctx)
    cells = _pad(_pad(n_ctx) // parallel)
    if cells == 0:
        raise PlanError(f"n_ctx {n_ctx} leaves no cells for each of {parallel} slots")
    return parallel, cells


def kv_cache_bytes(
    meta: ModelMeta,
    *,
    n_ctx: int,
    parallel: int,
    unified: bool,
    type_k: str,
    type_v: str,
    flash_attn: bool,
    n_ubatch: int = 512,
    swa_full: bool = False,
) -> KvSize:
    """The KV cache llama.cpp allocates for ``-c n_ctx -np parallel [-kvu] -ctk -ctv -fa``.

    llama_context: n_ctx = P(n_ctx); not unified: S = parallel streams of P(n_ctx / S) cells;
    unified: 1 stream of n_ctx cells.  llama_kv_cache_iswa: SWA layers get
    P(min(cells, n_swa * (unified ? parallel : 1) + n_ubatch)) cells (all cells with --swa-full).
    llama_kv_cache: per layer owning KV, K is [head_count_kv * head_dim_k, cells, S] and V the
    same with head_dim_v; without flash attention V is transposed and padded to the widest V of
    all layers.  gemma4: the last shared_kv_layers layers reuse earlier layers' KV.
    gemma4-assistant: every layer shares the target's cache, so nothing of its own.
    """
    if meta.architecture == "gemma4-assistant":
        return KvSize(1, 0, 0, 0, 0, (0,) * meta.block_count)
    if not flash_attn and type_v in CACHE_TYPES and type_v not in ("f32", "f16", "bf16"):
        raise PlanError(f"quantized V cache ({type_v}) requires flash attention")
    streams, cells_full = kv_cells(n_ctx, parallel=parallel, unified=unified)
    # cparams.n_ubatch = min(n_batch, n_ubatch) and n_batch = min(-c, -b); -b (2048) >= n_ubatch
    ubatch = min(n_ubatch, n_ctx)

    has_swa = meta.sliding_window > 0 and any(meta.swa_layers)
    cells_swa = 0
    if has_swa:
        window = meta.sliding_window * (parallel if unified else 1) + ubatch
        cells_swa = cells_full if swa_full else _pad(min(cells_full, window))

    def v_width(il: int) -> int:
        head = meta.value_length_swa if meta.swa_layers[il] else meta.value_length
        return meta.head_count_kv[il] * head

    widest_v = max(v_width(il) for il in range(meta.block_count))
    n_own = meta.block_count - meta.shared_kv_layers
    layer_bytes = []
    for il in range(meta.block_count):
        if il >= n_own:
            layer_bytes.append(0)
            continue
        swa = has_swa and meta.swa_layers[il]
        w_k = meta.head_count_kv[il] * (meta.key_length_swa if swa else meta.key_length)
        w_v = v_width(il) if flash_attn else widest_v
        cells = cells_swa if swa else cells_full
        layer_bytes.append(streams * cells * (_row_bytes(type_k, w_k) + _row_bytes(type_v, w_v)))
    swa_bytes = sum(b for il, b in enumerate(layer_bytes) if has_swa and meta.swa_layers[il])
    return KvSize(
        streams=streams,
        cells_full=cells_full,
        cells_swa=cells_swa,
        full_bytes=sum(layer_bytes) - swa_bytes,
        swa_bytes=swa_bytes,
        layer_bytes=tuple(layer_bytes),
    )


def _offload(meta: ModelMeta, gpu_layers: GpuLayers) -> tuple[tuple[bool, ...], bool]:
    """(per-layer on GPU, output layer on GPU) for -ngl, as llama_model::load_tensors assigns them.

    -ngl N offloads the *last* N of the n_layer + 1 "layers", the output layer counting as the
    last one: layer il is on the GPU iff il >= n_layer + 1 - N.
    """
    n_layer = meta.block_count
    if gpu_layers == "all":
        n_gpu = n_layer + 1
    elif gpu_layers < 0:
        raise PlanError(f"gpu_layers must be 'all' or >= 0, got {gpu_layers}")
    else:
        n_gpu = min(gpu_layers, n_layer + 1)
    first = n_layer + 1 - n_gpu
    return tuple(il >= first for il in range(n_layer)), n_gpu > 0


# Input-layer tensors stay on the host (llama_model::load_tensors: dev_input is the CPU).
_HOST_TENSORS = frozenset({"token_embd.weight", "per_layer_token_embd.weight"})
_OUTPUT_TENSORS = frozenset({"output.weight", "output_norm.weight", "nextn.post_projection.weight"})
_UNUSED_PREFIX = "masked_embd_"  # GGML_OP_NONE in llama-arch.cpp: never loaded


def weight_bytes_on_gpu(meta: ModelMeta, gpu_layers: GpuLayers = "all") -> int:
    """Tensor bytes llama.cpp puts in the GPU's model buffer (not counting ~128-byte padding).

    ``blk.N.*`` follow layer N; output tensors follow the output layer; the token embeddings stay
    on the host, but a model without ``output.weight`` (tied embeddings) gets a copy of
    ``token_embd.weight`` as its output on the output layer's device.  ``rope_freqs.weight`` is
    duplicated onto the devices of the full-attention layers; other top-level tensors are created
    with layer 0.
    """
    on_gpu, output_on_gpu = _offload(meta, gpu_layers)
    total = 0
    for name, nbytes in meta.tensor_bytes.items():
        if name in _HOST_TENSORS or name.startswith(_UNUSED_PREFIX):
            placed = False
        elif name in _OUTPUT_TENSORS:
            placed = output_on_gpu
        elif name.startswith("blk."):
            placed = on_gpu[int(name.split(".", 2)[1])]
        elif name == "rope_freqs.weight":
            placed = any(g and not swa for g, swa in zip(on_gpu, meta.swa_layers, strict=True))
        else:
            placed = on_gpu[0]
        total += nbytes if placed else 0
    if "output.weight" not in meta.tensor_bytes and output_on_gpu:
        total += meta.tensor_bytes.get("token_embd.weight", 0)
    return total


def compute_buffer_bytes(meta: ModelMeta, n_ctx: int) -> int:
    """Estimated CUDA compute buffer: a + b * n_ctx * n_embd (calibration above)."""
    return round(_COMPUTE_BASE + _COMPUTE_PER_CELL_EMBD * n_ctx * meta.embedding_length)


def plan_gpu(
    target: ModelMeta,
    *,
    n_ctx: int,
    cache: CacheOptions,
    budget_mib: int,
    reserve_mib: int = 0,
    gpu_layers: GpuLayers = "all",
    drafter: ModelMeta | None = None,
    drafter_gpu_layers: GpuLayers = "all",
) -> GpuPlan:
    """GPU bytes for target (+ drafter, same process and n_ctx) at -c n_ctx; never raises on fit.

    KV of layers left on the CPU stays on the CPU (offload_kqv follows each layer's device).  The
    drafter's context has the target's n_ctx and cache options (common/speculative.cpp); its
    compute buffer uses the same calibrated formula with its n_embd.
    """
    streams, cells = kv_cells(n_ctx, parallel=cache.parallel, unified=cache.unified)
    weights = kv = compute = 0
    for meta, layers in ((target, gpu_layers), (drafter, drafter_gpu_layers)):
        if meta is None:
            continue
        size = kv_cache_bytes(
            meta,
            n_ctx=n_ctx,
            parallel=cache.parallel,
            unified=cache.unified,
            type_k=cache.type_k,
            type_v=cache.type_v,
            flash_attn=cache.flash_attn,
            n_ubatch=cache.n_ubatch,
            swa_full=cache.swa_full,
        )
        on_gpu, _ = _offload(meta, layers)
        weights += weight_bytes_on_gpu(meta, layers)
        kv += sum(b for b, g in zip(size.layer_bytes, on_gpu, strict=True) if g)
        compute += compute_buffer_bytes(meta, streams * cells)
    return GpuPlan(
        n_ctx=streams * cells,
        budget=budget_mib * MIB,
        weights=weights,
        kv=kv,
        compute=compute,
        overhead=CUDA_OVERHEAD_BYTES,
        reserved=reserve_mib * MIB,
    )


def fit_ctx(
    target: ModelMeta,
    *,
    ctx: int | Literal["auto"],
    cache: CacheOptions,
    budget_mib: int,
    reserve_mib: int = 0,
    gpu_layers: GpuLayers = "all",
    drafter: ModelMeta | None = None,
    drafter_gpu_layers: GpuLayers = "all",
) -> GpuPlan:
    """The plan for a fixed ctx, or for "auto" the largest ctx that fits.

    "auto" picks the largest multiple of 256 tokens per slot (so -c is a multiple of
    256 * parallel unless unified) with at most n_ctx_train tokens per slot.
    Raises PlanError naming the term that does not fit.
    """

    def plan(n_ctx: int) -> GpuPlan:
        return plan_gpu(
            target,
            n_ctx=n_ctx,
            cache=cache,
            budget_mib=budget_mib,
            reserve_mib=reserve_mib,
            gpu_layers=gpu_layers,
            drafter=drafter,
            drafter_gpu_layers=drafter_gpu_layers,
        )

    n_ctx_train = target.context_length
    if ctx != "auto":
        per_slot = kv_cells(ctx, parallel=cache.parallel, unified=cache.unified)[1]
        if per_slot > n_ctx_train:
            raise PlanError(
                f"ctx {ctx} gives {per_slot} tokens per slot, above n_ctx_train {n_ctx_train} "
                f"of {target.name}"
            )
        fixed = plan(ctx)
        _check_fits(fixed, f"ctx {ctx}")
        return fixed

    step = CTX_PAD * (1 if cache.unified else cache.parallel)
    lo, hi = 1, n_ctx_train // CTX_PAD  # in steps; lo always fits once checked
    if hi < 1:
        raise PlanError(f"n_ctx_train {n_ctx_train} of {target.name} is below {CTX_PAD}")
    _check_fits(plan(step), f"even the smallest ctx {step}")
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if plan(mid * step).fits:
            lo = mid
        else:
            hi = mid - 1
    return plan(lo * step)


def _check_fits(plan: GpuPlan, what: str) -> None:
    if plan.fits:
        return
    left = plan.budget - plan.reserved - plan.overhead
    if plan.weights > left:
        raise PlanError(
            f"GPU budget too small for the weights: {_mib(plan.budget)} minus other tenants "
            f"{_mib(plan.reserved)} and CUDA overhead {_mib(plan.overhead)} leaves {_mib(left)}, "
            f"the weights need {_mib(plan.weights)}"
        )
    raise PlanError(f"{what} does not fit the GPU budget: {plan.breakdown()}")


def check_pairing(target: ModelMeta, drafter: ModelMeta, spec_type: str) -> None:
    """Raise PairingError unless llama-server can speculate for target with drafter.

    draft-mtp with a gemma4-assistant: a gemma4 target, the target's hidden size
    (embedding_length) equal to the assistant's embedding_length_out, equal vocab sizes.
    draft-simple: vocab sizes within llama.cpp's tolerance (common_speculative_are_compatible).
    """
    pair = f"target {target.name} ({target.architecture}), drafter {drafter.name} "
    pair += f"({drafter.architecture})"
    if spec_type not in SPEC_TYPES:
        raise PairingError(f"{pair}: unknown spec type {spec_type!r} (known: {SPEC_TYPES})")
    if drafter.architecture == "gemma4-assistant" or spec_type == "draft-mtp":
        if spec_type != "draft-mtp" or drafter.architecture != "gemma4-assistant":
            raise PairingError(
                f"{pair}: spec type {spec_type} with this drafter; a gemma4-assistant drafter "
                "needs spec type draft-mtp and draft-mtp needs a gemma4-assistant drafter"
            )
        if target.architecture != "gemma4":
            raise PairingError(f"{pair}: a gemma4-assistant drafter needs a gemma4 target")
        if target.embedding_length != drafter.embedding_length_out:
            raise PairingError(
                f"{pair}: target embedding_length {target.embedding_length} != drafter "
                f"embedding_length_out {drafter.embedding_length_out}"
            )
        if target.vocab_size != drafter.vocab_size:
            raise PairingError(
                f"{pair}: target vocab size {target.vocab_size} != drafter vocab size "
                f"{drafter.vocab_size}"
            )
        return
    if abs(target.vocab_size - drafter.vocab_size) > SPEC_VOCAB_MAX_SIZE_DIFFERENCE:
        raise PairingError(
            f"{pair}: target vocab size {target.vocab_size} and drafter vocab size "
            f"{drafter.vocab_size} differ by more than {SPEC_VOCAB_MAX_SIZE_DIFFERENCE}"
        )
