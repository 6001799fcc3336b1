"""Bytes one llama-server puts on its GPU: weights, KV cache, compute buffer, CUDA overhead.

Pure functions over :class:`~gemma4_fleet.gguf_meta.ModelMeta`; no I/O.  The KV cache size is
exact (it reproduces llama-server's ``llama_kv_cache: size = ...`` lines); the compute buffer is
derived from llama.cpp's worst-case graph with one fitted constant (see ``compute_buffer_bytes``,
within 1 MiB of every logged H100 size); the CUDA overhead is calibrated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from gemma4_fleet.gguf_meta import ModelMeta

MIB = 1 << 20
CTX_PAD = 256  # llama_context pads n_ctx and n_ctx_seq, llama_kv_cache_iswa the SWA size, to 256

# -ctk / -ctv values llama-server accepts (common/arg.cpp kv_cache_types) -> (elements per block,
# bytes per block): ggml's sizes, as gguf.GGML_QUANT_SIZES has them (a unit test holds them
# equal; gguf itself, which imports numpy, is not needed to plan)
CACHE_TYPES: dict[str, tuple[int, int]] = {
    "f32": (1, 4),
    "f16": (1, 2),
    "bf16": (1, 2),
    "q8_0": (32, 34),
    "q4_0": (32, 18),
    "q4_1": (32, 20),
    "iq4_nl": (32, 18),
    "q5_0": (32, 22),
    "q5_1": (32, 24),
}

# llama-server's --spec-type values check_pairing knows (common/speculative.cpp)
SPEC_TYPES = ("draft-simple", "draft-mtp")
# common_speculative_are_compatible: draft-simple tolerates this vocab size difference
SPEC_VOCAB_MAX_SIZE_DIFFERENCE = 128

# --- calibration of what is not computable from the GGUF ------------------------------------
# CUDA context, cuBLAS workspace and memory pools: nvidia-smi's process memory minus the sum of the
# logged CUDA0 buffers (model + KV + compute) of llama-server at this pin on an H100 (CUDA 13):
# about 590 MiB for a 12B-class gemma3 model at -c 8192 and 65536; 594 MiB for the synthetic 12B
# gemma4 target at -c 8192/32768/65536 and 588.5 MiB for the tiny one (docs/gpu-proof.md).
CUDA_OVERHEAD_BYTES = 590 * MIB
# A drafter is a second llama_context in the same process (common/speculative.cpp): its own CUDA
# streams, cuBLAS handle and pool.  docs/gpu-proof.md, measured - logged with and without
# `-md ASSISTANT --spec-type draft-mtp`: 603.5 - 594.0 = 9.6 MiB (12B pair, -c 8192 and 65536),
# 600.8 - 588.5 = 12.3 MiB (tiny pair); rounded to 10 MiB.
DRAFT_CONTEXT_OVERHEAD_BYTES = 10 * MIB

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
class GpuUsage:
    """Bytes one llama-server (target plus optional drafter) puts on its GPU at a given n_ctx."""

    n_ctx: int  # as llama.cpp will use it: padded, a multiple of the slot count
    weights: int
    kv: int
    compute: int
    overhead: int  # CUDA context(s): one per llama_context

    @property
    def total(self) -> int:
        """This server's own bytes on the GPU, CUDA context included."""
        return self.weights + self.kv + self.compute + self.overhead


