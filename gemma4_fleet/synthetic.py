"""Deterministic synthetic Gemma 4 target + ``gemma4-assistant`` MTP drafter GGUF pair.

Why: no Gemma 4 weights can be fetched in CI, yet llama.cpp's ``--spec-type draft-mtp`` path
(a target plus a separate assistant drafter that reads the target's KV cache) has to be proven
on the pinned llama.cpp. This module writes a pair of GGUF files that the pinned loader accepts
(key names, tensor names and shapes follow ``src/models/gemma4.cpp`` and
``src/models/gemma4-assistant.cpp``), with a real tokenizer copied from another GGUF.

The weights are random but shaped so that, whatever the context, the target always predicts one
fixed token and the drafter predicts the same token (acceptance near 100 %, exercising the accept
path) or, with ``drafter_agrees=False``, a different fixed token (acceptance 0, the reject path):

* every token embedding row starts with a 32-wide Q4_0 block ``[c, 0, ..., 0]`` where ``c`` is 1,
  or 2 for the favoured token; the remaining dimensions are small noise. After the input scaling
  by ``sqrt(n_embd)`` dimension 0 dominates the residual stream;
* the post-attention / post-FFN norms have tiny weights, so the random layers only add a little
  to the residual, and the final RMS norm maps the hidden state to roughly ``e0 * sqrt(n_embd)``;
* the tied LM head then scores token ``u`` about ``g * sqrt(n_embd) * c_u``: the favoured token
  wins by a margin of 32 logits (``g = 32 / sqrt(n_embd)``), beyond any sampler's reach;
* the drafter's pre-projection routes dimension 0 of both halves of ``[embedding, h]`` to its own
  dimension 0, and its post-projection routes it back, so the same argument holds for its head.

With ``agreement=p`` (``--agreement p``) the pair is a *cycle* pair instead, for
acceptance-dependent tests (issue 14: the draft length that pays depends on acceptance):

* each token has a code ``0..CYCLE_LEN-1`` (a cycle token its index in the cycle, any other token
  its id mod ``CYCLE_LEN``), written as a one-hot Q4_0 block 0 of its embedding row;
* an untied ``output.weight`` maps code ``i`` to cycle token ``i + 1``: the target's greedy
  continuation walks through ``CYCLE_LEN`` ordinary word tokens, whatever the prompt;
* the drafter's pre-projection copies the code dimensions of the token embedding, and its head
  maps code ``i`` to the target's next token for exactly ``round(p * CYCLE_LEN)`` codes (chosen
  by the seed; the sets are nested as p grows) and to cycle token ``i + 2`` for the others. Over
  a generation the cycle is walked uniformly, so a draft at any position is right with
  probability ``p`` (to 1/``CYCLE_LEN``), deterministically per context (the last token).

Files are byte-for-byte reproducible: a seeded numpy ``Generator`` per tensor, no timestamps, and
a small in-module GGUF serializer that streams tensors in chunks (the ``12b`` shape never holds a
whole tensor in float32) and copies the tokenizer's key/value records verbatim.
"""

from __future__ import annotations

import argparse
import math
import mmap
import os
import re
import struct
import sys
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np
import numpy.typing as npt
from gguf import GGMLQuantizationType as QType
from gguf import GGUFValueType
from gguf.quants import quantize as gguf_quantize

from gemma4_fleet.common import sha256_file

__all__ = [
    "ASSISTANT_ARCH",
    "CYCLE_LEN",
    "TARGET_ARCH",
    "CycleSpec",
    "Shape",
    "SyntheticPair",
    "main",
    "shape_spec",
    "write_pair",
]

TARGET_ARCH = "gemma4"
ASSISTANT_ARCH = "gemma4-assistant"
ShapeName = Literal["tiny", "cpu", "12b"]

_GGUF_MAGIC = 0x46554747  # "GGUF" little-endian
_GGUF_VERSION = 3
_ALIGNMENT = 32
_QK4_0 = 32  # elements per Q4_0 block
_Q4_0_BLOCK_BYTES = 18  # f16 scale + 16 bytes of nibbles
_CHUNK_BYTES = 32 << 20  # upper bound on what one generated chunk holds
_FILE_TYPE_MOSTLY_Q4_0 = 2

# Token the target always predicts, and the one a disagreeing drafter predicts instead. Looked
# up by text in the copied vocabulary (both exist in the Gemma 3 vocabulary); see _pick_tokens.
_AGREE_TOKEN_TEXT = "\u2581fleet".encode()
# Cycle pairs: how many tokens the target's greedy continuation walks through. Their codes live in
# Q4_0 block 0 (32 dimensions) of every embedding row, and the narrowest assistant is 32 wide.
CYCLE_LEN = 32
_CYCLE_WORD = re.compile(rb"^\xe2\x96\x81[a-z]{4,10}$")  # "\u2581" + an ordinary lowercase word
_DISAGREE_TOKEN_TEXT = "\u2581drift".encode()


