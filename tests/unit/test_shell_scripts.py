"""The shipped shell scripts build.sh and place_model.sh, run here on temp directories.

build.sh builds a two-target CMake project laid out like llama.cpp's (bin/llama-server,
bin/llama-bench) with the real cmake and ninja; place_model.sh downloads with the real curl from
file:// URLs. The fleet tests run the same files on real hosts, with llama.cpp and an HTTP mirror.
unpack_build.sh is run in tests/unit/test_fleet_share.py.
"""

from __future__ import annotations

import hashlib
import subprocess
from importlib.resources import files as package_files
from pathlib import Path

import pytest

from gemma4_fleet.host_scripts.prune import MARKER

pytestmark = pytest.mark.unit
COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"
SCRIPTS = package_files("gemma4_fleet") / "host_scripts"

CMAKE_LISTS = """\
cmake_minimum_required(VERSION 3.13)
project(toy C)
set(CMAKE_RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/bin)
if(NOT TOY_OPTION STREQUAL "a*")
  message(FATAL_ERROR "TOY_OPTION is ${TOY_OPTION}")
endif()
add_executable(llama-server server.c)
add_executable(llama-bench bench.c)
"""
SERVER_C = """\
#include <stdio.h>
#include <string.h>
int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "--version") == 0) { puts("version: 1 (toy)"); return 0; }
    puts("--port N\\n--ctx-size N");
    return 0;
}
"""


def run(script: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(SCRIPTS / script), *args], capture_output=True, text=True, check=False, cwd=cwd
    )


def test_a_finished_build_is_renamed_into_place_and_a_failed_one_changes_nothing(
    tmp_path: Path,
) -> None:
    root = tmp_path / "opt l"  # the script quotes it; CMake and ninja take no `;` or `$`
    src = root / "src"
    src.mkdir(parents=True)
    (src / "CMakeLists.txt").write_text(CMAKE_LISTS)
    (src / "server.c").write_text(SERVER_C)
    (src / "bench.c").write_text("int main(void) { return 0; }\n")
    # The options are split into words but never globbed: here `a*` would match this file.
    (tmp_path / "-DTOY_OPTION=ab").touch()
    options = "-DCMAKE_BUILD_TYPE=Release -DTOY_OPTION=a*"

    done = run("build.sh", str(root), "id1", COMMIT, options, "2", "", MARKER, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    build = root / "builds" / "id1"
    assert (build / "bin" / "llama-bench").is_file() and (build / MARKER).is_file()
    assert (build / "VERSION").read_text() == "version: 1 (toy)\n"
    assert "--ctx-size N" in (build / "bin" / "llama-server.help").read_text()
    info = (build / "BUILD-INFO").read_text()
    assert info == f"commit={COMMIT}\nid=id1\noptions={options}\n"
    assert sorted(p.name for p in (root / "builds").iterdir()) == ["id1"]
    assert not (root / "build" / "id1").exists()  # the scratch folder is gone

    (src / "server.c").write_text("int main(void) { return }\n")
    failed = run("build.sh", str(root), "id2", COMMIT, options, "2", "", MARKER, cwd=tmp_path)
    assert failed.returncode == 1
    assert "server.c" in failed.stdout  # the tail of the compiler's log
    assert sorted(p.name for p in (root / "builds").iterdir()) == ["id1"]
    assert info == (build / "BUILD-INFO").read_text()


def test_a_download_resumes_and_only_a_verified_file_replaces_the_good_one(
    tmp_path: Path,
) -> None:
    good = bytes(range(256)) * 400
    sha = hashlib.sha256(good).hexdigest()
    dest = tmp_path / "models; $(id)" / "t.gguf"
    partial = Path(f"{dest}.partial")
    dest.parent.mkdir()
    # The first 40 % arrived before the cut. The mirror's copy of those bytes is garbage: only
    # a download that resumes (asks for the rest with a Range) ends with the right file.
    cut = len(good) * 4 // 10
    partial.write_bytes(good[:cut])
    mirror = tmp_path / "mirror t.gguf"
    mirror.write_bytes(b"x" * cut + good[cut:])
    url = mirror.as_uri()

    done = run("place_model.sh", str(dest), sha, str(len(good)), MARKER, url)
    assert done.returncode == 0, done.stderr
    assert dest.read_bytes() == good and not partial.exists()
    assert (dest.parent / MARKER).is_file()
    stamp = Path(f"{dest}.sha256").read_text().split()
    assert stamp[:2] == [sha, str(len(good))]

    # Unreachable: the good file stays; what arrived is kept for the next run.
    partial.write_bytes(good[:cut])
    gone = (tmp_path / "gone.gguf").as_uri()
    other = hashlib.sha256(b"other").hexdigest()
    stopped = run("place_model.sh", str(dest), other, "", MARKER, gone)
    assert stopped.returncode == 1
    assert f"download of {gone} stopped (curl exit 37) at {cut} bytes" in stopped.stderr
    assert dest.read_bytes() == good and partial.read_bytes() == good[:cut]

    # The wrong size or sha256: what arrived is deleted, the good file stays.
    wrong_size = run("place_model.sh", str(dest), other, str(len(good) + 1), MARKER)
    assert wrong_size.returncode == 1
    assert f"size mismatch for {dest}: got {cut} bytes, expected {len(good) + 1}" in (
        wrong_size.stderr
    )
    assert dest.read_bytes() == good and not partial.exists()
    partial.write_bytes(b"evil")
    wrong_sha = run("place_model.sh", str(dest), other, "", MARKER)
    assert wrong_sha.returncode == 1 and f"sha256 mismatch for {dest}" in wrong_sha.stderr
    assert dest.read_bytes() == good and not partial.exists()

    # Already in place: nothing is downloaded (the URL is unreachable) and a leftover is removed.
    partial.write_bytes(b"leftover")
    kept = run("place_model.sh", str(dest), sha, str(len(good)), MARKER, gone)
    assert kept.returncode == 0, kept.stderr
    assert dest.read_bytes() == good and not partial.exists()
