"""GGUF metadata: the real Gemma 3 270M file, read locally and over HTTP range requests."""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import gguf
import numpy as np
import pytest

from gemma4_fleet.gguf_meta import ModelMeta, ModelMetaError, read_meta, read_meta_url
from gemma4_fleet.testfleet.assets import GEMMA3_270M_SHA256

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def meta_270m(gemma3_270m: Path) -> ModelMeta:
    return read_meta(gemma3_270m)


def test_gemma3_270m_metadata(meta_270m: ModelMeta) -> None:
    m = meta_270m
    assert m.name == "Gemma 3 270m"
    assert m.architecture == "gemma3"
    assert m.block_count == 18
    assert m.context_length == 32768
    assert m.embedding_length == m.embedding_length_out == 640
    assert m.vocab_size == 262144
    assert m.head_count == (4,) * 18
    assert m.head_count_kv == (1,) * 18
    assert (m.key_length, m.value_length, m.key_length_swa, m.value_length_swa) == (256,) * 4
    assert m.sliding_window == 512
    # no sliding_window_pattern key: llama.cpp's gemma3 default period 6, every 6th layer full
    assert [il for il, swa in enumerate(m.swa_layers) if not swa] == [5, 11, 17]
    assert m.shared_kv_layers == 0
    assert len(m.tensor_bytes) == 236
    assert (
        m.tensor_bytes["token_embd.weight"] == 178257920
    )  # q8_0 [640, 262144]: 640 * 262144 / 32 * 34
    # the data section: file size 253113024 minus the 6525120-byte header (gguf.GGUFReader's
    # data_offset); llama-server logs "CPU_Mapped model buffer size = 235.16 MiB"
    assert m.total_tensor_bytes == 253113024 - 6525120
    assert round(m.total_tensor_bytes / 2**20, 2) == 235.16


# --- synthetic GGUFs for the gemma4 keys (written with the gguf package) ---------------------