@dataclass(frozen=True)
class CycleSpec:
    """What a cycle pair computes (see the module doc); tests check the weights against it."""

    tokens: tuple[int, ...]  # tokens[i] is the cycle token with code i
    agreeing: frozenset[int]  # codes after which the drafter proposes the target's next token

    def code(self, token: int) -> int:
        """The code a token's embedding carries: its cycle index, else its id mod the length."""
        return self.tokens.index(token) if token in self.tokens else token % len(self.tokens)

    def target_next(self, token: int) -> int:
        """The target's greedy token after ``token``."""
        return self.tokens[(self.code(token) + 1) % len(self.tokens)]

    def drafter_next(self, token: int) -> int:
        """The drafter's proposal after ``token``: right on agreeing codes, one too far else."""
        code = self.code(token)
        return self.tokens[(code + (1 if code in self.agreeing else 2)) % len(self.tokens)]

    @property
    def agreement(self) -> float:
        return len(self.agreeing) / len(self.tokens)


@dataclass(frozen=True)
class SyntheticPair:
    """Paths of a written target GGUF and its assistant (MTP drafter) GGUF."""

    target: Path
    drafter: Path
    cycle: CycleSpec | None = None  # set for a cycle pair (``agreement`` given)


@dataclass(frozen=True)
class Shape:
    """Hyper-parameters of one target/assistant pair.

    ``swa_pattern`` is per target layer (True = sliding-window attention). The pinned loader needs
    the last two KV-owning target layers to be [SWA, full] (shared-KV layers and the assistant
    reuse them) and the target's last two layers to be [SWA, full] (the assistant shares the
    caches of layers n_layer-2 / n_layer-1).
    """

    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv_swa: int
    n_head_kv_full: int
    head_dim_swa: int
    head_dim_full: int
    swa_pattern: tuple[bool, ...]
    shared_kv_layers: int
    sliding_window: int
    context_length: int
    rope_partial_full: float  # fraction of the full-attention head dim that rotates
    asst_n_embd: int
    asst_n_ff: int
    asst_n_head: int
    asst_swa_pattern: tuple[bool, ...]
    # F32 target FFN weights: memory-bound at one token, cheap to batch (see shape "cpu").
    target_ffn_f32: bool = False

    @property
    def n_layer(self) -> int:
        return len(self.swa_pattern)

    @property
    def asst_n_layer(self) -> int:
        return len(self.asst_swa_pattern)


def shape_spec(shape: ShapeName) -> Shape:
    """The hyper-parameters behind a shape name (exposed so tests can check files against it)."""
    if shape == "tiny":
        # 64-wide target, 32-wide assistant: the 262144-row embedding and LM head dominate the
        # size, and 32 is the smallest width a Q4_0 row (and a q8_0 KV head) can have.
        return Shape(
            n_embd=64,
            n_ff=128,
            n_head=2,
            n_head_kv_swa=2,
            n_head_kv_full=1,
            head_dim_swa=32,
            head_dim_full=64,
            swa_pattern=(True, True, True, False, True, False),
            shared_kv_layers=2,
            sliding_window=128,
            context_length=8192,
            rope_partial_full=0.25,
            asst_n_embd=32,
            asst_n_ff=64,
            asst_n_head=2,
            asst_swa_pattern=(True, False),
        )
    if shape == "cpu":
        # The tiny pair with a heavy target: 6 x 3 F32 FFN matrices of 64 x 32768 (151 MB). One
        # token reads them all from memory, a batch of draft tokens reuses them (tinyBLAS), and
        # the drafter stays tiny: as on a GPU, verifying k drafts costs about one token, so
        # the draft length that pays depends on acceptance -- on a 2-core CPU too.
        return replace(shape_spec("tiny"), n_ff=32768, target_ffn_f32=True)
    if shape == "12b":
        # A 12B-class dense Gemma 4 (Gemma 3 12B widths with Gemma 4's 512-wide global heads and
        # 5:1 local:global layout, ~11.8B parameters, ~6.6 GB as Q4_0), no shared-KV layers like
        # the large Gemma 4 models, and a 4-layer assistant in the style of the released ones.
        return Shape(
            n_embd=3840,
            n_ff=15360,
            n_head=16,
            n_head_kv_swa=8,
            n_head_kv_full=4,
            head_dim_swa=256,
            head_dim_full=512,
            swa_pattern=tuple((i % 6) != 5 for i in range(48)),
            shared_kv_layers=0,
            sliding_window=1024,
            context_length=131072,
            rope_partial_full=0.25,
            asst_n_embd=1024,
            asst_n_ff=4096,
            asst_n_head=8,
            asst_swa_pattern=(True, True, True, False),
        )
    raise ValueError(f"unknown shape {shape!r} (expected 'tiny', 'cpu' or '12b')")


def _check_shape(s: Shape) -> None:
    """Fail early on layouts the pinned loader would reject with an assertion at load time."""
    n_kv = s.n_layer - s.shared_kv_layers
    if n_kv < 2 or s.swa_pattern[n_kv - 2] is not True or s.swa_pattern[n_kv - 1] is not False:
        raise ValueError("the last two KV-owning target layers must be [SWA, full]")
    if s.swa_pattern[-2] is not True or s.swa_pattern[-1] is not False:
        raise ValueError(
            "the last two target layers must be [SWA, full] (the assistant shares them)"
        )
    for width in (s.n_embd, s.n_ff, s.asst_n_embd, s.asst_n_ff, s.head_dim_swa, s.head_dim_full):
        if width % _QK4_0:
            raise ValueError(f"width {width} is not a multiple of the Q4_0 block size")
    for n_kv_head in (s.n_head_kv_swa, s.n_head_kv_full):
        if s.n_head % n_kv_head or s.asst_n_head % n_kv_head:
            raise ValueError("head counts must be multiples of the KV head counts (GQA)")


