#!/usr/bin/env bash
# GPU deploy proof (see docs/gpu-deploy-proof.md): the project's real pyinfra deploy code builds
# llama.cpp with CUDA for this host's own GPU and places the models, run against @local on a GPU
# machine that has no network and no systemd; then the built server is run by hand the way its
# unit would run it, and the smoke check is run against it.
#
# Runs on the device machine from the repository root, with the ignored folder .carry/ carried:
#   .carry/wheels/               pyinfra 3.10 + deps, pydantic 2, gguf, ... (python 3.12 wheels)
#   .carry/llama.cpp-src.tar.xz  llama.cpp 0c1e570 source tree (no .git)
#   .carry/tok.gguf              tokenizer-only GGUF for gemma4_fleet.synthetic
# State goes to $G4F_WORK (default /tmp/g4fd) and is kept while the machine stays warm: each stage
# leaves a marker and is skipped when re-run, and the first (building) pyinfra run is detached, so
# a second call resumes where a first one ran out of time.
#
#   usage: OUT=/some/dir G4F_BUDGET_S=560 bash scripts/gpu_deploy_proof.sh
set -uo pipefail

: "${OUT:?OUT must name the output folder}"
REPO=$(pwd)
W=${G4F_WORK:-/tmp/g4fd}
BUDGET=${G4F_BUDGET_S:-560}
T0=$(date +%s)
R=$W/results
V=/tmp/v                       # the venv with pyinfra & co.
SRC=/tmp/llama-src             # the git repository pyinfra checks llama.cpp out from
PAIR=/tmp/pair                 # the synthetic model pair (controller == host: local_path)
ROOT=/tmp/g4f-opt              # llamacpp_build.install_root
MODELS_DIR=/tmp/g4f-models     # llama_models_dir
mkdir -p "$R"
export PYTHONUNBUFFERED=1
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}

left() { echo $((BUDGET - ($(date +%s) - T0))); }
say() { echo "[$(($(date +%s) - T0))s] $*" | tee -a "$R/driver.log"; }

