"""GGUF model metadata for planning: read from a local file or, by HTTP range requests, from a URL.

Only the GGUF header is read (magic, version, tensor count, KV count, the KVs, the tensor infos),
never the tensor data.  Key names come from the ``gguf`` package (the llama.cpp gguf-py constants);
their semantics follow llama.cpp ``src/llama-model.cpp`` (``load_hparams``) and ``src/models/``:

* ``head_count`` / ``head_count_kv`` may be a scalar or a per-layer array (``get_key_or_arr``),
  ``head_count_kv`` defaults to ``head_count``;
* ``key_length`` / ``value_length`` default to ``embedding_length / head_count[0]``, the SWA
  variants default to the full ones;
* gemma3: SWA only when ``sliding_window`` is present and > 0; the per-layer pattern is the
  ``sliding_window_pattern`` bool array if present, else the period N (scalar key, default 6) with
  layer ``il`` SWA iff ``il % N < N - 1`` (``llama_hparams::set_swa_pattern``);
* gemma4 / gemma4-assistant: ``sliding_window`` and the ``sliding_window_pattern`` bool array are
  required; ``shared_kv_layers`` (default 0) is read for both (gemma4: the last ones reuse earlier
  layers' KV; the assistant shares all of its KV with the target anyway).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import requests
from pydantic import BaseModel, ConfigDict, ValidationError

if TYPE_CHECKING:
    from gguf import GGUFValueType
# `gguf` (and numpy with it, ~0.15 s) is imported where a header is parsed: most runs read
# every header from the cache and never need it.

ARCHITECTURES = ("gemma3", "gemma4", "gemma4-assistant")

# First read; doubled until the header parses (a Gemma tokenizer alone is ~6 MB of header).
_FIRST_READ = 1 << 20
# Arrays longer than this (token lists, scores, types) are skipped; only their length is kept.
_MAX_KEPT_ARRAY = 4096
_HTTP_TIMEOUT_S = 30.0
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")


class ModelMetaError(ValueError):
    """The model's metadata could not be read or is not usable for planning."""


