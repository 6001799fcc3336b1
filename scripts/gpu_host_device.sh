#!/usr/bin/env bash
# Device-call wrapper (this workplace's GPU machine): stash what this call carried under
# /tmp/g4fh/carry (a later call on the same warm machine may carry only the rest), then run
# scripts/gpu_host_proof.sh detached and wait for it at most $WAIT seconds; results to $OUT.
#   bash .carry/device.sh [--smoke|--cpu|--tune]      WAIT=560 by default
# (copy this file to .carry/device.sh: the device call runs it from the carried folder;
# G4F_CARRY_SRC=.carry/NAME when the carried folder is another one under the checkout)
set -uo pipefail
W=/tmp/g4fh
mkdir -p "$W/carry" "$W/outdir"
cp -r "${G4F_CARRY_SRC:-.carry}/." "$W/carry/"
if [ ! -f "$W/carry/code.tar.gz" ] || [ ! -d "$W/carry/rootfs" ]; then
    echo "nothing to run yet: stashed $(ls "$W/carry")"; exit 0
fi
ls -la "$W/carry" "$W/carry/rootfs"
# RESUME=1: only wait for the run a previous call started.
if [ -z "${RESUME:-}" ]; then
    if [ -f "$W/proof.pid" ] && kill -0 "$(cat "$W/proof.pid")" 2>/dev/null; then
        echo "a run is still going (pid $(cat "$W/proof.pid")): use RESUME=1"; exit 1
    fi
    rm -f "$W/proof.rc" "$W/outdir"/*
    rm -rf "$W/src" && mkdir -p "$W/src" && tar -C "$W/src" -xzf "$W/carry/code.tar.gz"
    cd "$W/src" || exit 1
    OUT=$W/outdir G4F_CARRY=$W/carry setsid bash -c 'echo $$ >"$0/proof.pid";
            bash scripts/gpu_host_proof.sh "$@" >"$0/proof.log" 2>&1 </dev/null;
            echo $? >"$0/proof.rc"' "$W" "$@" </dev/null >/dev/null 2>&1 &
    cd - >/dev/null || exit 1
        sleep 1
fi
while [ ! -f "$W/proof.rc" ] && [ "$SECONDS" -lt "${WAIT:-560}" ]; do sleep 3; done
cp "$W/proof.log" "$OUT/" 2>/dev/null
cp "$W"/outdir/* "$OUT/" 2>/dev/null
[ -f "$W/results.json" ] && cp "$W/results.json" "$OUT/"
echo "rc: $(cat "$W/proof.rc" 2>/dev/null || echo still-running)"
tail -n 60 "$W/proof.log"