SERVER_PID=
pack() {
    [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null
    say "packing results"
    tar -C "$W" -czf "$OUT/results.tar.gz" results
    for f in pyinfra-run1.txt pyinfra-run2.txt BUILD-INFO VERSION smoke.json nvidia-smi.txt summary.txt; do
        [ -f "$R/$f" ] && cp "$R/$f" "$OUT/$f"
    done
}
trap pack EXIT

# ------------------------------------------------------------------ 0. environment
if [ ! -f "$R/env.done" ]; then
    nvidia-smi > "$R/nvidia-smi.txt" 2>&1
    {
        echo "date: $(date -u +%FT%TZ)"
        echo "uname: $(uname -a)"
        echo "nproc: $(nproc)"
        echo "PATH: $PATH"
        echo "nvcc on PATH: $(command -v nvcc || echo none); /usr/local/cuda/bin/nvcc: $(ls /usr/local/cuda/bin/nvcc 2>&1)"
        { command -v nvcc >/dev/null && nvcc --version || /usr/local/cuda/bin/nvcc --version; } | tail -n 2
        echo "cmake: $(command -v cmake) $(cmake --version | head -n 1)"
        echo "ninja: $(ninja --version)  git: $(git --version 2>&1)  ccache: $(command -v ccache || echo none)"
        echo "systemd PID 1: $(cat /proc/1/comm)"
        python3 -c 'import sys; print("python3", sys.executable, sys.version.split()[0])'
        nvidia-smi --query-gpu=index,uuid,name,memory.total,memory.used,compute_cap --format=csv,noheader,nounits
    } > "$R/env.txt" 2>&1
    touch "$R/env.done"
fi
say "env: $(tail -n 1 "$R/env.txt")"

# ------------------------------------------------------------------ 1. python environment
if [ ! -f "$W/venv.done" ]; then
    t=$(date +%s)
    rm -rf "$V"
    # python3 there may be a venv itself, or lack ensurepip: then a pip-less venv filled by
    # python3's own pip (--python)
    if python3 -m venv "$V" > "$R/venv.log" 2>&1; then
        PIP=("$V/bin/pip")
    else
        rm -rf "$V"
        python3 -m venv --without-pip "$V" >> "$R/venv.log" 2>&1 || { say "venv failed"; cat "$R/venv.log"; exit 2; }
        PIP=(python3 -m pip --python "$V/bin/python")
    fi
    "${PIP[@]}" install -q --no-index --find-links .carry/wheels \
        'pyinfra>=3.10,<3.11' 'pydantic>=2.6,<3' jinja2 requests paramiko 'gguf>=0.17,<0.20' \
        >> "$R/venv.log" 2>&1 || { say "pip install failed"; tail -n 20 "$R/venv.log"; exit 2; }
    "${PIP[@]}" list > "$R/pip-list.txt" 2>&1
    echo "venv_s=$(($(date +%s) - t))" > "$R/venv-time.txt"
    touch "$W/venv.done"
fi
PY=$V/bin/python
say "venv: $("$PY" -c 'import pyinfra, pydantic, gguf; from importlib.metadata import version as v; print("pyinfra", v("pyinfra"), "pydantic", v("pydantic"), "gguf", v("gguf"))' 2>&1)"

# ------------------------------------------------------------------ 2. llama.cpp as a git repository
if [ ! -f "$W/commit" ]; then
    t=$(date +%s)
    rm -rf "$SRC" && mkdir -p "$SRC" && tar -C "$SRC" -xJf .carry/llama.cpp-src.tar.xz || exit 3
    # fixed identity and dates (as gemma4_fleet/testfleet/mirrors.py): the same sha every time
    (
        cd "$SRC" || exit 1
        export GIT_AUTHOR_NAME="gemma4-fleet mirror" GIT_AUTHOR_EMAIL=mirror@gemma4-fleet.invalid
        export GIT_AUTHOR_DATE=2026-10-01T00:00:00Z GIT_COMMITTER_DATE=2026-10-01T00:00:00Z
        export GIT_COMMITTER_NAME="gemma4-fleet mirror" GIT_COMMITTER_EMAIL=mirror@gemma4-fleet.invalid
        git init -q -b master . && git add -A -f . &&
            git commit -q -m "llama.cpp 0c1e570 (gpu deploy proof)" && git rev-parse HEAD
    ) > "$W/commit.tmp" 2> "$R/git.log" || { say "git repo failed"; cat "$R/git.log"; exit 3; }
    mv "$W/commit.tmp" "$W/commit"
    echo "git_repo_s=$(($(date +%s) - t))" > "$R/git-time.txt"
fi
COMMIT=$(tail -n 1 "$W/commit")
say "llama.cpp repo file://$SRC at $COMMIT"

# ------------------------------------------------------------------ 3. synthetic model pair
if [ ! -f "$R/pair.txt" ]; then
    "$PY" -m gemma4_fleet.synthetic "$PAIR" --tokenizer-from .carry/tok.gguf > "$R/pair.tmp" 2>&1 \
        || { say "synthetic pair failed"; cat "$R/pair.tmp"; exit 4; }
    mv "$R/pair.tmp" "$R/pair.txt"
fi
cat "$R/pair.txt"

# ------------------------------------------------------------------ 4. host data
"$PY" - "$R/pair.txt" "$SRC" "$COMMIT" "$ROOT" "$MODELS_DIR" "$W/data" <<'EOF'
import json, os, sys
from pathlib import Path
pair, src, commit, root, models_dir, out = sys.argv[1:]
files = {}
for line in Path(pair).read_text().splitlines():
    path, sha = line.split("  sha256=")
    files["target" if path.endswith("-target.gguf") else "drafter"] = (path, sha)
data = {
    "llamacpp": {"git_url": f"file://{src}", "commit": commit},
    "llamacpp_build": {"cuda": True, "install_root": root, "jobs": 16},
    "llama_models": {
        f"tiny-{role}": {"role": role, "file": os.path.basename(path), "local_path": path,
                         "sha256": sha, "size": os.path.getsize(path)}
        for role, (path, sha) in files.items()
    },
    "llama_models_dir": models_dir,
    "llama_instances": [{"name": "gemma4", "target": "tiny-target", "drafter": "tiny-drafter",
                         "gpu": "0", "ctx_size": 8192}],
}
os.makedirs(out, exist_ok=True)
for key, value in data.items():
    Path(out, key).write_text(value if isinstance(value, str) else json.dumps(value))
EOF
DATA=()
for key in llamacpp llamacpp_build llama_models llama_models_dir llama_instances; do
    DATA+=(--data "$key=$(cat "$W/data/$key")")
done
# the exact command line, for the record
{
    printf 'pyinfra -y -v @local scripts/gpu_deploy_proof_deploy.py'
    for a in "${DATA[@]}"; do printf " %q" "$a"; done
    echo
} > "$R/pyinfra-cmd.txt"

# ------------------------------------------------------------------ 5. pyinfra, run 1 (builds; detached)
cat > "$W/run1.sh" <<EOF
#!/usr/bin/env bash
cd "$REPO"
export PYTHONPATH="$PYTHONPATH" PYTHONUNBUFFERED=1 G4F_PROOF_DUMP="$R/dump-run1.json"
t0=\$(date +%s)
$(printf '%q ' "$V/bin/pyinfra" -y -v @local scripts/gpu_deploy_proof_deploy.py "${DATA[@]}") > "$R/pyinfra-run1.txt" 2>&1
rc=\$?
echo "pyinfra_run1_s=\$((\$(date +%s) - t0)) rc=\$rc" > "$R/run1-time.txt"
echo \$rc > "$W/run1.rc"
EOF
if [ -f "$W/run1.rc" ]; then
    say "pyinfra run 1 finished before (rc $(cat "$W/run1.rc"))"
elif [ -f "$W/run1.pid" ] && kill -0 "$(cat "$W/run1.pid")" 2>/dev/null; then
    say "pyinfra run 1 still running (pid $(cat "$W/run1.pid"))"
else
    setsid bash "$W/run1.sh" > "$W/run1.out" 2>&1 < /dev/null &
    echo $! > "$W/run1.pid"
    say "pyinfra run 1 started (pid $!)"
fi
while [ ! -f "$W/run1.rc" ] && [ "$(left)" -gt 15 ]; do sleep 5; done
if [ ! -f "$W/run1.rc" ]; then
    say "out of time in pyinfra run 1 (build); run again to resume"
    tail -n 5 "$R/pyinfra-run1.txt"; ls "$ROOT/build/" 2>/dev/null; tail -n 3 "$ROOT"/build/*.log 2>/dev/null
    exit 5
fi
cat "$R/run1-time.txt"
if [ "$(cat "$W/run1.rc")" != 0 ]; then
    say "pyinfra run 1 FAILED"
    tail -n 60 "$R/pyinfra-run1.txt"
    exit 6
fi

# ------------------------------------------------------------------ 6. pyinfra, run 2 (must change nothing)
if [ ! -f "$W/run2.rc" ]; then
    t=$(date +%s)
    G4F_PROOF_DUMP="$R/dump.json" timeout 150 "$V/bin/pyinfra" -y -v @local \
        scripts/gpu_deploy_proof_deploy.py "${DATA[@]}" > "$R/pyinfra-run2.txt" 2>&1
    rc=$?
    echo "pyinfra_run2_s=$(($(date +%s) - t)) rc=$rc" > "$R/run2-time.txt"
    echo $rc > "$W/run2.rc"
fi
cat "$R/run2-time.txt"
grep -A 20 -E 'Operation +Hosts' "$R/pyinfra-run2.txt"
[ "$(cat "$W/run2.rc")" = 0 ] || { say "pyinfra run 2 FAILED"; tail -n 40 "$R/pyinfra-run2.txt"; exit 7; }

BUILD_DIR=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["build_dir"])' "$R/dump.json")
cp "$BUILD_DIR/BUILD-INFO" "$BUILD_DIR/VERSION" "$R/"
ls -la "$BUILD_DIR" "$BUILD_DIR/bin" > "$R/build-dir.txt" 2>&1
ls -la "$MODELS_DIR"/*/ >> "$R/build-dir.txt" 2>&1
cat "$MODELS_DIR"/*/*.sha256 >> "$R/build-dir.txt" 2>&1
tail -n 80 "$ROOT/build/"*.log > "$R/build-log-tail.txt" 2>/dev/null  # (the scratch log is kept)
grep -E 'CMAKE_CUDA_ARCHITECTURES|CUDA Toolkit found|Using CUDA|ccache|GGML_CUDA' "$ROOT/build/"*.log \
    > "$R/build-cmake-lines.txt" 2>/dev/null
cat "$R/BUILD-INFO" "$R/VERSION"

# ------------------------------------------------------------------ 7. the server, as the unit runs it
if [ ! -f "$R/server.done" ] && [ "$(left)" -gt 60 ]; then
    "$PY" - "$R/dump.json" "$R" <<'EOF'
import json, shlex, sys
from pathlib import Path
d = json.load(open(sys.argv[1]))
inst = d["instances"][0]
out = Path(sys.argv[2])
(out / "server-argv.sh").write_text(shlex.join(inst["argv"]) + "\n")
(out / "server-env.sh").write_text(
    f"UUID={shlex.quote(inst['gpu_uuid'])}\nPORT={inst['port']}\nMODEL={shlex.quote(inst['model_path'])}\n")
EOF
    # shellcheck disable=SC1091
    . "$R/server-env.sh"
    mapfile -t ARGV < <("$PY" -c 'import json, sys; print("\n".join(json.load(open(sys.argv[1]))["instances"][0]["argv"]))' "$R/dump.json")
    echo "CUDA_VISIBLE_DEVICES=$UUID $(cat "$R/server-argv.sh")" > "$R/server-cmd.txt"
    mkdir -p "$W/state" && cd "$W/state" || exit 8
    CUDA_VISIBLE_DEVICES=$UUID "${ARGV[@]}" > "$R/server.log" 2>&1 < /dev/null &
    SERVER_PID=$!
    cd "$REPO" || exit 8
    ok=0; t=$(date +%s)
    while [ $(($(date +%s) - t)) -lt 120 ]; do
        kill -0 "$SERVER_PID" 2>/dev/null || break
        if [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/health")" = 200 ]; then ok=1; break; fi
        sleep 0.5
    done
    echo "health_200=$ok after $(($(date +%s) - t))s pid=$SERVER_PID" > "$R/health.txt"
    say "server: $(cat "$R/health.txt")"
    if [ $ok = 1 ]; then
        curl -s "http://127.0.0.1:$PORT/props" > "$R/props.json"
        curl -s -H 'Content-Type: application/json' "http://127.0.0.1:$PORT/completion" \
            -d '{"prompt": "Write a Python function that returns the n-th Fibonacci number.", "n_predict": 64, "temperature": 0, "cache_prompt": false}' \
            > "$R/completion.json"
        nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits > "$R/compute-apps.csv" 2>&1
        # The unit's own smoke command (smoke_argv), with the script from this checkout, the
        # server's PID for --unit (no systemd here) and the reports under results/.
        mapfile -t SMOKE < <("$PY" - "$R" "$SERVER_PID" "$W/data" <<'EOF'
import json, sys
from pathlib import Path
from gemma4_fleet.render import smoke_argv
from gemma4_fleet.config import parse_host_config
r, pid, data_dir = sys.argv[1:]
data = {}
for f in Path(data_dir).iterdir():
    text = f.read_text()
    data[f.name] = text if f.name == "llama_models_dir" else json.loads(text)
config = parse_host_config("@local", data)
argv = smoke_argv(config, config.instances[0])
out = [sys.executable if a == "/usr/bin/python3" else "gemma4_fleet/host_scripts/smoke_check.py"
       if a.endswith("/smoke_check.py") else a for a in argv]
i = out.index("--unit"); del out[i:i + 2]
out[out.index("--json") + 1] = f"{r}/smoke.json"
out[out.index("--prom") + 1] = f"{r}/smoke.prom"
print("\n".join(out + ["--pid", pid]))
EOF
        )
        printf '%q ' "${SMOKE[@]}" > "$R/smoke-cmd.txt"; echo >> "$R/smoke-cmd.txt"
        timeout 150 "${SMOKE[@]}" > "$R/smoke.out" 2>&1
        echo "rc=$?" >> "$R/smoke.out"
        say "smoke: $(tail -n 2 "$R/smoke.out" | tr '\n' ' ')"
    fi
    kill "$SERVER_PID" 2>/dev/null
    for _ in $(seq 40); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.25; done
    kill -9 "$SERVER_PID" 2>/dev/null
    wait "$SERVER_PID" 2>/dev/null
    SERVER_PID=
    gzip -kf "$R/server.log"
    grep -E 'CUDA|compute capability|build_info|system_info|load_tensors: offloaded|buffer size|draft|spec' "$R/server.log" \
        | head -n 80 > "$R/server-lines.txt"
    touch "$R/server.done"
fi

# ------------------------------------------------------------------ summary
{
    echo "GPU fact: $(grep -E '^[0-9]+, GPU-' "$R/env.txt")"
    cat "$R/venv-time.txt" "$R/git-time.txt" "$R/run1-time.txt" "$R/run2-time.txt" 2>/dev/null
    "$PY" - "$R" <<'EOF'
import json, sys
from pathlib import Path
r = Path(sys.argv[1])
d = json.loads((r / "dump.json").read_text())
print("cuda_architectures:", d["cuda_architectures"], " build_id:", d["build_id"])
print(d["plan_table"])
for name in ("pyinfra-run1.txt", "pyinfra-run2.txt"):
    lines = (r / name).read_text().splitlines()
    total = [l for l in lines if "Grand total" in l]
    print(name, "->", total[-1].strip() if total else "(no results table)")
c = r / "completion.json"
if c.exists():
    t = json.loads(c.read_text()).get("timings", {})
    print("completion:", {k: t.get(k) for k in ("predicted_n", "predicted_per_second", "draft_n", "draft_n_accepted")})
p = r / "props.json"
if p.exists():
    print("props build_info:", json.loads(p.read_text()).get("build_info"))
s = r / "smoke.json"
if s.exists():
    j = json.loads(s.read_text())
    print("smoke:", j.get("status"), j.get("reasons"), "tps", j.get("tokens_per_second"), "acceptance", j.get("acceptance"), "gpu", j.get("gpu"))
EOF
    [ -f "$R/compute-apps.csv" ] && echo "compute apps: $(cat "$R/compute-apps.csv")"
} > "$R/summary.txt" 2>&1
cat "$R/summary.txt"
say "done"