class ModelMeta(BaseModel):
    """What planning needs from a GGUF: attention geometry, sizes and per-tensor bytes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    architecture: str
    block_count: int
    context_length: int
    embedding_length: int
    embedding_length_out: int  # llama.cpp n_embd_out(): defaults to embedding_length
    vocab_size: int
    head_count: tuple[int, ...]  # per layer
    head_count_kv: tuple[int, ...]  # per layer
    key_length: int
    value_length: int
    key_length_swa: int
    value_length_swa: int
    sliding_window: int  # n_swa, 0 = no SWA
    swa_layers: tuple[bool, ...]  # per layer, True = SWA
    shared_kv_layers: int
    # tokenizer.chat_template is present: llama-server uses it for /v1/chat/completions.
    # No default: header caches written before this field existed are read again.
    has_chat_template: bool
    tensor_bytes: dict[str, int]

    @property
    def total_tensor_bytes(self) -> int:
        return sum(self.tensor_bytes.values())


def read_meta(path: Path) -> ModelMeta:
    """Metadata of a local GGUF file (reads the header only)."""
    try:
        with path.open("rb") as fh:
            size = path.stat().st_size
            header = _read_header(lambda start, end: _read_file(fh, start, end, size), str(path))
    except OSError as exc:
        raise ModelMetaError(f"{path}: cannot read: {exc}") from exc
    return _build_meta(header, default_name=path.name)


OFFLINE_ENV = "G4F_OFFLINE"


def read_meta_url(
    url: str,
    *,
    sha256: str | None,
    cache_dir: Path,
    size: int | None = None,
    offline: bool | None = None,
) -> ModelMeta:
    """Metadata of a GGUF served over HTTP(S), fetched with range requests.

    The cache is keyed by content and source: sha256, URL and the file size the URL serves.
    The URL is always asked first (one 8-byte range request): an entry is used only when the
    URL answers with the same size, and a URL that does not answer is an error, not a plan from
    an old entry. With `offline` (default: the environment variable G4F_OFFLINE=1) the URL is
    not asked and the entry must exist. sha256 None (a checksum not filled in yet): read the
    header every time, cache nothing.
    """
    if sha256 is None:
        with requests.Session() as session:
            header = _read_header(lambda start, end: _http_range(session, url, start, end), url)
        return _build_meta(header, default_name=url.rsplit("/", 1)[-1])
    if not _SHA256.fullmatch(sha256):
        raise ModelMetaError(f"{url}: sha256 must be 64 lowercase hex digits, got {sha256!r}")
    if offline is None:
        offline = os.environ.get(OFFLINE_ENV, "") == "1"
    source = hashlib.sha256(json.dumps([sha256, url]).encode()).hexdigest()[:16]
    cached = cache_dir / f"{sha256}-{source}.json"
    entry = _cache_entry(cached, url, sha256)
    if offline:
        if entry is None:
            raise ModelMetaError(f"{url}: {OFFLINE_ENV}=1 and no cached metadata for this URL")
        _check_size(url, entry[1], size)
        return entry[0]
    with requests.Session() as session:
        try:
            _, total = _http_range(session, url, 0, 8)
        except ModelMetaError as exc:
            if entry is not None:
                raise ModelMetaError(
                    f"{exc} (its cached metadata is not used while the URL does not answer; "
                    f"{OFFLINE_ENV}=1 plans from the cache)"
                ) from None
            raise
        _check_size(url, total, size)
        if entry is not None and entry[1] == total:
            return entry[0]
        header = _read_header(lambda start, end: _http_range(session, url, start, end), url)
    meta = _build_meta(header, default_name=url.rsplit("/", 1)[-1])
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".tmp")
    record = {"url": url, "sha256": sha256, "size": total, "meta": meta.model_dump(mode="json")}
    tmp.write_text(json.dumps(record))
    tmp.replace(cached)
    return meta


def _cache_entry(path: Path, url: str, sha256: str) -> tuple[ModelMeta, int] | None:
    """(metadata, file size) of a cache entry written for exactly this url and sha256."""
    try:
        record = json.loads(path.read_text())
        if record["url"] != url or record["sha256"] != sha256:
            return None
        return ModelMeta.model_validate(record["meta"]), int(record["size"])
    except (OSError, ValueError, KeyError, TypeError, ValidationError):
        return None  # absent, unreadable or of an older format: read the URL again


def _check_size(url: str, total: int, size: int | None) -> None:
    if size is not None and total != size:
        raise ModelMetaError(f"{url}: serves {total} bytes, but size says {size}")


# --- reading the header ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Array:
    length: int
    values: tuple[int | float | bool | str, ...] | None  # None when longer than _MAX_KEPT_ARRAY


_Value = int | float | bool | str | _Array


@dataclass(frozen=True)
class _Tensor:
    name: str
    dims: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class _Header:
    kv: dict[str, _Value]
    tensors: tuple[_Tensor, ...]


# [start, end) -> (bytes read, total file size)
_Fetch = Callable[[int, int], tuple[bytes, int]]


@functools.cache
def _scalar_formats() -> dict[GGUFValueType, str]:
    from gguf import GGUFValueType

    return {
        GGUFValueType.UINT8: "<B",
        GGUFValueType.INT8: "<b",
        GGUFValueType.UINT16: "<H",
        GGUFValueType.INT16: "<h",
        GGUFValueType.UINT32: "<I",
        GGUFValueType.INT32: "<i",
        GGUFValueType.FLOAT32: "<f",
        GGUFValueType.BOOL: "<?",
        GGUFValueType.UINT64: "<Q",
        GGUFValueType.INT64: "<q",
        GGUFValueType.FLOAT64: "<d",
    }


class _Truncated(Exception):
    def __init__(self, needed: int) -> None:
        super().__init__(needed)
        self.needed = needed


class _Corrupt(Exception):
    pass


def _read_header(fetch: _Fetch, source: str) -> _Header:
    """Read a growing prefix of the file until the header parses."""
    buf = bytearray()
    end = _FIRST_READ
    while True:
        data, total = fetch(len(buf), end)
        buf += data
        try:
            return _parse_header(buf)
        except _Truncated as exc:
            if len(buf) >= total:
                raise ModelMetaError(
                    f"{source}: truncated GGUF header: the file has {total} bytes, "
                    f"the header needs at least {exc.needed}"
                ) from None
            end = min(total, max(exc.needed, 2 * len(buf)))
        except _Corrupt as exc:
            raise ModelMetaError(f"{source}: {exc}") from None


def _read_file(fh: BinaryIO, start: int, end: int, size: int) -> tuple[bytes, int]:
    fh.seek(start)
    return fh.read(end - start), size


def _http_range(session: requests.Session, url: str, start: int, end: int) -> tuple[bytes, int]:
    headers = {"Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity"}
    try:
        resp = session.get(url, headers=headers, timeout=_HTTP_TIMEOUT_S, stream=True)
    except requests.RequestException as exc:
        raise ModelMetaError(f"{url}: unreachable: {exc}") from exc
    with resp:
        if resp.status_code == 200:
            raise ModelMetaError(
                f"{url}: the server does not support HTTP range requests (it answered 200 "
                "to a Range request); not downloading the whole model to read its header"
            )
        if resp.status_code == 416:
            raise ModelMetaError(f"{url}: truncated GGUF header: the file is shorter than {end}")
        if resp.status_code != 206:
            raise ModelMetaError(f"{url}: HTTP {resp.status_code} {resp.reason}")
        match = _CONTENT_RANGE.fullmatch(resp.headers.get("Content-Range", "").strip())
        if match is None or int(match[1]) != start:
            raise ModelMetaError(
                f"{url}: unusable Content-Range {resp.headers.get('Content-Range')!r} "
                f"for bytes {start}-{end - 1}"
            )
        try:
            data = resp.content
        except requests.RequestException as exc:
            raise ModelMetaError(f"{url}: unreachable: {exc}") from exc
    if len(data) != int(match[2]) - start + 1:
        raise ModelMetaError(f"{url}: short read: got {len(data)} bytes for {match[0]}")
    return data, int(match[3])


class _Cursor:
    def __init__(self, buf: bytearray) -> None:
        self.buf = buf
        self.pos = 0

    def skip(self, n: int) -> int:
        start = self.pos
        if start + n > len(self.buf):
            raise _Truncated(start + n)
        self.pos = start + n
        return start

    def scalar(self, fmt: str) -> int | float | bool:
        value: int | float | bool = struct.unpack_from(
            fmt, self.buf, self.skip(struct.calcsize(fmt))
        )[0]
        return value

    def uint(self, fmt: str) -> int:
        return int(self.scalar(fmt))

    def string(self) -> str:
        n = self.uint("<Q")
        start = self.skip(n)
        return self.buf[start : start + n].decode("utf-8", errors="replace")

    def value_type(self) -> GGUFValueType:
        from gguf import GGUFValueType

        raw = self.uint("<I")
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise _Corrupt(f"corrupt GGUF header: unknown value type {raw}") from None

    def value(self, vtype: GGUFValueType) -> _Value:
        from gguf import GGUFValueType

        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype != GGUFValueType.ARRAY:
            return self.scalar(_scalar_formats()[vtype])
        etype = self.value_type()
        length = self.uint("<Q")
        if length <= _MAX_KEPT_ARRAY:
            items: list[int | float | bool | str] = []
            for _ in range(length):
                item = self.value(etype)
                if isinstance(item, _Array):
                    raise _Corrupt("corrupt GGUF header: nested arrays")
                items.append(item)
            return _Array(length, tuple(items))
        if etype == GGUFValueType.STRING:
            for _ in range(length):
                self.skip(self.uint("<Q"))
        elif etype == GGUFValueType.ARRAY:
            raise _Corrupt("corrupt GGUF header: nested arrays")
        else:
            self.skip(length * struct.calcsize(_scalar_formats()[etype]))
        return _Array(length, None)


def _parse_header(buf: bytearray) -> _Header:
    from gguf import GGML_QUANT_SIZES, GGUF_MAGIC, GGMLQuantizationType

    cur = _Cursor(buf)
    if cur.uint("<I") != GGUF_MAGIC:
        raise _Corrupt(f"not a GGUF file (magic {bytes(buf[:4])!r}, expected b'GGUF')")
    version = cur.uint("<I")
    if version not in (2, 3):
        raise _Corrupt(f"unsupported GGUF version {version}")
    n_tensors = cur.uint("<Q")
    n_kv = cur.uint("<Q")
    kv: dict[str, _Value] = {}
    for _ in range(n_kv):
        key = cur.string()
        kv[key] = cur.value(cur.value_type())
    tensors = []
    for _ in range(n_tensors):
        name = cur.string()
        dims = tuple(cur.uint("<Q") for _ in range(cur.uint("<I")))
        raw_type = cur.uint("<I")
        cur.skip(8)  # data offset
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(raw_type)]
        except (ValueError, KeyError):
            raise _Corrupt(f"tensor {name}: unknown ggml type {raw_type}") from None
        n_elements = 1
        for dim in dims:
            n_elements *= dim
        tensors.append(_Tensor(name, dims, n_elements // block * type_size))
    return _Header(kv, tuple(tensors))


# --- interpreting the KVs --------------------------------------------------------------------


def _build_meta(header: _Header, *, default_name: str) -> ModelMeta:
    from gguf import Keys

    kv = header.kv
    arch = kv.get(Keys.General.ARCHITECTURE)
    name = kv.get(Keys.General.NAME)
    name = name if isinstance(name, str) and name else default_name
    if not isinstance(arch, str):
        raise ModelMetaError(f"{name}: no {Keys.General.ARCHITECTURE} in the GGUF header")
    if arch not in ARCHITECTURES:
        raise ModelMetaError(
            f"{name}: unknown architecture {arch!r} (supported: {', '.join(ARCHITECTURES)})"
        )
    keys = _Keys(kv, arch, name)

    n_layer = keys.integer(Keys.LLM.BLOCK_COUNT)
    n_embd = keys.integer(Keys.LLM.EMBEDDING_LENGTH)
    head_count = keys.per_layer(Keys.Attention.HEAD_COUNT, n_layer, None)
    head_count_kv = keys.per_layer(Keys.Attention.HEAD_COUNT_KV, n_layer, head_count)
    if head_count[0] == 0:
        raise ModelMetaError(f"{name}: head_count of layer 0 is 0")
    key_length = keys.integer(Keys.Attention.KEY_LENGTH, n_embd // head_count[0])
    value_length = keys.integer(Keys.Attention.VALUE_LENGTH, n_embd // head_count[0])

    tokens = kv.get(Keys.Tokenizer.LIST)
    embd = next((t for t in header.tensors if t.name == "token_embd.weight"), None)
    if isinstance(tokens, _Array):
        vocab_size = tokens.length
    elif embd is not None and len(embd.dims) == 2:
        vocab_size = embd.dims[1]
    else:
        raise ModelMetaError(f"{name}: no {Keys.Tokenizer.LIST} and no token_embd.weight")

    if arch == "gemma3":
        n_swa = keys.integer(Keys.Attention.SLIDING_WINDOW, 0)
        swa_layers = _gemma3_swa_layers(keys, n_layer, n_swa)
        shared_kv_layers = 0
    else:
        n_swa = keys.integer(Keys.Attention.SLIDING_WINDOW)
        swa_layers = keys.bool_array(Keys.Attention.SLIDING_WINDOW_PATTERN, n_layer)
        shared_kv_layers = keys.integer(Keys.Attention.SHARED_KV_LAYERS, 0)
        if shared_kv_layers > n_layer:
            raise ModelMetaError(f"{name}: shared_kv_layers {shared_kv_layers} > {n_layer} layers")

    return ModelMeta(
        name=name,
        architecture=arch,
        block_count=n_layer,
        context_length=keys.integer(Keys.LLM.CONTEXT_LENGTH),
        embedding_length=n_embd,
        embedding_length_out=keys.integer(Keys.LLM.EMBEDDING_LENGTH_OUT, n_embd),
        vocab_size=vocab_size,
        head_count=head_count,
        head_count_kv=head_count_kv,
        key_length=key_length,
        value_length=value_length,
        key_length_swa=keys.integer(Keys.Attention.KEY_LENGTH_SWA, key_length),
        value_length_swa=keys.integer(Keys.Attention.VALUE_LENGTH_SWA, value_length),
        sliding_window=n_swa,
        swa_layers=swa_layers,
        shared_kv_layers=shared_kv_layers,
        has_chat_template=bool(kv.get(Keys.Tokenizer.CHAT_TEMPLATE)),
        tensor_bytes={t.name: t.nbytes for t in header.tensors},
    )


def _gemma3_swa_layers(keys: _Keys, n_layer: int, n_swa: int) -> tuple[bool, ...]:
    """llama_model_gemma3::load_arch_hparams -> load_swa_pattern(ml, 6) -> set_swa_pattern."""
    from gguf import Keys

    if n_swa == 0:
        return (False,) * n_layer
    pattern_key = Keys.Attention.SLIDING_WINDOW_PATTERN
    if isinstance(keys.kv.get(keys.key(pattern_key)), _Array):
        return keys.bool_array(pattern_key, n_layer)
    period = keys.integer(pattern_key, 6)
    n_trunk = n_layer - keys.integer(Keys.LLM.NEXTN_PREDICT_LAYERS, 0)
    return tuple(
        il < n_trunk and (period == 0 or il % period < period - 1) for il in range(n_layer)
    )


class _Keys:
    """Typed access to ``{arch}.*`` keys, with llama.cpp's defaults and error messages."""

    def __init__(self, kv: dict[str, _Value], arch: str, name: str) -> None:
        self.kv = kv
        self.arch = arch
        self.name = name

    def key(self, template: str) -> str:
        return template.format(arch=self.arch)

    def _missing(self, key: str) -> ModelMetaError:
        return ModelMetaError(f"{self.name}: key not found in the GGUF header: {key}")

    def integer(self, template: str, default: int | None = None) -> int:
        key = self.key(template)
        value = self.kv.get(key)
        if value is None:
            if default is None:
                raise self._missing(key)
            return default
        if not isinstance(value, int) or isinstance(value, bool):
            raise ModelMetaError(f"{self.name}: {key} must be an integer, got {value!r}")
        return value

    def per_layer(
        self, template: str, n_layer: int, default: tuple[int, ...] | None
    ) -> tuple[int, ...]:
        """llama_model_loader::get_key_or_arr: a scalar for every layer or an array of n_layer."""
        key = self.key(template)
        value = self.kv.get(key)
        if not isinstance(value, _Array):
            if value is None and default is not None:
                return default
            return (self.integer(template),) * n_layer
        if value.length != n_layer or value.values is None:
            raise ModelMetaError(
                f"{self.name}: {key} has wrong array length; expected {n_layer}, got {value.length}"
            )
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in value.values):
            raise ModelMetaError(f"{self.name}: {key} must be an array of integers")
        return tuple(int(v) for v in value.values)

    def bool_array(self, template: str, n_layer: int) -> tuple[bool, ...]:
        """llama_model_loader::get_arr into a zeroed per-layer array: missing entries are False."""
        key = self.key(template)
        value = self.kv.get(key)
        if value is None:
            raise self._missing(key)
        if not isinstance(value, _Array) or value.values is None or value.length > n_layer:
            raise ModelMetaError(
                f"{self.name}: {key} must be an array of at most {n_layer} per-layer flags"
            )
        if not all(isinstance(v, int) for v in value.values):
            raise ModelMetaError(f"{self.name}: {key} must be an array of booleans")
        return tuple(bool(v) for v in value.values) + (False,) * (n_layer - value.length)