# --------------------------------------------------------------------------- GGUF serialization


def _str_bytes(s: str | bytes) -> bytes:
    raw = s.encode("utf-8") if isinstance(s, str) else s
    return struct.pack("<Q", len(raw)) + raw


def _kv(key: str, vtype: GGUFValueType, value: Any) -> bytes:
    """One serialized GGUF key/value record for the scalar/array types this module needs."""
    return _str_bytes(key) + struct.pack("<I", vtype) + _value(vtype, value)


_SCALAR_FMT = {
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
}


def _value(vtype: GGUFValueType, value: Any) -> bytes:
    if vtype == GGUFValueType.STRING:
        return _str_bytes(value)
    if vtype in _SCALAR_FMT:
        return struct.pack(_SCALAR_FMT[vtype], value)
    raise TypeError(f"unsupported GGUF value type {vtype!r}")


def _kv_array(key: str, sub: GGUFValueType, values: Sequence[Any]) -> bytes:
    body = b"".join(_value(sub, v) for v in values)
    head = _str_bytes(key) + struct.pack("<IIQ", GGUFValueType.ARRAY, sub, len(values))
    return head + body


@dataclass(frozen=True)
class _Tensor:
    """A tensor to write: numpy-order shape (rows, cols) and a generator of its raw bytes."""

    name: str
    shape: tuple[int, ...]
    qtype: QType  # F32 or Q4_0
    chunks: Callable[[], Iterator[npt.NDArray[Any]]]

    @property
    def nbytes(self) -> int:
        n = math.prod(self.shape)
        if self.qtype == QType.F32:
            return 4 * n
        return n // _QK4_0 * _Q4_0_BLOCK_BYTES


def _pad(n: int) -> int:
    return (n + _ALIGNMENT - 1) // _ALIGNMENT * _ALIGNMENT


