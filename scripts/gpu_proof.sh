#!/usr/bin/env bash
# GPU proof run for gemma4_fleet (see docs/gpu-proof.md): CUDA build of the pinned llama.cpp,
# the nvidia-smi GPU fact, VRAM planner vs measured, MTP throughput and the smoke check's GPU
# residency, all on one NVIDIA GPU.
#
# Runs on the device machine from the repository root, with the ignored folder .carry/ carried:
#   .carry/llama.cpp-src.tar.xz  llama.cpp 0c1e570 source (tools/ui included, no models/ docs/)
#   .carry/tok.gguf              tokenizer-only GGUF (tokenizer.* records of gemma-3-270m)
#   .carry/py/gguf               the pure-python gguf package (synthetic.py needs it)
# Everything goes to $G4F_WORK (default /tmp/g4f, kept while the machine stays warm); each stage
# leaves a marker and is skipped when re-run, so a second call right after a first one that ran
# out of time resumes (the build and the model generation run detached and survive the call).
# At the end the results are packed into $OUT/proof.tar.gz and a short summary is printed.
#
#   usage: OUT=/some/dir bash scripts/gpu_proof.sh      (G4F_BUDGET_S: seconds this call may use)
set -uo pipefail

: "${OUT:?OUT must name the output folder}"
REPO=$(pwd)
W=${G4F_WORK:-/tmp/g4f}
BUDGET=${G4F_BUDGET_S:-560}
T0=$(date +%s)
R=$W/results
M=$W/models
BIN=$W/build/bin
COMMIT=0c1e570
mkdir -p "$R" "$M"
export PYTHONPATH=$REPO/.carry/py:$REPO${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
[ -d /usr/local/cuda/bin ] && export PATH=/usr/local/cuda/bin:$PATH

left() { echo $((BUDGET - ($(date +%s) - T0))); }
say() { echo "[$(($(date +%s) - T0))s] $*" | tee -a "$R/driver.log"; }

SERVER_PIDS=()
pack() {
    for p in "${SERVER_PIDS[@]}"; do kill "$p" 2>/dev/null; done
    say "packing results ($(du -sh "$R" | cut -f1))"
    tar -C "$W" -czf "$OUT/proof.tar.gz" results
    [ -f "$R/summary.txt" ] && cp "$R/summary.txt" "$OUT/summary.txt"
}
trap pack EXIT

# ------------------------------------------------------------------ 0. environment + GPU fact
if [ ! -f "$R/env.done" ]; then
    {
        echo "date: $(date -u +%FT%TZ)"
        echo "uname: $(uname -a)"
        echo "nproc: $(nproc)"
        nvidia-smi
        nvcc --version | tail -n 2
        cmake --version | head -n 1
        ninja --version
        python3 -c 'import sys, numpy; print("python", sys.version.split()[0], "numpy", numpy.__version__)'
        python3 -c 'import pydantic; print("pydantic", pydantic.VERSION)' 2>&1 | tail -n 1
        python3 -c 'import gguf, os; print("gguf from", os.path.dirname(gguf.__file__))'
    } > "$R/env.txt" 2>&1
    # the exact query string the NvidiaGpus fact sends (facts.py imports pyinfra: read the source)
    QUERY=$(python3 -c "import re; print(re.search(r'NVIDIA_SMI_QUERY = \"([^\"]+)\"', open('gemma4_fleet/facts.py').read())[1])")
    echo "nvidia-smi --query-gpu=$QUERY --format=csv,noheader,nounits" > "$R/nvidia-smi-query-gpu.cmd"
    nvidia-smi --query-gpu="$QUERY" --format=csv,noheader,nounits > "$R/nvidia-smi-query-gpu.csv" 2>&1
    touch "$R/env.done"
fi
say "GPU fact: $(cat "$R/nvidia-smi-query-gpu.csv")"

# ------------------------------------------------------------------ 1. CUDA build (detached)
cat > "$W/build.sh" <<EOF
#!/usr/bin/env bash
set -o pipefail
export PATH=$PATH
cd "$W"
t0=\$(date +%s)
rm -rf src && mkdir src && tar -C src -xJf "$REPO/.carry/llama.cpp-src.tar.xz" || { echo 1 > build.rc; exit 1; }
t1=\$(date +%s)
cmake -S src -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DGGML_CUDA=ON \\
    -DCMAKE_CUDA_ARCHITECTURES=90 -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF \\
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_USE_PREBUILT_UI=OFF \\
    -DLLAMA_BUILD_COMMIT=$COMMIT -DLLAMA_BUILD_NUMBER=1 > "$R/build-configure.log" 2>&1 \\
    || { echo 2 > build.rc; exit 1; }
t2=\$(date +%s)
cmake --build build --target llama-server llama-bench -j16 > build-ninja.log 2>&1
rc=\$?
t3=\$(date +%s)
tail -n 40 build-ninja.log > "$R/build-ninja-tail.log"
grep -c '\.cu\.o' build-ninja.log > "$R/build-cuda-objects.txt"
printf 'untar_s=%s\nconfigure_s=%s\nbuild_s=%s\ntotal_s=%s\nrc=%s\n' \$((t1-t0)) \$((t2-t1)) \$((t3-t2)) \$((t3-t0)) \$rc > "$R/build-time.txt"
echo \$rc > build.rc
EOF
if [ -f "$W/build.rc" ]; then
    say "build already finished (rc $(cat "$W/build.rc"))"
elif [ -f "$W/build.pid" ] && kill -0 "$(cat "$W/build.pid")" 2>/dev/null; then
    say "build still running (pid $(cat "$W/build.pid"))"
else
    setsid bash "$W/build.sh" > "$W/build.out" 2>&1 < /dev/null &
    echo $! > "$W/build.pid"
    say "build started (pid $!)"
fi

# ------------------------------------------------------------------ 2. synthetic models (detached)
cat > "$W/gen.sh" <<EOF
#!/usr/bin/env bash
set -o pipefail
cd "$REPO"
export PYTHONPATH=$PYTHONPATH
t0=\$(date +%s)
python3 -m gemma4_fleet.synthetic "$M/12b" --shape 12b --tokenizer-from .carry/tok.gguf > "$R/gen-12b.txt" 2>&1 || { echo 1 > "$W/gen.rc"; exit 1; }
t1=\$(date +%s)
python3 -m gemma4_fleet.synthetic "$M/tiny" --shape tiny --tokenizer-from .carry/tok.gguf > "$R/gen-tiny.txt" 2>&1 || { echo 2 > "$W/gen.rc"; exit 1; }
mkdir -p "$R/headers"
for f in "$M"/12b/*.gguf "$M"/tiny/*.gguf; do
    head -c \$((8 << 20)) "\$f" > "$R/headers/\$(basename "\$f")"
    stat -c '%n %s' "\$f" >> "$R/model-sizes.txt"
done
printf 'gen_12b_s=%s\n' \$((t1-t0)) > "$R/gen-time.txt"
echo 0 > "$W/gen.rc"
EOF
if [ -f "$W/gen.rc" ]; then
    say "models already generated (rc $(cat "$W/gen.rc"))"
elif [ -f "$W/gen.pid" ] && kill -0 "$(cat "$W/gen.pid")" 2>/dev/null; then
    say "model generation still running"
else
    setsid bash "$W/gen.sh" > "$W/gen.out" 2>&1 < /dev/null &
    echo $! > "$W/gen.pid"
    say "model generation started (pid $!)"
fi

while { [ ! -f "$W/build.rc" ] || [ ! -f "$W/gen.rc" ]; } && [ "$(left)" -gt 20 ]; do sleep 5; done
if [ ! -f "$W/build.rc" ] || [ ! -f "$W/gen.rc" ]; then
    say "out of time waiting for build/models; run again to resume"
    tail -n 3 "$W/build-ninja.log" 2>/dev/null
    exit 3
fi
cat "$R/build-time.txt" "$R/gen-time.txt" 2>/dev/null
if [ "$(cat "$W/build.rc")" != 0 ] || [ "$(cat "$W/gen.rc")" != 0 ]; then
    say "build rc $(cat "$W/build.rc"), gen rc $(cat "$W/gen.rc")"
    tail -n 30 "$R/build-configure.log" "$R/build-ninja-tail.log" "$W/gen.out" 2>/dev/null
    exit 4
fi

# ------------------------------------------------------------------ 3-5. server runs
TGT=$M/12b/gemma4-synthetic-12b-target.gguf
DRF=$M/12b/gemma4-synthetic-12b-assistant.gguf
TINY=$M/tiny/gemma4-synthetic-tiny-target.gguf
TINYD=$M/tiny/gemma4-synthetic-tiny-assistant.gguf
MTP=(--spec-type draft-mtp --spec-draft-n-max 3 -ctkd q8_0 -ctvd q8_0 --spec-draft-ngl all)

cat > "$W/client.py" <<'EOF'
"""Tiny llama-server client: `short PORT` (one short completion) or `tput PORT` (3 prompts)."""
import json, sys, urllib.request

PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number.",
    "Repair this JSON: {name: 'fleet', gpus: [1, 2,], }",
    "List the planets of the solar system, one per line, with their order from the sun.",
]


def completion(port, prompt, n_predict):
    body = {"prompt": prompt, "n_predict": n_predict, "temperature": 0, "cache_prompt": False}
    req = urllib.request.Request(f"http://127.0.0.1:{port}/completion", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.load(resp)


mode, port = sys.argv[1], sys.argv[2]
if mode == "short":
    d = completion(port, "Hello", 8)
    print(json.dumps({"content": d["content"], "timings": d["timings"]}))
else:
    rows = []
    for p in PROMPTS:
        t = completion(port, p, 256)["timings"]
        rows.append({k: t.get(k) for k in ("prompt_n", "predicted_n", "predicted_ms",
                                           "predicted_per_second", "draft_n", "draft_n_accepted")})
    print(json.dumps(rows))
EOF

gpu_used() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -n 1; }

# run_server NAME CTX TPUT(0/1) SMOKE(0/1) MODEL [extra llama-server args...]
run_server() {
    local name=$1 ctx=$2 tput=$3 smoke=$4 model=$5
    shift 5
    local d=$R/$name
    if [ -f "$d/done" ]; then say "$name: done before"; return; fi
    if [ "$(left)" -lt 70 ]; then say "$name: skipped, $(left)s left"; return; fi
    mkdir -p "$d"
    local port=$((18100 + RANDOM % 800))
    gpu_used > "$d/gpu-used-before.txt"
    local args=(-m "$model" -c "$ctx" -np 1 -fit off -fa on -ngl all -ctk q8_0 -ctv q8_0
        --metrics -lv 4 --host 127.0.0.1 --port "$port" "$@")
    echo "$BIN/llama-server ${args[*]}" > "$d/cmd.txt"
    "$BIN/llama-server" "${args[@]}" > "$d/server.log" 2>&1 < /dev/null &
    local pid=$!
    SERVER_PIDS+=("$pid")
    echo "$pid" > "$d/pid.txt"
    local t=0 ok=0
    while [ $t -lt 240 ]; do
        if ! kill -0 "$pid" 2>/dev/null; then break; fi
        if [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/health")" = 200 ]; then ok=1; break; fi
        sleep 0.5; t=$((t + 1))
    done
    if [ $ok = 1 ]; then
        echo "health 200 after ~$((t / 2))s" > "$d/health.txt"
        timeout 60 python3 "$W/client.py" short "$port" > "$d/short.json" 2>&1
        sleep 1
        nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits > "$d/compute-apps.csv" 2>&1
        gpu_used > "$d/gpu-used-after.txt"
        if [ "$tput" = 1 ]; then
            timeout 120 python3 "$W/client.py" tput "$port" > "$d/tput.json" 2>&1
        fi
        if [ "$smoke" = 1 ]; then
            timeout 150 python3 gemma4_fleet/host_scripts/smoke_check.py --url "http://127.0.0.1:$port" \
                --instance gpu-proof --expect-commit $COMMIT --expect-model "$model" \
                --gpu --pid "$pid" --json "$d/smoke.json" --prom "$d/smoke.prom" \
                > "$d/smoke.out" 2>&1
            echo "rc=$?" >> "$d/smoke.out"
        fi
        curl -s "http://127.0.0.1:$port/props" > "$d/props.json"
    else
        echo "no health 200 (server alive: $(kill -0 "$pid" 2>/dev/null && echo yes || echo no))" > "$d/health.txt"
    fi
    kill "$pid" 2>/dev/null
    for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -9 "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    grep -E 'buffer size|llama_kv_cache(_iswa)?: (size|creating)|sched_reserve|print_info: (file type|file size|n_ctx|n_embd|n_layer)|draft acceptance|accept|load_tensors: offloaded|CUDA error|failed' \
        "$d/server.log" | grep -v 'slot launch_slot' | head -n 200 > "$d/mem-lines.txt"
    gzip -f "$d/server.log"
    touch "$d/done"
    say "$name: $(cat "$d/health.txt"); apps: $(tr '\n' ' ' < "$d/compute-apps.csv" 2>/dev/null)"
}

run_server mtp-8k 8192 1 1 "$TGT" -md "$DRF" "${MTP[@]}"
run_server none-8k 8192 1 1 "$TGT" --spec-type none
run_server none-64k 65536 0 0 "$TGT" --spec-type none
run_server mtp-64k 65536 0 0 "$TGT" -md "$DRF" "${MTP[@]}"

if [ ! -f "$R/bench.done" ] && [ "$(left)" -gt 60 ]; then
    timeout 90 "$BIN/llama-bench" -m "$TGT" -p 0 -n 128 -fa 1 -ctk q8_0 -ctv q8_0 -ngl 99 \
        -o md > "$R/llama-bench.md" 2> "$R/llama-bench.err"
    echo "rc=$?" >> "$R/llama-bench.err"
    touch "$R/bench.done"
    say "llama-bench: $(grep -E 'tg128' "$R/llama-bench.md" | tr -s ' ')"
fi

run_server tiny-none-8k 8192 0 0 "$TINY" --spec-type none
run_server tiny-mtp-8k 8192 0 0 "$TINY" -md "$TINYD" "${MTP[@]}"
run_server none-32k 32768 0 0 "$TGT" --spec-type none

# ------------------------------------------------------------------ summary
{
    echo "fact: $(cat "$R/nvidia-smi-query-gpu.csv")"
    cat "$R/build-time.txt" "$R/gen-time.txt" 2>/dev/null
    for d in "$R"/*/; do
        n=$(basename "$d")
        [ -f "$d/pid.txt" ] || continue
        pid=$(cat "$d/pid.txt")
        used=$(awk -F', *' -v p="$pid" '$1 == p {print $2}' "$d/compute-apps.csv" 2>/dev/null)
        echo "$n: pid $pid used_MiB ${used:-?} gpu_used_before $(cat "$d/gpu-used-before.txt") after $(cat "$d/gpu-used-after.txt" 2>/dev/null)"
        [ -f "$d/tput.json" ] && echo "  tput: $(cat "$d/tput.json")"
        [ -f "$d/smoke.out" ] && echo "  smoke: $(head -n 1 "$d/smoke.out")"
    done
    [ -f "$R/llama-bench.md" ] && cat "$R/llama-bench.md"
} > "$R/summary.txt"
cat "$R/summary.txt"