def _pad(n: int) -> int:
    return -(-n // CTX_PAD) * CTX_PAD


def _row_bytes(type_name: str, width: int) -> int:
    try:
        sizes: tuple[int, int] = CACHE_TYPES[type_name]
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


# --- compute buffer ---------------------------------------------------------------------------
# llama_context::sched_reserve (src/llama-context.cpp) reserves the worst-case graph -- a prompt
# ubatch of T = min(n_ctx, n_ubatch) tokens over the *whole* KV cache (memory->init_full(), so
# n_kv = all cells) -- and logs ggml_backend_sched_get_buffer_size() as "CUDA0 compute buffer
# size".  ggml-alloc (ggml/src/ggml-alloc.c) places the graph's intermediate tensors in one buffer;
# the size is its high-water mark: what is live (or a hole nothing fits in) below the largest
# block, plus that block.  In bytes, f32 activations:
#
#   compute = mask + base + max(attention block, FFN block)
#
# * mask: build_attn_inp_kq_mask (src/llama-graph.cpp) is an input [n_kv, T], f16 with flash
#   attention ("flash attention requires an f16 mask"), f32 without, created on the host and
#   copied into CUDA0 at the start of the split (ggml_backend_sched_split_graph in
#   ggml/src/ggml-backend.cpp), so it sits at the bottom until the last full-attention layer:
#   2 * T bytes per full-attention cell (the CUDA_Host buffer grows by the same 1024 B per cell).
# * attention block of the widest full-attention layer: build_attn_mha -> ggml_flash_attn_ext.
#   The CUDA buffer type sizes that node with ggml_cuda_flash_attn_ext_get_alloc_size
#   (ggml/src/ggml-cuda/fattn.cu; ggml_cuda_flash_attn_ext_get_f16_extra_data in fattn-common.cuh):
#   its f32 output [head_dim_v, n_head, T] plus, for the MMA/tile kernels a prompt batch uses, an
#   f16 copy of K and of V when the cache type is not f16: n_kv * n_head_kv * head_dim * 2 bytes
#   each, times the streams (-np without --kv-unified).  q8_0 cache, 4 KV heads * 512:
#   2 * 2 * 2048 B + the 2 * 512 B mask = the 9216 B per cell both logged slopes show.  Without
#   flash attention it is the f32 KQ matrix [n_kv, T, n_head] instead (derived, not measured).
#   The SWA layers' block (over the SWA cells) counts too, it only wins at tiny contexts.
# * FFN block: build_ffn (LLM_FFN_GELU, LLM_FFN_PAR) holds ffn_up, ffn_gate and
#   ggml_geglu_split(gate, up) [n_ff, T] at once (GLU is not in ggml_op_can_inplace): 3 * 4 * T *
#   n_ff.  It sets the buffer at short contexts (12B target at -c 8192: 90 MiB > 16 + 64 MiB).
# * base: 4 * T * (q + n_in) + the SWA mask (2 * T per SWA cell) + 0.4 MiB, where q = the widest
#   n_head * head_dim (Qcur, live while the attention block is allocated); n_in = 2 * n_embd for a
#   target (the residual stream and the slot of the input-embedding copy), embedding_length_out
#   for a gemma4-assistant (the target's hidden state it takes as input, its own residual being
#   narrow).  The n_in counts and the 0.4 MiB (small inputs, 128-byte alignment, fragmentation)
#   are fitted to the logs; the rest is derived.
#
# Predicted vs logged MiB, every CUDA0 compute line of docs/gpu-proof/run-*.txt (H100, -fa on,
# -ctk/-ctv q8_0, -np 1) and the earlier H100 calibration run of a gemma3-shaped 12B:
#   synthetic 12B gemma4 target, -c 8192 / 32768 / 65536:  130.90 / 336.90 / 624.90
#                                                 logged:  131.80 / 337.80 / 625.80
#   its assistant (cells = the target's), -c 8192 / 65536:  97.40 / 601.40  (97.78 / 601.78)
#   synthetic tiny target / assistant, -c 8192:             11.90 / 11.78   (11.01 / 11.13)
#   gemma3-shaped 12B, -c 8192 / 65536:                    122.90 / 608.90  (123.05 / 609.05)
_COMPUTE_SLACK = round(0.4 * MIB)
_FALLBACK_FF_PER_EMBD = 4  # n_ff when the GGUF has no attn_q/ffn_up pair to infer it from


def _feed_forward_length(meta: ModelMeta) -> int:
    """n_ff: ffn_up [n_embd, n_ff] and attn_q [n_embd, n_head * head_dim] of a layer are quantized
    alike (Q4_K_M, Q8_0, the synthetic Q4_0), so n_ff = n_head * head_dim * bytes(ffn_up) /
    bytes(attn_q); the widest layer counts.  Fallback: 4 * n_embd."""
    n_ff = 0
    for il in range(meta.block_count):
        up = meta.tensor_bytes.get(f"blk.{il}.ffn_up.weight")
        q = meta.tensor_bytes.get(f"blk.{il}.attn_q.weight")
        if up and q:
            n_ff = max(n_ff, _q_width(meta, il) * up // q)
    return n_ff or _FALLBACK_FF_PER_EMBD * meta.embedding_length


def _q_width(meta: ModelMeta, il: int) -> int:
    swa = meta.sliding_window > 0 and meta.swa_layers[il]
    return meta.head_count[il] * (meta.key_length_swa if swa else meta.key_length)


def _swa_cells(meta: ModelMeta, cells_full: int, cache: CacheOptions, ubatch: int) -> int:
    """SWA cells per stream (llama_kv_cache_iswa), 0 without SWA layers."""
    if meta.sliding_window <= 0 or not any(meta.swa_layers):
        return 0
    if cache.swa_full:
        return cells_full
    window = meta.sliding_window * (cache.parallel if cache.unified else 1) + ubatch
    return _pad(min(cells_full, window))


def compute_buffer_bytes(
    meta: ModelMeta,
    *,
    n_ctx: int,
    cache: CacheOptions,
    kv_from: ModelMeta | None = None,
) -> int:
    """CUDA0 compute buffer of ``meta``'s context at -c n_ctx (the model above this function).

    ``kv_from``: the model whose KV cache the attention reads, with ``cache`` its options -- a
    gemma4-assistant reads its target's (so its buffer grows with the target's context and the
    target's KV widths); default ``meta`` itself.
    """
    kv_meta = kv_from or meta
    streams, cells = kv_cells(n_ctx, parallel=cache.parallel, unified=cache.unified)
    ubatch = min(cache.n_ubatch, n_ctx)  # sched_reserve: min(n_ctx, n_ubatch) tokens
    cells_swa = _swa_cells(meta, cells, cache, ubatch)
    mask_per_cell = ubatch * (2 if cache.flash_attn else 4)

    def copies(type_name: str, width: int) -> int:  # f16 copy of a non-f16 K or V, per cell
        return 2 * width if type_name != "f16" else 0

    attention = 0
    for il in range(meta.block_count):
        swa = cells_swa > 0 and meta.swa_layers[il]
        n_kv = cells_swa if swa else cells
        out = (
            4 * ubatch * meta.head_count[il] * (meta.value_length_swa if swa else meta.value_length)
        )
        if cache.flash_attn:
            owner = [i for i in range(kv_meta.block_count) if kv_meta.swa_layers[i] == swa]
            w_k = max((kv_meta.head_count_kv[i] for i in owner), default=0)
            w_v = w_k * (kv_meta.value_length_swa if swa else kv_meta.value_length)
            w_k *= kv_meta.key_length_swa if swa else kv_meta.key_length
            per_cell = streams * (copies(cache.type_k, w_k) + copies(cache.type_v, w_v))
        else:
            per_cell = 4 * ubatch * meta.head_count[il]  # KQ, f32
        attention = max(attention, out + n_kv * per_cell)
    ffn = 3 * 4 * ubatch * _feed_forward_length(meta)
    q = max(_q_width(meta, il) for il in range(meta.block_count))
    if meta.architecture == "gemma4-assistant":
        n_in = meta.embedding_length_out
    else:
        n_in = 2 * meta.embedding_length
    base = 4 * ubatch * (q + n_in) + cells_swa * mask_per_cell + _COMPUTE_SLACK
    return cells * mask_per_cell + base + max(attention, ffn)


def gpu_usage(
    target: ModelMeta,
    *,
    n_ctx: int,
    cache: CacheOptions,
    gpu_layers: GpuLayers = "all",
    drafter: ModelMeta | None = None,
    drafter_gpu_layers: GpuLayers = "all",
    draft_cache: CacheOptions | None = None,
) -> GpuUsage:
    """GPU bytes for target (+ drafter, same process and n_ctx) at -c n_ctx.

    KV of layers left on the CPU stays on the CPU (offload_kqv follows each layer's device).  The
    drafter's context has the target's n_ctx and slots (common/speculative.cpp) and its own cache
    types (``draft_cache``, -ctkd/-ctvd; default ``cache``).  A gemma4-assistant has no KV of its
    own: its attention reads the target's cache, so its compute buffer is sized over the target's
    cells, KV widths and cache types.  A drafter adds a second CUDA context
    (DRAFT_CONTEXT_OVERHEAD_BYTES).
    """
    draft_cache = draft_cache or cache
    streams, cells = kv_cells(n_ctx, parallel=cache.parallel, unified=cache.unified)
    weights = kv = compute = 0
    models = ((target, gpu_layers, cache), (drafter, drafter_gpu_layers, draft_cache))
    for meta, layers, opts in models:
        if meta is None:
            continue
        size = kv_cache_bytes(
            meta,
            n_ctx=n_ctx,
            parallel=opts.parallel,
            unified=opts.unified,
            type_k=opts.type_k,
            type_v=opts.type_v,
            flash_attn=opts.flash_attn,
            n_ubatch=opts.n_ubatch,
            swa_full=opts.swa_full,
        )
        on_gpu, _ = _offload(meta, layers)
        weights += weight_bytes_on_gpu(meta, layers)
        kv += sum(b for b, g in zip(size.layer_bytes, on_gpu, strict=True) if g)
        if meta is drafter and meta.architecture == "gemma4-assistant":
            compute += compute_buffer_bytes(meta, n_ctx=n_ctx, cache=cache, kv_from=target)
        else:
            compute += compute_buffer_bytes(meta, n_ctx=n_ctx, cache=opts)
    overhead = CUDA_OVERHEAD_BYTES + (DRAFT_CONTEXT_OVERHEAD_BYTES if drafter is not None else 0)
    return GpuUsage(
        n_ctx=streams * cells, weights=weights, kv=kv, compute=compute, overhead=overhead
    )


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