def _write_gguf(path: Path, kvs: Sequence[bytes], tensors: Sequence[_Tensor]) -> None:
    """Write a GGUF v3 file, streaming tensor data chunk by chunk; atomic via rename."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as fh:
        fh.write(struct.pack("<IIQQ", _GGUF_MAGIC, _GGUF_VERSION, len(tensors), len(kvs)))
        for record in kvs:
            fh.write(record)
        offset = 0
        for t in tensors:
            ne = tuple(reversed(t.shape))  # ggml order: innermost dimension first
            fh.write(_str_bytes(t.name))
            fh.write(struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne))
            fh.write(struct.pack("<IQ", t.qtype, offset))
            offset += _pad(t.nbytes)
        _write_padding(fh)
        for t in tensors:
            written = 0
            for chunk in t.chunks():
                data = np.ascontiguousarray(chunk).tobytes()
                fh.write(data)
                written += len(data)
            if written != t.nbytes:
                raise AssertionError(f"{t.name}: wrote {written} bytes, expected {t.nbytes}")
            _write_padding(fh)
    os.replace(tmp, path)


def _write_padding(fh: BinaryIO) -> None:
    pos = fh.tell()
    fh.write(b"\0" * (_pad(pos) - pos))


# --------------------------------------------------------------------------- weight generators


def _rng(seed: int, name: str) -> np.random.Generator:
    """One independent stream per tensor, so tensors can be generated lazily in any order."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _rows_per_chunk(row_bytes: int) -> int:
    return max(1, _CHUNK_BYTES // row_bytes)


def _q4_0_noise(
    rng: np.random.Generator, n: int, n_blocks: int, std: float
) -> npt.NDArray[np.uint8]:
    """``n`` rows of random Q4_0 blocks (values ~ std), built from bytes, no float matrix."""
    # (q - 8) for uniform q in 0..15 has a standard deviation of sqrt(21.5) ~ 4.64.
    scale = rng.uniform(0.5, 1.5, size=(n, n_blocks)) * (std / math.sqrt(21.5))
    blocks = np.empty((n, n_blocks, _Q4_0_BLOCK_BYTES), dtype=np.uint8)
    blocks[..., :2] = scale.astype(np.float16).view(np.uint8).reshape(n, n_blocks, 2)
    blocks[..., 2:] = rng.integers(0, 256, size=(n, n_blocks, 16), dtype=np.uint8)
    return blocks.reshape(n, n_blocks * _Q4_0_BLOCK_BYTES)


def _random_matrix(seed: int, name: str, rows: int, cols: int) -> _Tensor:
    """A random Q4_0 weight matrix with entries ~ 1/sqrt(cols)."""

    def gen() -> Iterator[npt.NDArray[Any]]:
        rng = _rng(seed, name)
        n_blocks = cols // _QK4_0
        step = _rows_per_chunk(n_blocks * _Q4_0_BLOCK_BYTES)
        for r0 in range(0, rows, step):
            yield _q4_0_noise(rng, min(step, rows - r0), n_blocks, 1.0 / math.sqrt(cols))

    return _Tensor(name, (rows, cols), QType.Q4_0, gen)


def _embedding(seed: int, name: str, n_vocab: int, n_embd: int, favoured: int) -> _Tensor:
    """Q4_0 ``[n_vocab, n_embd]`` table whose dimension 0 is 1 (2 for ``favoured``), see module doc.

    Block 0 of each row is written directly: scale ``-c/8`` with nibble 0 for element 0 (value
    ``(0 - 8) * -c/8 = c``) and nibble 8 (value 0) elsewhere. Other blocks are small noise whose
    squared norm stays well below ``c**2`` whatever the width.
    """

    def gen() -> Iterator[npt.NDArray[Any]]:
        rng = _rng(seed, name)
        n_blocks = n_embd // _QK4_0
        step = _rows_per_chunk(n_blocks * _Q4_0_BLOCK_BYTES)
        for r0 in range(0, n_vocab, step):
            n = min(step, n_vocab - r0)
            c = np.full(n, 1.0, dtype=np.float32)
            if r0 <= favoured < r0 + n:
                c[favoured - r0] = 2.0
            first = np.empty((n, _Q4_0_BLOCK_BYTES), dtype=np.uint8)
            first[:, :2] = (-c / 8).astype(np.float16).view(np.uint8).reshape(n, 2)
            first[:, 2] = 0x80  # element 0 -> nibble 0, element 16 -> nibble 8
            first[:, 3:] = 0x88
            if n_blocks == 1:
                yield first
                continue
            rest = _q4_0_noise(rng, n, n_blocks - 1, 0.1 / math.sqrt(n_embd))
            yield np.concatenate([first, rest], axis=1)

    return _Tensor(name, (n_vocab, n_embd), QType.Q4_0, gen)


def _routing_matrix(
    seed: int, name: str, rows: int, cols: int, routes: Mapping[int, Sequence[int]]
) -> _Tensor:
    """Q4_0 projection: output ``o`` = mean of inputs ``routes[o]``; other outputs random noise.

    The noise rows ignore every routed input column, so the dominant dimensions of the input only
    flow into their routed outputs and keep dominating after the projection.
    """
    sources = sorted({c for cs in routes.values() for c in cs})

    def gen() -> Iterator[npt.NDArray[Any]]:
        rng = _rng(seed, name)
        step = max(1, (_CHUNK_BYTES // 4) // cols)
        for r0 in range(0, rows, step):
            n = min(step, rows - r0)
            w = rng.standard_normal((n, cols), dtype=np.float32) / np.float32(math.sqrt(cols))
            w[:, sources] = 0.0
            for out, ins in routes.items():
                if r0 <= out < r0 + n:
                    w[out - r0, :] = 0.0
                    w[out - r0, list(ins)] = 1.0 / len(ins)
            yield gguf_quantize(w, QType.Q4_0)

    return _Tensor(name, (rows, cols), QType.Q4_0, gen)


def _q4_0_block0(hot: npt.NDArray[np.bool_]) -> npt.NDArray[np.uint8]:
    """Q4_0 blocks (one per row of ``hot``, 32 wide) holding 1.0 where ``hot``, else 0.0.

    Scale ``-1/8`` with nibble 0 gives ``(0 - 8) * -1/8 = 1``, nibble 8 gives 0; a row without a
    hot element gets scale 0. Element ``j < 16`` is the low nibble of byte ``j``, ``j + 16`` the
    high one.
    """
    n = hot.shape[0]
    nibbles = np.where(hot, 0, 8).astype(np.uint8)
    out = np.empty((n, _Q4_0_BLOCK_BYTES), dtype=np.uint8)
    scale = np.where(hot.any(axis=1), -1.0 / 8, 0.0).astype(np.float16)
    out[:, :2] = scale.view(np.uint8).reshape(n, 2)
    out[:, 2:] = nibbles[:, :16] | (nibbles[:, 16:] << 4)
    return out


def _block0_table(
    seed: int,
    name: str,
    n_vocab: int,
    width: int,
    hot_rows: Callable[[int, int], npt.NDArray[np.bool_]],
    *,
    noise: bool,
) -> _Tensor:
    """Q4_0 ``[n_vocab, width]`` table: block 0 of row r is one/multi-hot (``hot_rows(r0, n)``
    gives the rows ``r0..r0+n-1``); the other blocks small noise (``noise``) or zero."""

    def gen() -> Iterator[npt.NDArray[Any]]:
        rng = _rng(seed, name)
        n_blocks = width // _QK4_0
        step = _rows_per_chunk(n_blocks * _Q4_0_BLOCK_BYTES)
        for r0 in range(0, n_vocab, step):
            n = min(step, n_vocab - r0)
            first = _q4_0_block0(hot_rows(r0, n))
            if n_blocks == 1:
                yield first
                continue
            if noise:
                rest = _q4_0_noise(rng, n, n_blocks - 1, 0.1 / math.sqrt(width))
            else:
                rest = np.zeros((n, (n_blocks - 1) * _Q4_0_BLOCK_BYTES), dtype=np.uint8)
            yield np.concatenate([first, rest], axis=1)

    return _Tensor(name, (n_vocab, width), QType.Q4_0, gen)


def _code_rows(codes: npt.NDArray[np.int64]) -> Callable[[int, int], npt.NDArray[np.bool_]]:
    """Rows one-hot at their token's code (an embedding table)."""

    def rows(r0: int, n: int) -> npt.NDArray[np.bool_]:
        hot = np.zeros((n, _QK4_0), dtype=np.bool_)
        hot[np.arange(n), codes[r0 : r0 + n]] = True
        return hot

    return rows


def _head_rows(next_of_code: Sequence[int]) -> Callable[[int, int], npt.NDArray[np.bool_]]:
    """An LM head: the row of token ``next_of_code[i]`` is hot at code ``i``; other rows zero."""
    by_row: dict[int, list[int]] = {}
    for code, token in enumerate(next_of_code):
        by_row.setdefault(token, []).append(code)

    def rows(r0: int, n: int) -> npt.NDArray[np.bool_]:
        hot = np.zeros((n, _QK4_0), dtype=np.bool_)
        for token, codes in by_row.items():
            if r0 <= token < r0 + n:
                hot[token - r0, codes] = True
        return hot

    return rows


def _vector(seed: int, name: str, n: int, mean: float, rel_noise: float) -> _Tensor:
    """F32 vector ``mean * (1 + rel_noise * N(0, 1))`` (norm weights, scales)."""

    def gen() -> Iterator[npt.NDArray[Any]]:
        noise = _rng(seed, name).standard_normal(n)
        yield (mean * (1.0 + rel_noise * noise)).astype(np.float32)

    return _Tensor(name, (n,), QType.F32, gen)


def _constant(name: str, values: Sequence[float]) -> _Tensor:
    arr = np.asarray(values, dtype=np.float32)
    return _Tensor(name, (len(values),), QType.F32, lambda: iter([arr]))


# Norm weights of the residual branches: small enough that 2 * n_layer branches add far less than
# the dominant dimension 0 to the residual stream (see module docstring).
_BRANCH_NORM = 0.01
_LOGIT_MARGIN = 32.0


def _rope_freqs(s: Shape) -> _Tensor:
    # Gemma 4 "proportional" rope on full-attention layers: factor 1 for the rotated pairs, 1e30
    # (no rotation) for the rest, as convert_hf_to_gguf.py writes it.
    n_pairs = s.head_dim_full // 2
    n_rot = int(s.head_dim_full * s.rope_partial_full / 2)
    return _constant("rope_freqs.weight", [1.0] * n_rot + [1e30] * (n_pairs - n_rot))


def _random_matrix_f32(seed: int, name: str, rows: int, cols: int) -> _Tensor:
    """A random F32 weight matrix with entries ~ 1/sqrt(cols)."""

    def gen() -> Iterator[npt.NDArray[Any]]:
        rng = _rng(seed, name)
        step = max(1, (_CHUNK_BYTES // 4) // cols)
        for r0 in range(0, rows, step):
            n = min(step, rows - r0)
            yield rng.standard_normal((n, cols), dtype=np.float32) / np.float32(math.sqrt(cols))

    return _Tensor(name, (rows, cols), QType.F32, gen)


def _block_tensors(
    seed: int,
    s: Shape,
    il: int,
    *,
    n_embd: int,
    n_ff: int,
    n_head: int,
    is_swa: bool,
    ffn_f32: bool = False,
) -> list[_Tensor]:
    """Tensors every target and assistant block has (K/V ones are added by the caller)."""
    hd = s.head_dim_swa if is_swa else s.head_dim_full
    p = f"blk.{il}."
    ffn = _random_matrix_f32 if ffn_f32 else _random_matrix
    return [
        _vector(seed, p + "attn_norm.weight", n_embd, 1.0, 0.05),
        _random_matrix(seed, p + "attn_q.weight", n_head * hd, n_embd),
        _random_matrix(seed, p + "attn_output.weight", n_embd, n_head * hd),
        _vector(seed, p + "attn_q_norm.weight", hd, 1.0, 0.05),
        _vector(seed, p + "post_attention_norm.weight", n_embd, _BRANCH_NORM, 0.1),
        _constant(p + "layer_output_scale.weight", [1.0]),
        _vector(seed, p + "ffn_norm.weight", n_embd, 1.0, 0.05),
        ffn(seed, p + "ffn_gate.weight", n_ff, n_embd),
        ffn(seed, p + "ffn_up.weight", n_ff, n_embd),
        ffn(seed, p + "ffn_down.weight", n_embd, n_ff),
        _vector(seed, p + "post_ffw_norm.weight", n_embd, _BRANCH_NORM, 0.1),
    ]


def _codes(cycle: CycleSpec, n_vocab: int) -> npt.NDArray[np.int64]:
    codes = np.arange(n_vocab, dtype=np.int64) % len(cycle.tokens)
    codes[list(cycle.tokens)] = np.arange(len(cycle.tokens))
    return codes


def _target_tensors(
    seed: int, s: Shape, n_vocab: int, favoured: int, cycle: CycleSpec | None = None
) -> list[_Tensor]:
    n_layer_kv = s.n_layer - s.shared_kv_layers
    seed_t = seed * 2  # target and assistant use distinct streams for equally named tensors
    if cycle is None:
        out = [_embedding(seed_t, "token_embd.weight", n_vocab, s.n_embd, favoured)]
    else:
        rows = _code_rows(_codes(cycle, n_vocab))
        out = [_block0_table(seed_t, "token_embd.weight", n_vocab, s.n_embd, rows, noise=True)]
    for il, is_swa in enumerate(s.swa_pattern):
        hd = s.head_dim_swa if is_swa else s.head_dim_full
        n_kv = s.n_head_kv_swa if is_swa else s.n_head_kv_full
        block = _block_tensors(
            seed_t,
            s,
            il,
            n_embd=s.n_embd,
            n_ff=s.n_ff,
            n_head=s.n_head,
            is_swa=is_swa,
            ffn_f32=s.target_ffn_f32,
        )
        if il < n_layer_kv:  # shared-KV layers have no K/V projections of their own
            p = f"blk.{il}."
            block[2:2] = [
                _random_matrix(seed_t, p + "attn_k.weight", n_kv * hd, s.n_embd),
                _random_matrix(seed_t, p + "attn_v.weight", n_kv * hd, s.n_embd),
                _vector(seed_t, p + "attn_k_norm.weight", hd, 1.0, 0.05),
            ]
        out += block
    out.append(_vector(seed_t, "output_norm.weight", s.n_embd, _out_norm(s.n_embd), 0.0))
    out.append(_rope_freqs(s))
    if cycle is not None:  # an untied head: code i -> the next cycle token
        head = _head_rows([cycle.target_next(t) for t in cycle.tokens])
        out.append(_block0_table(seed_t, "output.weight", n_vocab, s.n_embd, head, noise=False))
    return out


def _out_norm(n_embd: int) -> float:
    # Normalised hidden state ~ e0 * sqrt(n_embd); logit gap between c=2 and c=1 tokens is then
    # weight * sqrt(n_embd) = _LOGIT_MARGIN.
    return _LOGIT_MARGIN / math.sqrt(n_embd)


def _assistant_tensors(
    seed: int,
    s: Shape,
    n_vocab: int,
    favoured: int,
    n_embd_out: int,
    cycle: CycleSpec | None = None,
) -> list[_Tensor]:
    seed_a = seed * 2 + 1
    a = s.asst_n_embd
    if cycle is not None:
        # Its head maps the code of the token it is given to its proposal; the pre-projection
        # copies the code dimensions of that token's (target) embedding, the post-projection
        # copies them back.
        head = _head_rows([cycle.drafter_next(t) for t in cycle.tokens])
        copy = {j: [j] for j in range(len(cycle.tokens))}
        out = [
            _block0_table(seed_a, "token_embd.weight", n_vocab, a, head, noise=False),
            _routing_matrix(seed_a, "nextn.pre_projection.weight", a, 2 * n_embd_out, copy),
            _routing_matrix(seed_a, "nextn.post_projection.weight", n_embd_out, a, copy),
        ]
    else:
        out = [
            # Its LM head (the input embedding is the target's token_embd, read at run time).
            _embedding(seed_a, "token_embd.weight", n_vocab, a, favoured),
            # [embedding(target token), h] -> assistant width; output 0 = mean of both dims 0.
            _routing_matrix(
                seed_a, "nextn.pre_projection.weight", a, 2 * n_embd_out, {0: [0, n_embd_out]}
            ),
            _routing_matrix(seed_a, "nextn.post_projection.weight", n_embd_out, a, {0: [0]}),
        ]
    for il, is_swa in enumerate(s.asst_swa_pattern):
        out += _block_tensors(
            seed_a, s, il, n_embd=a, n_ff=s.asst_n_ff, n_head=s.asst_n_head, is_swa=is_swa
        )
    out.append(_vector(seed_a, "output_norm.weight", a, _out_norm(a), 0.0))
    out.append(_rope_freqs(s))
    return out


# --------------------------------------------------------------------------- metadata


# Byte sizes of the fixed-width GGUF value types, keyed by their type code.
_FIXED_SIZES: dict[int, int] = {
    int(t): size
    for t, size in (
        (GGUFValueType.UINT8, 1),
        (GGUFValueType.INT8, 1),
        (GGUFValueType.UINT16, 2),
        (GGUFValueType.INT16, 2),
        (GGUFValueType.UINT32, 4),
        (GGUFValueType.INT32, 4),
        (GGUFValueType.FLOAT32, 4),
        (GGUFValueType.BOOL, 1),
        (GGUFValueType.UINT64, 8),
        (GGUFValueType.INT64, 8),
        (GGUFValueType.FLOAT64, 8),
    )
}


def _skip_value(buf: mmap.mmap, pos: int, vtype: int) -> int:
    """Offset just past one serialized value of type ``vtype`` starting at ``pos``."""
    if vtype in _FIXED_SIZES:
        return pos + _FIXED_SIZES[vtype]
    if vtype == GGUFValueType.STRING:
        return pos + 8 + int(struct.unpack_from("<Q", buf, pos)[0])
    if vtype == GGUFValueType.ARRAY:
        sub, count = (int(x) for x in struct.unpack_from("<IQ", buf, pos))
        pos += 12
        if sub in _FIXED_SIZES:
            return pos + count * _FIXED_SIZES[sub]
        for _ in range(count):
            pos = _skip_value(buf, pos, sub)
        return pos
    raise ValueError(f"unknown GGUF value type {vtype}")


def _tokenizer_records(source: Path) -> tuple[list[bytes], list[bytes]]:
    """Verbatim ``tokenizer.*`` key/value records of ``source`` and its token texts (raw bytes).

    A direct scan of the GGUF header: gguf.GGUFReader builds numpy views per string and takes
    ~15 s on a 262144-token vocabulary; this takes well under a second.
    """
    with source.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        magic, version, _n_tensors, n_kv = struct.unpack_from("<IIQQ", buf, 0)
        if magic != _GGUF_MAGIC or version < 2:
            raise ValueError(f"{source}: not a GGUF v2+ file")
        pos = 24
        records: list[bytes] = []
        tokens: list[bytes] = []
        for _ in range(n_kv):
            start = pos
            key_len = int(struct.unpack_from("<Q", buf, pos)[0])
            key = buf[pos + 8 : pos + 8 + key_len].decode("utf-8")
            pos += 8 + key_len
            vtype = int(struct.unpack_from("<I", buf, pos)[0])
            value_at = pos + 4
            pos = _skip_value(buf, value_at, vtype)
            if not key.startswith("tokenizer."):
                continue
            records.append(buf[start:pos])
            if key == "tokenizer.ggml.tokens":
                count = int(struct.unpack_from("<Q", buf, value_at + 4)[0])
                p = value_at + 12
                for _ in range(count):
                    n = int(struct.unpack_from("<Q", buf, p)[0])
                    tokens.append(buf[p + 8 : p + 8 + n])
                    p += 8 + n
    if not tokens:
        raise ValueError(f"{source}: no tokenizer.ggml.tokens to copy")
    return records, tokens


def _pick_tokens(tokens: Sequence[bytes]) -> tuple[int, int]:
    """Ids of the token everyone agrees on and of the one a disagreeing drafter picks."""
    index = {t: i for i, t in enumerate(tokens)}
    agree = index.get(_AGREE_TOKEN_TEXT, min(1000, len(tokens) - 2))
    disagree = index.get(_DISAGREE_TOKEN_TEXT, agree + 1)
    return agree, disagree


def cycle_spec(tokens: Sequence[bytes], *, seed: int, agreement: float) -> CycleSpec:
    """The cycle of a vocabulary and which codes the drafter gets right.

    Cycle tokens are ordinary lowercase words (never a control or end-of-turn token, which would
    stop generation), spread over the vocabulary; a vocabulary without enough of them (test
    tokenizers) uses ids from its middle. ``round(agreement * CYCLE_LEN)`` codes agree: a prefix
    of one seeded permutation, so a higher agreement agrees on a superset of codes.
    """
    if not 0.0 <= agreement <= 1.0:
        raise ValueError(f"agreement must be within 0..1, got {agreement}")
    words = [i for i, text in enumerate(tokens) if _CYCLE_WORD.match(text)]
    if len(words) >= CYCLE_LEN * 4:
        stride = len(words) // CYCLE_LEN
        cycle = tuple(words[i * stride] for i in range(CYCLE_LEN))
    elif len(tokens) >= 2 * CYCLE_LEN + 8:
        middle = len(tokens) // 2
        cycle = tuple(range(middle, middle + CYCLE_LEN))
    else:
        raise ValueError(f"a vocabulary of {len(tokens)} tokens is too small for a cycle pair")
    order = np.random.default_rng([seed, 0xC7C1E]).permutation(CYCLE_LEN)
    agreeing = frozenset(int(code) for code in order[: round(agreement * CYCLE_LEN)])
    return CycleSpec(cycle, agreeing)


def _common_kvs(
    arch: str, name: str, s: Shape, pattern: Sequence[bool], n_head: int
) -> list[bytes]:
    u32, f32 = GGUFValueType.UINT32, GGUFValueType.FLOAT32
    return [
        _kv("general.architecture", GGUFValueType.STRING, arch),
        _kv("general.type", GGUFValueType.STRING, "model"),
        _kv("general.name", GGUFValueType.STRING, name),
        _kv("general.file_type", u32, _FILE_TYPE_MOSTLY_Q4_0),
        _kv("general.quantization_version", u32, 2),
        _kv(f"{arch}.context_length", u32, s.context_length),
        _kv(f"{arch}.block_count", u32, len(pattern)),
        _kv(f"{arch}.attention.head_count", u32, n_head),
        _kv_array(
            f"{arch}.attention.head_count_kv",
            GGUFValueType.UINT32,
            [s.n_head_kv_swa if swa else s.n_head_kv_full for swa in pattern],
        ),
        _kv(f"{arch}.attention.key_length", u32, s.head_dim_full),
        _kv(f"{arch}.attention.value_length", u32, s.head_dim_full),
        _kv(f"{arch}.attention.key_length_swa", u32, s.head_dim_swa),
        _kv(f"{arch}.attention.value_length_swa", u32, s.head_dim_swa),
        _kv(f"{arch}.rope.dimension_count", u32, s.head_dim_full),
        _kv(f"{arch}.rope.dimension_count_swa", u32, s.head_dim_swa),
        _kv(f"{arch}.rope.freq_base", f32, 1_000_000.0),
        _kv(f"{arch}.rope.freq_base_swa", f32, 10_000.0),
        _kv(f"{arch}.attention.layer_norm_rms_epsilon", f32, 1e-6),
        _kv(f"{arch}.attention.sliding_window", u32, s.sliding_window),
        _kv_array(f"{arch}.attention.sliding_window_pattern", GGUFValueType.BOOL, list(pattern)),
    ]


def _target_kvs(shape: ShapeName, s: Shape) -> list[bytes]:
    a, u32 = TARGET_ARCH, GGUFValueType.UINT32
    return [
        *_common_kvs(a, f"gemma4-synthetic-{shape}-target", s, s.swa_pattern, s.n_head),
        _kv(f"{a}.embedding_length", u32, s.n_embd),
        _kv(f"{a}.feed_forward_length", u32, s.n_ff),
        _kv(f"{a}.embedding_length_per_layer_input", u32, 0),  # required; 0 = no PLE
        _kv(f"{a}.attention.shared_kv_layers", u32, s.shared_kv_layers),
    ]


def _assistant_kvs(shape: ShapeName, s: Shape, n_embd_out: int) -> list[bytes]:
    a, u32 = ASSISTANT_ARCH, GGUFValueType.UINT32
    name = f"gemma4-synthetic-{shape}-assistant"
    return [
        *_common_kvs(a, name, s, s.asst_swa_pattern, s.asst_n_head),
        _kv(f"{a}.embedding_length", u32, s.asst_n_embd),
        _kv(f"{a}.embedding_length_out", u32, n_embd_out),  # the target's hidden size
        _kv(f"{a}.feed_forward_length", u32, s.asst_n_ff),
        _kv(f"{a}.nextn_predict_layers", u32, s.asst_n_layer),
    ]


# --------------------------------------------------------------------------- public API


def write_pair(
    out_dir: Path,
    *,
    tokenizer_from: Path,
    seed: int = 0,
    shape: ShapeName = "tiny",
    mismatched_drafter: bool = False,
    drafter_agrees: bool = True,
    agreement: float | None = None,
) -> SyntheticPair:
    """Write ``gemma4-synthetic-<shape>-target.gguf`` and its assistant drafter into ``out_dir``.

    ``tokenizer_from`` is any GGUF whose ``tokenizer.*`` records are copied verbatim (the vocabulary
    size follows it; use a Gemma 3/4 GGUF). Same arguments give byte-identical files.

    ``mismatched_drafter`` writes ``...-assistant-mismatched.gguf`` whose ``embedding_length_out``
    (and projections) are 32 wider than the target's hidden size: a self-consistent file that
    llama.cpp refuses to pair with the target, for negative tests.

    ``drafter_agrees=False`` writes ``...-assistant-disagreeing.gguf``, a drafter that always
    proposes a different token than the target picks (acceptance 0, the reject path).

    ``agreement=p`` writes a cycle pair instead (see the module doc):
    ``...-cycle-target.gguf`` (the same for every p) and ``...-cycle-assistant-agree<100p>.gguf``,
    whose drafts are accepted with probability p per position.
    """
    if seed < 0:
        raise ValueError("seed must be >= 0")
    if agreement is not None and not drafter_agrees:
        raise ValueError("give either agreement or drafter_agrees=False, not both")
    s = shape_spec(shape)
    _check_shape(s)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok_records, tokens = _tokenizer_records(tokenizer_from)
    agree, disagree = _pick_tokens(tokens)
    cycle = None if agreement is None else cycle_spec(tokens, seed=seed, agreement=agreement)
    kind = "" if cycle is None else "-cycle"

    target = out_dir / f"gemma4-synthetic-{shape}{kind}-target.gguf"
    _write_gguf(
        target,
        [*_target_kvs(shape, s), *tok_records],
        _target_tensors(seed, s, len(tokens), agree, cycle),
    )

    n_embd_out = s.n_embd + (_QK4_0 if mismatched_drafter else 0)
    suffix = "".join(
        part
        for part, on in (
            (f"-agree{round(100 * (agreement or 0)):02d}", cycle is not None),
            ("-mismatched", mismatched_drafter),
            ("-disagreeing", not drafter_agrees),
        )
        if on
    )
    drafter = out_dir / f"gemma4-synthetic-{shape}{kind}-assistant{suffix}.gguf"
    favoured = agree if drafter_agrees else disagree
    _write_gguf(
        drafter,
        [*_assistant_kvs(shape, s, n_embd_out), *tok_records],
        _assistant_tensors(seed, s, len(tokens), favoured, n_embd_out, cycle),
    )
    return SyntheticPair(target=target, drafter=drafter, cycle=cycle)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: write a pair and print each path with its sha256."""
    parser = argparse.ArgumentParser(
        prog="python -m gemma4_fleet.synthetic",
        description="Write a deterministic synthetic Gemma 4 target + MTP assistant GGUF pair.",
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--tokenizer-from", type=Path, required=True, metavar="GGUF")
    parser.add_argument("--shape", choices=["tiny", "cpu", "12b"], default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mismatched", action="store_true", help="drafter with wrong n_embd_out")
    parser.add_argument(
        "--disagreeing", action="store_true", help="drafter that never matches the target"
    )
    parser.add_argument(
        "--agreement",
        type=float,
        metavar="P",
        help="a cycle pair whose drafter proposes the target's greedy token with probability P "
        "(0..1), e.g. 0.3, 0.6, 0.9",
    )
    args = parser.parse_args(argv)
    pair = write_pair(
        args.out_dir,
        tokenizer_from=args.tokenizer_from,
        seed=args.seed,
        shape=args.shape,
        mismatched_drafter=args.mismatched,
        drafter_agrees=not args.disagreeing,
        agreement=args.agreement,
    )
    if pair.cycle is not None:
        sys.stdout.write(f"agreement {pair.cycle.agreement:.4f} over {CYCLE_LEN} cycle tokens\n")
    for path in (pair.target, pair.drafter):
        sys.stdout.write(f"{path}  sha256={sha256_file(path)}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
