#!/usr/bin/env bash
# Prepare .carry/ for scripts/gpu_host_proof.sh, on a Debian machine with apt and PyPI access
# (root; scripts/setup.sh first). Everything the GPU machine (no network) needs:
#   rootfs/      the GPU host's root filesystem, xz in parts of <= 60 MiB
#   whl/         pyinfra and the other controller packages for the GPU machine's python3 (3.12)
#   llama.cpp-src.tar.xz, tok.gguf.xz, pairs.txt, pairs-sizes.json, gguf-meta/, code.tar.gz
#
#   usage: bash scripts/gpu_host_prepare.sh [CARRY_DIR]      (default .carry)
set -euo pipefail
cd "$(dirname "$0")/.."
C=$(realpath -m "${1:-.carry}")
PY=.venv/bin/python
mkdir -p "$C/whl" "$C/gguf-meta"
G4F_CACHE=${G4F_CACHE:-/var/cache/gemma4-fleet}

$PY -m gemma4_fleet.testfleet.gpuhost build "$C/rootfs"

# The controller's packages that the GPU machine's image lacks (no deps: the image has the rest).
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_26_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64 \
    -d "$C/whl" pyinfra==3.10.0 gevent==26.9.0 greenlet==3.5.6 zope.event==6.2 \
    zope.interface==8.7 typeguard==4.6.1 distro==1.9.0 paramiko==4.0.0 bcrypt==5.0.0 \
    cryptography==50.0.2 cffi==2.1.1 pycparser==3.12 PyNaCl==1.6.2 invoke==3.0.3 \
    pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
    gguf==0.19.0 typing_extensions==4.16.0

# llama.cpp (the tree vendored in llama-cpp-python 0.3.36) without what a CUDA build never reads.
SRC=$($PY -c 'from gemma4_fleet.testfleet.assets import llama_cpp_source as s; print(s())')
excludes=()
for d in models docs media .git .github tests examples gguf-py pocs benches; do
    excludes+=("--exclude=./$d")
done
for b in cann hexagon hip metal musa opencl openvino sycl virtgpu vulkan webgpu zdnn zendnn et; do
    excludes+=("--exclude=./ggml/src/ggml-$b")
done
tar -C "$SRC" "${excludes[@]}" -cf - . | xz -9 -T0 >"$C/llama.cpp-src.tar.xz"

# The synthetic pairs are generated on the GPU machine; their checksums, sizes and GGUF headers
# are known here (the generator is deterministic), so the deploy can plan before they exist.
GEN=$(mktemp -d)
$PY - "$C/tok.gguf" <<'PYEOF'
import struct, sys
from pathlib import Path
from gguf import GGUFValueType
from gemma4_fleet import synthetic as s
from gemma4_fleet.testfleet.assets import gemma3_270m_path
recs, _ = s._tokenizer_records(gemma3_270m_path())
kvs = [s._kv("general.architecture", GGUFValueType.STRING, "gemma3"),
       s._kv("general.name", GGUFValueType.STRING, "tokenizer-only (gemma-3-270m)"), *recs]
with open(sys.argv[1], "wb") as fh:
    fh.write(struct.pack("<IIQQ", 0x46554747, 3, 0, len(kvs)))
    for r in kvs:
        fh.write(r)
    s._write_padding(fh)
PYEOF
: >"$C/pairs.txt"
for shape in tiny 12b; do
    $PY -m gemma4_fleet.synthetic "$GEN/$shape" --tokenizer-from "$C/tok.gguf" --shape "$shape" \
        >>"$C/pairs.txt"
done
xz -9 -f "$C/tok.gguf"
$PY - "$C" <<'PYEOF'
import json, os, sys
from pathlib import Path
from gemma4_fleet.gguf_meta import read_meta
c = Path(sys.argv[1])
sizes = {}
for line in (c / "pairs.txt").read_text().splitlines():
    path, sha = line.split("  sha256=")
    sizes[os.path.basename(path)] = os.path.getsize(path)
    (c / "gguf-meta" / f"{sha.strip()}.json").write_text(read_meta(Path(path)).model_dump_json())
(c / "pairs-sizes.json").write_text(json.dumps(sizes, indent=1))
PYEOF
rm -rf "$GEN"

git ls-files -z | tar --null -T - -czf "$C/code.tar.gz"
du -sh "$C"/* | sort -h