def _write_gguf(path: Path, arch: str, n_layer: int = 6, **keys: object) -> Path:
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(f"tiny-{arch}")
    writer.add_block_count(n_layer)
    writer.add_context_length(131072)
    writer.add_embedding_length(64)
    writer.add_head_count(2)
    writer.add_token_list([f"t{i}" for i in range(300)])
    for name, value in keys.items():
        getattr(writer, f"add_{name}")(value)
    writer.add_tensor("token_embd.weight", np.zeros((300, 64), dtype=np.float16))
    writer.add_tensor("output_norm.weight", np.zeros(64, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


_SWA = [True, True, False, True, True, False]


def test_gemma4_per_layer_keys(tmp_path: Path) -> None:
    path = _write_gguf(
        tmp_path / "g4.gguf",
        "gemma4",
        head_count_kv=[4, 4, 1, 4, 4, 1],
        key_length=128,
        value_length=128,
        key_length_swa=64,
        value_length_swa=64,
        sliding_window=512,
        sliding_window_pattern=_SWA,
        shared_kv_layers=2,
    )
    m = read_meta(path)
    assert m.architecture == "gemma4"
    assert m.head_count == (2,) * 6
    assert m.head_count_kv == (4, 4, 1, 4, 4, 1)
    assert (m.key_length, m.value_length, m.key_length_swa, m.value_length_swa) == (
        128,
        128,
        64,
        64,
    )
    assert m.swa_layers == tuple(_SWA)
    assert m.sliding_window == 512
    assert m.shared_kv_layers == 2
    assert m.embedding_length_out == 64
    assert m.vocab_size == 300
    assert m.tensor_bytes == {"token_embd.weight": 300 * 64 * 2, "output_norm.weight": 64 * 4}


def test_gemma4_assistant_embedding_length_out(tmp_path: Path) -> None:
    path = _write_gguf(
        tmp_path / "a.gguf",
        "gemma4-assistant",
        n_layer=4,
        sliding_window=512,
        sliding_window_pattern=[True, True, True, False],
        embedding_length_out=2560,
    )
    m = read_meta(path)
    assert (m.embedding_length, m.embedding_length_out) == (64, 2560)
    # defaults: head_count_kv = head_count, head dims = n_embd / n_head, SWA dims = full dims
    assert m.head_count_kv == (2,) * 4
    assert (m.key_length, m.key_length_swa) == (32, 32)


def test_gemma3_scalar_pattern(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "g3.gguf", "gemma3", sliding_window=512, sliding_window_pattern=3)
    assert read_meta(path).swa_layers == (True, True, False, True, True, False)


def test_gemma3_without_sliding_window_has_no_swa(tmp_path: Path) -> None:
    assert read_meta(_write_gguf(tmp_path / "g3.gguf", "gemma3")).swa_layers == (False,) * 6


@pytest.mark.parametrize(
    ("arch", "keys", "message"),
    [
        ("llama", {}, "unknown architecture 'llama'"),
        (
            "gemma4",
            {"sliding_window": 512},
            "key not found in the GGUF header: gemma4.attention.sliding_window_pattern",
        ),
        (
            "gemma4",
            {"sliding_window": 512, "sliding_window_pattern": _SWA, "head_count_kv": [1, 2]},
            "gemma4.attention.head_count_kv has wrong array length; expected 6, got 2",
        ),
    ],
)
def test_bad_metadata(tmp_path: Path, arch: str, keys: dict[str, object], message: str) -> None:
    with pytest.raises(ModelMetaError, match=re.escape(message)):
        read_meta(_write_gguf(tmp_path / "bad.gguf", arch, **keys))


def test_local_truncated_and_not_gguf(tmp_path: Path, gemma3_270m: Path) -> None:
    truncated = tmp_path / "truncated.gguf"
    with gemma3_270m.open("rb") as fh:
        truncated.write_bytes(fh.read(100_000))
    with pytest.raises(ModelMetaError, match="truncated GGUF header: the file has 100000 bytes"):
        read_meta(truncated)
    text = tmp_path / "readme.gguf"
    text.write_text("hello, world\n" * 100)
    with pytest.raises(ModelMetaError, match="not a GGUF file"):
        read_meta(text)
    with pytest.raises(ModelMetaError, match="cannot read"):
        read_meta(tmp_path / "missing.gguf")


# --- HTTP range requests ---------------------------------------------------------------------


class _FileServer(ThreadingHTTPServer):
    """Serves files under root; /norange/NAME ignores Range like a server without support."""

    def __init__(self, root: Path) -> None:
        super().__init__(("127.0.0.1", 0), _RangeHandler)
        self.root = root
        self.bytes_sent = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _RangeHandler(BaseHTTPRequestHandler):
    server: _FileServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        name = self.path.lstrip("/")
        ranges = not name.startswith("norange/")
        path = self.server.root / name.removeprefix("norange/")
        if not path.is_file():
            self.send_error(404)
            return
        size = path.stat().st_size
        match = re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("Range", ""))
        if not ranges or match is None:
            self._send(200, path.read_bytes(), {})
            return
        start, end = int(match[1]), min(int(match[2]), size - 1)
        if start >= size:
            self._send(416, b"", {"Content-Range": f"bytes */{size}"})
            return
        with path.open("rb") as fh:
            fh.seek(start)
            body = fh.read(end - start + 1)
        self._send(206, body, {"Content-Range": f"bytes {start}-{end}/{size}"})

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        # Counted before the write: the client may read the last byte and check the count
        # before this thread runs again.
        self.server.bytes_sent += len(body)
        self.wfile.write(body)


@pytest.fixture
def http_root(tmp_path: Path, gemma3_270m: Path) -> Iterator[tuple[_FileServer, Path]]:
    root = tmp_path / "www"
    root.mkdir()
    (root / gemma3_270m.name).symlink_to(gemma3_270m)
    server = _FileServer(root)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, root
    server.shutdown()
    server.server_close()
    thread.join()


def test_range_read_matches_local_and_is_cached(
    http_root: tuple[_FileServer, Path], gemma3_270m: Path, meta_270m: ModelMeta, tmp_path: Path
) -> None:
    server, _ = http_root
    cache = tmp_path / "cache"
    url = f"{server.base_url}/{gemma3_270m.name}"
    remote = read_meta_url(url, sha256=GEMMA3_270M_SHA256, cache_dir=cache)
    assert remote == meta_270m
    file_size = gemma3_270m.stat().st_size
    # the header is ~6.5 MB (tokenizer) of a 253 MB file; doubling reads fetch at most 2x it
    assert 6_525_120 < server.bytes_sent < 16 << 20
    assert server.bytes_sent < file_size / 15
    assert len(list(cache.glob(f"{GEMMA3_270M_SHA256}-*.json"))) == 1

    sent = server.bytes_sent
    again = read_meta_url(url, sha256=GEMMA3_270M_SHA256, size=file_size, cache_dir=cache)
    assert again == meta_270m
    assert server.bytes_sent - sent == 8  # the URL was asked (its size), the header was cached


def test_cache_is_keyed_by_source_and_never_stands_in_for_a_dead_url(
    http_root: tuple[_FileServer, Path], gemma3_270m: Path, meta_270m: ModelMeta, tmp_path: Path
) -> None:
    server, root = http_root
    cache = tmp_path / "cache"
    url = f"{server.base_url}/{gemma3_270m.name}"
    read_meta_url(url, sha256=GEMMA3_270M_SHA256, cache_dir=cache)
    # The same sha256 from another URL is read from that URL, not from the other's entry.
    (root / "copy.gguf").symlink_to(gemma3_270m)
    sent = server.bytes_sent
    copy = read_meta_url(f"{server.base_url}/copy.gguf", sha256=GEMMA3_270M_SHA256, cache_dir=cache)
    assert copy == meta_270m and server.bytes_sent - sent > 6_525_120
    assert len(list(cache.glob("*.json"))) == 2
    with pytest.raises(ModelMetaError, match=r"serves 253113024 bytes, but size says 1000"):
        read_meta_url(url, sha256=GEMMA3_270M_SHA256, size=1000, cache_dir=cache)
    # The URL goes away: an error that says the cache was not used, unless offline on purpose.
    (root / gemma3_270m.name).unlink()
    with pytest.raises(ModelMetaError, match=r"HTTP 404.*cached metadata is not used"):
        read_meta_url(url, sha256=GEMMA3_270M_SHA256, cache_dir=cache)
    offline = read_meta_url(url, sha256=GEMMA3_270M_SHA256, cache_dir=cache, offline=True)
    assert offline == meta_270m
    with pytest.raises(ModelMetaError, match="G4F_OFFLINE=1 and no cached metadata"):
        read_meta_url(f"{server.base_url}/x.gguf", sha256=_SHA, cache_dir=cache, offline=True)


_SHA = "0" * 64


def test_range_errors(
    http_root: tuple[_FileServer, Path], gemma3_270m: Path, tmp_path: Path
) -> None:
    server, root = http_root
    with gemma3_270m.open("rb") as fh:
        (root / "truncated.gguf").write_bytes(fh.read(3_000_000))
    (root / "page.html").write_text("<html>not a model</html>\n" * 1000)
    base = server.base_url

    with pytest.raises(ModelMetaError, match="truncated GGUF header: the file has 3000000 bytes"):
        read_meta_url(f"{base}/truncated.gguf", sha256=_SHA, cache_dir=tmp_path)
    with pytest.raises(ModelMetaError, match="not a GGUF file"):
        read_meta_url(f"{base}/page.html", sha256=_SHA, cache_dir=tmp_path)
    with pytest.raises(ModelMetaError, match="does not support HTTP range requests"):
        read_meta_url(f"{base}/norange/page.html", sha256=_SHA, cache_dir=tmp_path)
    with pytest.raises(ModelMetaError, match="HTTP 404"):
        read_meta_url(f"{base}/missing.gguf", sha256=_SHA, cache_dir=tmp_path)
    with pytest.raises(ModelMetaError, match="sha256 must be 64 lowercase hex digits"):
        read_meta_url(f"{base}/truncated.gguf", sha256="../x", cache_dir=tmp_path)
    assert not list(tmp_path.glob("*.json"))


def test_unreachable_url(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ModelMetaError, match="unreachable"):
        read_meta_url(f"http://127.0.0.1:{port}/m.gguf", sha256=_SHA, cache_dir=tmp_path)
