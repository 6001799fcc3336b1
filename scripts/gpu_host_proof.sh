#!/usr/bin/env bash
# The full deploy on a real GPU host under systemd (docs/gpu-proof.md), on a GPU machine as root.
#
# Prepared on a Debian machine (scripts/gpu_host_prepare.sh) into .carry/:
#   rootfs/rootfs.tar.xz.NN   the GPU host's root filesystem (gemma4_fleet.testfleet.gpuhost build)
#   whl/*.whl                 pyinfra, paramiko, pydantic, gguf, ... for the machine's python3
#   llama.cpp-src.tar.xz      the llama.cpp tree the host builds (served as a git mirror)
#   tok.gguf.xz, pairs.txt, pairs-sizes.json, gguf-meta/   the synthetic pairs' tokenizer and checksums
#   debs/*.deb                (optional) packages installed in the host before the deploy
#   code.tar.gz               (optional) the project tree to run instead of this checkout
#
#   usage: OUT=DIR bash scripts/gpu_host_proof.sh [--tune]   (results in DIR, work in /tmp/g4fh)
#   --tune: issue 14 (docs/tuning.md): the 12B cycle pair at agreement 0.6, ctx 131072, deploy +
#   gemma4-fleet tune + deploy of the profile, with a 24 GB budget and on the full GPU
set -uo pipefail
: "${OUT:?OUT must name the output folder}"
REPO=$(pwd)
C=${G4F_CARRY:-$REPO/.carry}
W=${G4F_WORK:-/tmp/g4fh}
mkdir -p "$W" "$OUT"
t=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$W/site" "$C"/whl/*.whl > "$W/pip.log" 2>&1 || { cat "$W/pip.log"; exit 2; }
echo "pip install: $(($(date +%s) - t)) s"
CODE=$REPO
if [ -f "$C/code.tar.gz" ]; then
    CODE=$W/code
    rm -rf "$CODE" && mkdir -p "$CODE" && tar -C "$CODE" -xzf "$C/code.tar.gz" || exit 3
fi
mkdir -p "$W/cache/gguf-meta" && cp "$C"/gguf-meta/*.json "$W/cache/gguf-meta/"
export PYTHONPATH=$W/site:$CODE PYTHONUNBUFFERED=1 G4F_CACHE=$W/cache
cd "$CODE" || exit 3
python3 scripts/gpu_host_proof.py --carry "$C" --work "$W" --out "$OUT" "$@"
rc=$?
cp "$W/results.json" "$OUT/" 2>/dev/null
[ -f "$W/summary.md" ] && cp "$W/summary.md" "$OUT/"
tar -C "$W" -czf "$OUT/logs.tar.gz" logs results.json nvidia-smi-query-gpu.csv \
    nvidia-smi-query-gpu-inside.csv host/console.log out tuned 2>/dev/null
[ -d "$CODE/out" ] && tar -C "$CODE" -czf "$OUT/smoke-reports.tar.gz" out
exit $rc
