"""The full deploy on a real GPU host under systemd (issues 13 and 16), one run on a GPU machine.

Run by scripts/gpu_host_proof.sh (which sets up PYTHONPATH and the carried files). Boots the GPU
test host (gemma4_fleet.testfleet.gpuhost), serves llama.cpp and the synthetic models from a
local mirror, and runs the project's own pyinfra deploys against the host over SSH. Every step
is recorded in WORK/results.json; a short summary goes to OUT/summary.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from gemma4_fleet.testfleet.gpuhost import GpuHost
from gemma4_fleet.testfleet.mirrors import git_mirror
from gemma4_fleet.testfleet.results import changed_ops, results_table

MIRROR_PORT = 8765
HOST = "g4f-gpuhost"
QUERY_GPU = "index,uuid,name,memory.total,memory.used,compute_cap"
TUNE_AGREEMENT = 0.6
# The recipe's wanted ctx (the 12B shape's n_ctx_train) and the 24 GB budget of docs/tuning.md.
TUNE_CTX = 131072
BUDGET_24GB = 'gpu_memory_mib={"0": 24564}'
R: dict[str, Any] = {"steps": {}}
T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


class Proof:
    def __init__(self, args: argparse.Namespace) -> None:
        self.carry: Path = args.carry
        self.work: Path = args.work
        self.out: Path = args.out
        self.logs = self.work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.host = GpuHost(self.work / "host")
        self.data_file = self.work / "data.json"
        self.n_run = 0
        self.gpus: list[dict[str, Any]] = []
        # --cpu: a dry run of the same flow on a machine without a GPU (tiny pair, CPU build).
        self.cpu: bool = args.cpu
        self.smoke_only: bool = args.smoke
        self.reuse_root: bool = args.reuse_root
        # --tune: issue 14's GPU proof (a cycle pair, deploy + `gemma4-fleet tune` per budget).
        self.tune: bool = args.tune

    # -- helpers -------------------------------------------------------------------------
    def save(self) -> None:
        R["elapsed_s"] = round(time.monotonic() - T0, 1)
        (self.work / "results.json").write_text(json.dumps(R, indent=2, default=str) + "\n")

    def inside(self, command: str, timeout: float = 300) -> str:
        """Run a shell command inside the GPU host (nsenter); stdout+stderr."""
        res = self.host.run(command, timeout=timeout)
        return (res.stdout + res.stderr).strip()

    def unit(self, unit: str) -> dict[str, str]:
        out = self.inside(f"systemctl show -p ActiveState,InvocationID,MainPID {unit}")
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def apps(self) -> list[dict[str, Any]]:
        out = self.inside(
            "nvidia-smi --query-compute-apps=pid,gpu_uuid,used_memory --format=csv,noheader,nounits"
        )
        rows = []
        for line in out.splitlines():
            parts = [p.strip() for p in line.split(",")]
            if len(parts) == 3 and parts[0].isdigit():
                rows.append({"pid": int(parts[0]), "gpu_uuid": parts[1], "mib": int(parts[2])})
        return rows

    def pyinfra(self, label: str, deploy: str, *extra: str) -> dict[str, Any]:
        """`pyinfra -y inventories/gpuhost.py DEPLOY` as a user runs it; timed, log kept."""
        self.n_run += 1
        log = self.logs / f"pyinfra-{self.n_run:02d}-{label}.txt"
        cmd = [
            sys.executable,
            "-c",
            "import sys; from pyinfra_cli.main import main; sys.argv[0] = 'pyinfra'; main()",
            "-y",
            *extra,
            "inventories/gpuhost.py",
            deploy,
        ]
        t = time.monotonic()
        res = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=1200)
        secs = round(time.monotonic() - t, 1)
        output = res.stdout + res.stderr
        log.write_text(" ".join(cmd[3:]) + "\n\n" + output)
        changed = changed_ops(results_table(output))
        total = next((ln.strip() for ln in output.splitlines() if "Grand total" in ln), "")
        rec = {"rc": res.returncode, "s": secs, "changed": changed, "grand_total": total}
        say(f"pyinfra {label}: rc {res.returncode} in {secs} s, {len(changed)} ops changed")
        return rec | {"output_tail": output[-1500:]} if res.returncode else rec

    def write_data(self, data: dict[str, Any]) -> None:
        self.data_file.write_text(json.dumps(data, indent=2))

    def step(self, name: str, fn: Any) -> Any:
        say(f"== {name}")
        t = time.monotonic()
        try:
            value = fn()
            R["steps"][name] = {"ok": True, "s": round(time.monotonic() - t, 1), "result": value}
        except Exception as exc:
            R["steps"][name] = {
                "ok": False,
                "s": round(time.monotonic() - t, 1),
                "error": f"{exc}",
                "trace": traceback.format_exc()[-2000:],
            }
            say(f"!! {name} failed: {exc}")
            value = None
        self.save()
        return value

    # -- steps ---------------------------------------------------------------------------
    def env(self) -> dict[str, Any]:
        def sh(cmd: str) -> str:
            res = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, check=False)
            return (res.stdout + res.stderr).strip()

        line = sh(f"nvidia-smi --query-gpu={QUERY_GPU} --format=csv,noheader,nounits")
        (self.work / "nvidia-smi-query-gpu.csv").write_text(line + "\n")
        return {
            "date": sh("date -u +%FT%TZ"),
            "nproc": os.cpu_count(),
            "kernel": sh("uname -r"),
            "driver": sh("nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1"),
            "gpus_outside": line.splitlines(),
            "nvcc": sh("/usr/local/cuda/bin/nvcc --version | tail -n 2"),
            "python": sys.version.split()[0],
            "proc_devices_nvidia": sh("grep -i nvidia /proc/devices"),
            "nvidia_modprobe": shutil.which("nvidia-modprobe"),
            "dev_nodes": sh("ls -l /dev/nvidia* | cut -c1-80"),
        }

    def start_models(self) -> subprocess.Popen[bytes]:
        """Generate both synthetic pairs in the background (the build takes longer)."""
        gen = self.work / "gen"
        tok = self.work / "tok.gguf"
        with tok.open("wb") as fh:
            subprocess.run(["xz", "-dc", str(self.carry / "tok.gguf.xz")], stdout=fh, check=True)
        models = self.work / "mirror" / "models"
        models.mkdir(parents=True, exist_ok=True)
        shapes = "tiny" if self.cpu else "tiny 12b"
        agreement = ""
        if self.tune:
            shapes = "tiny" if self.cpu else "12b"
            agreement = f"--agreement {TUNE_AGREEMENT}"
        script = (
            f"set -e; mkdir -p {gen}; rm -f {gen}/pairs.txt; for s in {shapes}; do "
            f"{sys.executable} -m gemma4_fleet.synthetic {gen}/$s --tokenizer-from {tok} "
            f"--shape $s {agreement} | tee -a {gen}/pairs.txt; "
            f"ln -f {gen}/$s/*.gguf {models}/; done; touch {gen}/done"
        )
        log = (self.logs / "models.txt").open("w")
        return subprocess.Popen(["sh", "-c", script], stdout=log, stderr=subprocess.STDOUT)

    def mirror(self) -> dict[str, Any]:
        src = self.work / "llama-src"
        shutil.rmtree(src, ignore_errors=True)
        src.mkdir(parents=True)
        subprocess.run(
            ["tar", "-C", str(src), "-xJf", str(self.carry / "llama.cpp-src.tar.xz")], check=True
        )
        repo, sha = git_mirror(src, self.work / "git", "0c1e57098bba43ac29e6e3b677cdceebdd22334f")
        link = self.work / "mirror" / "llama.cpp.git"
        link.unlink(missing_ok=True)
        link.symlink_to(repo)
        log = (self.logs / "mirror.txt").open("w")
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gemma4_fleet.testfleet.mirrors",
                str(self.work / "mirror"),
                "--bind",
                "127.0.0.1",
                "--port",
                str(MIRROR_PORT),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.commit = sha
        return {"commit": sha, "mirror_pid": proc.pid}

    def boot(self) -> dict[str, Any]:
        parts = sorted((self.carry / "rootfs").glob("rootfs.tar.xz.*"))
        binds = []
        if self.cpu and Path("/var/cache/gemma4-fleet/ccache").is_dir():
            binds = ["--bind=/var/cache/gemma4-fleet/ccache:/var/cache/g4f-ccache"]
        info = self.host.up(parts, gpu=not self.cpu, extra_binds=binds, reuse_root=self.reuse_root)
        inside = {
            "nvidia_smi_L": self.inside("nvidia-smi -L"),
            "query_gpu": self.inside(
                f"nvidia-smi --query-gpu={QUERY_GPU} --format=csv,noheader,nounits"
            ),
            "nvcc": self.inside("/usr/local/cuda/bin/nvcc --version | tail -n 1"),
            "gcc": self.inside("gcc --version | head -n 1"),
            "systemd": self.inside("systemctl --version | head -n 1"),
            "failed_units": self.inside("systemctl --failed --no-legend"),
            "dev": self.inside("ls -l /dev/nvidia* | cut -c1-70"),
        }
        (self.work / "nvidia-smi-query-gpu-inside.csv").write_text(inside["query_gpu"] + "\n")
        self.gpus = []
        for line in inside["query_gpu"].splitlines():
            p = [x.strip() for x in line.split(",")]
            if len(p) == 6 and p[0].isdigit():
                self.gpus.append({"index": int(p[0]), "uuid": p[1], "mib": int(p[3])})
        keep = ("unpack_s", "boot_s", "ssh_s", "system_state", "driver", "ssh_hostname")
        return {k: info.get(k) for k in keep} | inside

    def install_debs(self) -> str:
        """Packages the deploy wants that the carried root filesystem lacks (built before they
        were added): the host has no network, so they come as .deb files (carry/debs/)."""
        dest = self.host.root / "root/debs"
        dest.mkdir(parents=True, exist_ok=True)
        for deb in sorted((self.carry / "debs").glob("*.deb")):
            shutil.copy(deb, dest / deb.name)
        return self.inside("dpkg -i /root/debs/*.deb 2>&1 | tail -n 4 && rm -rf /root/debs")

    def cuda_inside(self) -> str:
        """nvcc and the host's gcc build a CUDA program inside the host, which then runs there."""
        (self.host.root / "root/t.cu").write_text(
            "#include <cstdio>\n#include <cuda_runtime.h>\n"
            "__global__ void k(int *x) { *x = 42; }\n"
            "int main() { int n = 0, *d, h = 0; cudaGetDeviceCount(&n); cudaMalloc(&d, 4);\n"
            "  k<<<1, 1>>>(d); cudaMemcpy(&h, d, 4, cudaMemcpyDeviceToHost);\n"
            '  printf("devices %d kernel %d %s\\n", n, h, cudaGetErrorString(cudaGetLastError()));'
            "\n  return h == 42 ? 0 : 1; }\n"
        )
        return self.inside(
            "cd /root && /usr/local/cuda/bin/nvcc -arch=sm_90 -o t t.cu 2>&1 | tail -n 3; ./t",
            timeout=200,
        )

    def whisper_standin(self) -> str:
        """A real CUDA process as the user's 'whisper' service (we never write its unit)."""
        script = (
            "#!/bin/sh\nset -e\n"
            "bin=$(ls /opt/llama.cpp/builds/*/bin/llama-server | head -n 1)\n"
            "model=$(ls /var/lib/llama-models/*/gemma4-synthetic-tiny-target.gguf | head -n 1)\n"
            'exec "$bin" -m "$model" --host 127.0.0.1 --port 8090 -ngl 99 -c 2048 --no-webui\n'
        )
        unit = (
            "[Unit]\nDescription=stand-in for whisper: a llama-server on the GPU\n"
            "[Service]\nExecStart=/usr/local/bin/whisper-standin\n"
        )
        (self.host.root / "usr/local/bin/whisper-standin").write_text(script)
        (self.host.root / "usr/local/bin/whisper-standin").chmod(0o755)
        (self.host.root / "etc/systemd/system/whisper-server.service").write_text(unit)
        return self.inside("systemctl daemon-reload && systemctl cat whisper-server.service")

    def data(self, **over: Any) -> dict[str, Any]:
        pairs = {}
        for line in (self.carry / "pairs.txt").read_text().splitlines():
            path, sha = line.split("  sha256=")
            pairs[Path(path).name] = sha.strip()
        sizes = json.loads((self.carry / "pairs-sizes.json").read_text())
        url = f"http://127.0.0.1:{MIRROR_PORT}"
        models = {}
        for shape in ("12b", "tiny"):
            for role, kind in (("target", "target"), ("drafter", "assistant")):
                f = f"gemma4-synthetic-{shape}-{kind}.gguf"
                models[f"{shape}-{role}"] = {
                    "role": role,
                    "file": f,
                    "url": f"{url}/models/{f}",
                    "sha256": pairs[f],
                    "size": sizes[f],
                }
        two = len(self.gpus) >= 2
        whisper = (
            {"unit": "whisper-server.service", "gpu": "1"}
            if two
            else {
                "unit": "whisper-server.service",
                "gpu": "0",
                "share_gpu_with_llama": True,
                "vram_reserve_mib": 1024,
            }
        )
        base: dict[str, Any] = {
            "llamacpp": {"git_url": f"{url}/llama.cpp.git", "commit": self.commit},
            "llamacpp_build": {"cuda": True, "jobs": os.cpu_count()},
            "llama_models": models,
            "llama_instances": [
                {
                    "name": "gemma4",
                    "target": "12b-target",
                    "drafter": "12b-drafter",
                    "gpu": "0",
                    "port": 8080,
                    "ctx_size": 32768,
                },
                {
                    "name": "gemma4-nomtp",
                    "target": "12b-target",
                    "spec_type": "none",
                    "gpu": "0",
                    "port": 8082,
                    "ctx_size": 32768,
                },
                {
                    "name": "gemma4-tiny",
                    "target": "tiny-target",
                    "drafter": "tiny-drafter",
                    "gpu": "0",
                    "port": 8081,
                    "ctx_size": 8192,
                },
            ],
            "gpu_services": [whisper],
        }
        if self.cpu:
            base |= {
                "llamacpp_build": {"cuda": False, "ccache_dir": "/var/cache/g4f-ccache"},
                "llama_models": {k: v for k, v in models.items() if k.startswith("tiny")},
                "llama_instances": [
                    {
                        "name": "gemma4-tiny",
                        "target": "tiny-target",
                        "drafter": "tiny-drafter",
                        "port": 8081,
                        "ctx_size": 8192,
                        "threads": 2,
                    },
                ],
                "gpu_services": [],
            }
        return base | over

    def plan(self, label: str, *extra: str) -> dict[str, Any]:
        cmd = [
            sys.executable,
            "-m",
            "gemma4_fleet.cli",
            "plan",
            "inventories/gpuhost.py",
            "--from-hosts",
            *extra,
        ]
        table = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=300)
        js = subprocess.run(
            [*cmd, "--json"], capture_output=True, text=True, check=False, timeout=300
        )
        (self.logs / f"plan-{label}.txt").write_text(table.stdout + table.stderr)
        try:
            rows = json.loads(js.stdout)["hosts"][HOST]["instances"]
        except (ValueError, KeyError):
            return {"rc": js.returncode, "error": (js.stdout + js.stderr)[-1500:]}
        return {
            r["instance"]: {
                "gpu": r["gpu"],
                "ctx": r["ctx"],
                "budget_source": r["budget_source"],
                "kv": r.get("cache_type_k"),
                "kv_reason": r.get("kv_reason"),
                "budget_mib": r["bytes"]["budget"] // 2**20,
                "planned_mib": (
                    r["bytes"]["weights"]
                    + r["bytes"]["kv"]
                    + r["bytes"]["compute"]
                    + r["bytes"]["overhead"]
                )
                // 2**20,
            }
            for r in rows
        } | {"table": table.stdout}

    def residency(self, instances: list[str]) -> dict[str, Any]:
        apps = {a["pid"]: a for a in self.apps()}
        out = {}
        for name in instances:
            st = self.unit(f"llama-server-{name}.service")
            pid = int(st.get("MainPID", "0") or 0)
            app = apps.get(pid)
            out[name] = {**st, "gpu_uuid": app and app["gpu_uuid"], "mib": app and app["mib"]}
        return out

    def smoke_reports(self) -> dict[str, Any]:
        out = {}
        for path in sorted(Path("out/smoke", HOST).glob("*.json")):
            r = json.loads(path.read_text())
            out[path.stem] = {
                "status": r.get("status"),
                "reasons": r.get("reasons"),
                "tps": (r.get("tokens_per_second") or {}).get("median"),
                "acceptance": r.get("acceptance"),
                "gpu": r.get("gpu"),
            }
        return out

    # -- the proof -----------------------------------------------------------------------
    def run(self) -> None:
        R["env"] = self.step("env", self.env)
        gen = self.start_models()
        self.step("mirror", self.mirror)
        R["boot"] = self.step("boot", self.boot)
        if not R["steps"]["boot"]["ok"]:
            return
        R["gpus"] = self.gpus
        if sorted((self.carry / "debs").glob("*.deb")):
            self.step("carried packages installed", self.install_debs)
        if self.tune:
            self.run_tune(gen)
            return
        if self.smoke_only:
            self.step("CUDA program built and run inside", self.cuda_inside)
            return
        self.step("whisper stand-in unit", self.whisper_standin)
        os.environ["G4F_GPUHOST_STATE"] = str(self.work / "host")
        os.environ["G4F_GPUHOST_DATA"] = str(self.data_file)
        self.write_data(self.data())
        first = self.step("first deploy", lambda: self.pyinfra("first", "deploys/gemma4_mtp.py"))
        with contextlib.suppress(subprocess.TimeoutExpired):
            gen.wait(timeout=120)
        R["steps"]["models generated"] = (self.work / "gen" / "done").exists()
        names = ["gemma4-tiny"] if self.cpu else ["gemma4", "gemma4-nomtp", "gemma4-tiny"]
        self.step(
            "build time",
            lambda: self.inside(
                "for f in /opt/llama.cpp/build/*.log; do "
                "echo build_s=$(( $(stat -c %Y $f) - $(stat -c %W $f) )) $f; done; nproc"
            ),
        )
        self.step("plan A", lambda: self.plan("A"))
        self.step("residency A", lambda: self.residency(names))
        self.step("smoke reports (deploy)", self.smoke_reports)
        self.step("unit checks", self.unit_checks)
        if not first or first.get("rc"):
            self.step(
                "journal",
                lambda: self.inside("journalctl -b --no-pager -n 150 -u 'llama-*' -u 'gemma4-*'"),
            )
            return
        if not self.cpu:
            self.step("whisper pinned", self.whisper_pinned)
        self.step("no-op rerun", lambda: self.pyinfra("noop", "deploys/gemma4_mtp.py"))
        self.step("flag change", self.flag_change)
        self.step("failing change rolls back", self.rollback)
        if self.cpu:
            return
        self.step("smoke timer unit under systemd", self.smoke_timer)
        self.step("uvm missing, oneshot restores GPU", self.uvm_oneshot)
        self.step("uvm missing, no oneshot: CPU fallback reported", self.uvm_without_oneshot)
        self.step("guard refuses service on llama's GPU", self.guard)
        if len(self.gpus) >= 2:
            self.step("two instances, one per GPU", self.two_gpus)
            self.step("surgical redeploy of one", self.surgical)

    # -- issue 14: `gemma4-fleet tune` on the GPU host ---------------------------------------
    def run_tune(self, gen: subprocess.Popen[bytes]) -> None:
        """Deploy the cycle pair at the recipe's ctx, tune, deploy the profile: per budget."""
        os.environ["G4F_GPUHOST_STATE"] = str(self.work / "host")
        os.environ["G4F_GPUHOST_DATA"] = str(self.data_file)
        files = self.step("cycle pair generated", lambda: self.cycle_pair(gen))
        if not files:
            return
        self.write_data(self.tune_data(files))
        phases = [("cpu", [])] if self.cpu else [("24gb", [BUDGET_24GB]), ("full", [])]
        for label, data in phases:
            ok = self.tune_phase(label, data)
            if not ok:
                self.step(
                    f"{label}: journal",
                    lambda: self.inside("journalctl -b --no-pager -n 80 -u 'llama-*'"),
                )
                return
            if label == "24gb":
                self.step(
                    "build time",
                    lambda: self.inside(
                        "for f in /opt/llama.cpp/build/*.log; do "
                        "echo build_s=$(( $(stat -c %Y $f) - $(stat -c %W $f) )) $f; done; nproc"
                    ),
                )

    def cycle_pair(self, gen: subprocess.Popen[bytes]) -> dict[str, dict[str, Any]]:
        """Wait for synthetic.py; each file's sha256 (as it printed it) and size."""
        gen.wait(timeout=900)
        if gen.returncode:
            log = (self.logs / "models.txt").read_text()[-1500:]
            raise RuntimeError(f"synthetic.py failed (rc {gen.returncode}): {log}")
        files: dict[str, dict[str, Any]] = {}
        for line in (self.work / "gen" / "pairs.txt").read_text().splitlines():
            if "  sha256=" in line:
                path, sha = line.split("  sha256=")
                files[Path(path).name] = {"sha256": sha.strip(), "size": Path(path).stat().st_size}
        return files

    def tune_data(self, files: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """One instance: the cycle target + its 0.6 drafter at the recipe's ctx, KV `auto`."""
        url = f"http://127.0.0.1:{MIRROR_PORT}"
        models = {}
        for name, f in files.items():
            role = "drafter" if "-assistant" in name else "target"
            models[f"cycle-{role}"] = {
                "role": role,
                "file": name,
                "url": f"{url}/models/{name}",
                "sha256": f["sha256"],
                "size": f["size"],
            }
        inst: dict[str, Any] = {
            "name": "gemma4",
            "target": "cycle-target",
            "drafter": "cycle-drafter",
            "gpu": "0",
            "port": 8080,
            "ctx_size": TUNE_CTX,
        }
        build: dict[str, Any] = {"cuda": True, "jobs": os.cpu_count()}
        if self.cpu:
            inst = {k: v for k, v in inst.items() if k != "gpu"} | {"ctx_size": 8192, "threads": 2}
            build = {"cuda": False, "ccache_dir": "/var/cache/g4f-ccache"}
        return {
            "llamacpp": {"git_url": f"{url}/llama.cpp.git", "commit": self.commit},
            "llamacpp_build": build,
            "llama_models": models,
            "llama_instances": [inst],
            "gpu_services": [],
        }

    def fleet_cli(self, label: str, *args: str) -> dict[str, Any]:
        """`gemma4-fleet ARGS` as a user runs it (stdout and stderr logged)."""
        self.n_run += 1
        log = self.logs / f"cli-{self.n_run:02d}-{label}.txt"
        cmd = [sys.executable, "-m", "gemma4_fleet.cli", *args]
        t = time.monotonic()
        res = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=2400)
        secs = round(time.monotonic() - t, 1)
        log.write_text("gemma4-fleet " + " ".join(args) + "\n\n" + res.stdout + res.stderr)
        say(f"gemma4-fleet {label}: rc {res.returncode} in {secs} s")
        return {"rc": res.returncode, "s": secs, "stdout": res.stdout, "stderr": res.stderr[-3000:]}

    def server_flags(self) -> dict[str, Any]:
        """The unit's llama-server flags that tune decides, and what the GPU holds for it."""
        exec_start = self.inside("systemctl show -p ExecStart llama-server-gemma4.service")
        keep = (
            "--ctx-size",
            "--cache-type-k",
            "--cache-type-v",
            "--cache-type-k-draft",
            "--cache-type-v-draft",
            "--spec-type",
            "--spec-draft-n-max",
            "--parallel",
        )
        words = exec_start.split()
        flags = {w: words[i + 1] for i, w in enumerate(words[:-1]) if w in keep}
        return {"flags": flags, **self.residency(["gemma4"])["gemma4"]}

    def tune_phase(self, label: str, data: list[str]) -> bool:
        """plan, deploy (recipe + KV auto), tune, deploy again (profile applied), plan."""
        folder = self.work / "tuned" / label
        folder.mkdir(parents=True, exist_ok=True)
        os.environ["G4F_TUNED_DIR"] = str(folder)
        extra = [x for d in data for x in ("--data", d)]
        inv = "inventories/gpuhost.py"
        self.step(f"{label}: plan", lambda: self.plan(f"{label}-before", *extra))
        run = self.step(
            f"{label}: deploy",
            lambda: self.pyinfra(f"{label}-deploy", "deploys/gemma4_mtp.py", *extra),
        )
        if not run or run.get("rc"):
            return False
        self.step(f"{label}: unit before tune", self.server_flags)
        self.step(f"{label}: smoke reports (deploy)", self.smoke_reports)
        tune = self.step(
            f"{label}: tune",
            lambda: self.fleet_cli(
                f"{label}-tune",
                "tune",
                inv,
                *extra,
                "--n-predict",
                "128",
                "--reps",
                "2",
                "--tuned-dir",
                str(folder),
            ),
        )
        if tune:
            R.setdefault("tune_tables", {})[label] = tune["stdout"]
        profile = folder / f"{HOST}.json"
        if not profile.exists():
            return False
        self.step(f"{label}: profile", lambda: json.loads(profile.read_text())["instances"])
        run = self.step(
            f"{label}: deploy tuned",
            lambda: self.pyinfra(f"{label}-tuned", "deploys/gemma4_mtp.py", *extra),
        )
        self.step(f"{label}: unit tuned", self.server_flags)
        self.step(f"{label}: smoke reports (tuned deploy)", self.smoke_reports)
        self.step(f"{label}: plan tuned", lambda: self.plan(f"{label}-tuned", *extra))
        return bool(run) and not run.get("rc")

    def unit_checks(self) -> dict[str, Any]:
        return {
            "security": self.inside(
                "systemd-analyze security llama-server-gemma4.service | tail -n 1"
            ),
            "security_uvm_smoke": self.inside(
                "systemd-analyze security llama-smoke-gemma4.service | tail -n 1"
            ),
            "verify": self.inside(
                "systemd-analyze verify llama-server-gemma4.service "
                "gemma4-fleet-nvidia-uvm.service llama-smoke-gemma4.service 2>&1 | head -n 20"
            ),
            "deps": self.inside("systemctl show -p Requires,After llama-server-gemma4.service"),
            "device_allow": self.inside(
                "systemctl show -p DeviceAllow,DevicePolicy llama-server-gemma4.service"
            ),
            "uvm_journal": self.inside(
                "journalctl --no-pager -o cat -u gemma4-fleet-nvidia-uvm.service | tail -n 5"
            ),
            "cuda_lines": self.inside(
                "journalctl --no-pager -o cat -u llama-server-gemma4.service | "
                "grep -E 'ggml_cuda_init|CUDA0|Device 0|no usable' | head -n 8"
            ),
        }

    def whisper_pinned(self) -> dict[str, Any]:
        self.inside("systemctl start whisper-server.service")
        pid = 0
        for _ in range(60):
            pid = int(self.unit("whisper-server.service").get("MainPID", "0") or 0)
            if pid and any(a["pid"] == pid for a in self.apps()):
                break
            time.sleep(0.5)
        env = self.inside(f"tr '\\0' '\\n' </proc/{pid}/environ | grep CUDA_VISIBLE")
        return {
            "pid": pid,
            "environ": env,
            "dropin": self.inside(
                "cat /etc/systemd/system/whisper-server.service.d/gemma4-fleet-gpu.conf"
            ),
            "compute_apps": self.inside(
                "nvidia-smi --query-compute-apps=pid,gpu_uuid,used_memory "
                "--format=csv,noheader,nounits"
            ),
            "llama_pid": self.unit("llama-server-gemma4.service").get("MainPID"),
        }

    def _instances_with(self, name: str, **over: Any) -> list[dict[str, Any]]:
        insts = json.loads(self.data_file.read_text())["llama_instances"]
        return [i | over if i["name"] == name else i for i in insts]

    def flag_change(self) -> dict[str, Any]:
        units = ["gemma4-tiny"] if self.cpu else ["gemma4", "gemma4-nomtp", "gemma4-tiny"]
        before = {u: self.unit(f"llama-server-{u}.service") for u in units}
        self.write_data(
            self.data(llama_instances=self._instances_with("gemma4-tiny", draft_n_max=2))
        )
        run = self.pyinfra("flag", "deploys/gemma4_mtp.py")
        after = {u: self.unit(f"llama-server-{u}.service") for u in units}
        return {
            "run": run,
            "restarted": [
                u for u in units if before[u].get("InvocationID") != after[u].get("InvocationID")
            ],
            "before": before,
            "after": after,
        }

    def rollback(self) -> dict[str, Any]:
        good = json.loads(self.data_file.read_text())
        self.write_data(
            good
            | {
                "llama_instances": self._instances_with(
                    "gemma4-tiny", extra_args=["--cache-type-k", "q9_9"]
                )
            }
        )
        run = self.pyinfra("failing", "deploys/gemma4_mtp.py")
        self.write_data(good)
        st = self.unit("llama-server-gemma4-tiny.service")
        pid = int(st.get("MainPID", "0") or 0)
        return {
            "run": {k: v for k, v in run.items() if k != "output_tail"},
            "rolled_back": "rolled back to last-known-good"
            in (self.logs / f"pyinfra-{self.n_run:02d}-failing.txt").read_text(),
            "after": st,
            "exec_has_q9_9": "q9_9"
            in self.inside("systemctl show -p ExecStart llama-server-gemma4-tiny.service"),
            "on_gpu": any(a["pid"] == pid for a in self.apps()),
        }

    def smoke_timer(self) -> dict[str, Any]:
        t = time.monotonic()
        self.inside("systemctl start llama-smoke-gemma4.service", timeout=300)
        secs = round(time.monotonic() - t, 1)
        prom = self.inside("cat /var/lib/gemma4-fleet-smoke/gemma4.prom")
        keep = ("gpu_resident{", "tokens_per_second{", "passed{", "acceptance_ratio{")
        return {
            "s": secs,
            "result": self.inside(
                "systemctl show -p Result,ExecMainStatus llama-smoke-gemma4.service"
            ),
            "timer": self.inside("systemctl list-timers --no-legend 'llama-smoke-*'"),
            "prom": [ln for ln in prom.splitlines() if any(k in ln for k in keep)],
            "journal": self.inside(
                "journalctl --no-pager -o cat -u llama-smoke-gemma4.service | tail -n 2"
            ),
        }

    def _drop_uvm(self) -> str:
        return self.inside(
            # lazy: the running servers hold the node open
            "umount -l /dev/nvidia-uvm 2>/dev/null; rm -f /dev/nvidia-uvm; "
            "ls -l /dev/nvidia-uvm 2>&1"
        )

    def _smoke(self, inst: str) -> dict[str, Any]:
        self.inside(f"systemctl start llama-smoke-{inst}.service", timeout=300)
        rep = json.loads(self.inside(f"cat /var/lib/gemma4-fleet-smoke/{inst}.json") or "{}")
        return {
            "status": rep.get("status"),
            "reasons": rep.get("reasons"),
            "gpu": rep.get("gpu"),
            "tps": (rep.get("tokens_per_second") or {}).get("median"),
        }

    def uvm_oneshot(self) -> dict[str, Any]:
        gone = self._drop_uvm()
        self.inside("systemctl restart llama-server-gemma4-tiny.service")
        node = self.inside("ls -l /dev/nvidia-uvm")
        time.sleep(2)
        return {
            "removed": gone,
            "recreated": node,
            "uvm_journal": self.inside(
                "journalctl --no-pager -o cat -u gemma4-fleet-nvidia-uvm.service | tail -n 2"
            ),
            "smoke": self._smoke("gemma4-tiny"),
        }

    def uvm_without_oneshot(self) -> dict[str, Any]:
        # The oneshot's effect switched off for this test only (a runtime drop-in), node removed.
        self.inside(
            "mkdir -p /run/systemd/system/gemma4-fleet-nvidia-uvm.service.d && printf "
            "'[Service]\\nExecStart=\\nExecStart=/bin/true\\n' "
            ">/run/systemd/system/gemma4-fleet-nvidia-uvm.service.d/off.conf && "
            "systemctl daemon-reload"
        )
        gone = self._drop_uvm()
        self.inside("systemctl restart llama-server-gemma4-tiny.service")
        time.sleep(2)
        health = self.inside("curl -s -o /dev/null -w '%{http_code}' 127.0.0.1:8081/health")
        smoke = self._smoke("gemma4-tiny")
        log = self.inside(
            "journalctl --no-pager -o cat -u llama-server-gemma4-tiny.service | "
            "grep -E 'ggml_cuda_init|no usable GPU' | tail -n 2"
        )
        log_tail = self.inside(
            "journalctl --no-pager -o cat -n 25 -u llama-server-gemma4-tiny.service"
        )
        self.inside(
            "rm -rf /run/systemd/system/gemma4-fleet-nvidia-uvm.service.d && "
            "systemctl daemon-reload && systemctl restart llama-server-gemma4-tiny"
        )
        time.sleep(2)
        return {
            "removed": gone,
            "health_while_on_cpu": health,
            "smoke": smoke,
            "log": log,
            "log_tail": log_tail,
            "restored": self.inside("ls -l /dev/nvidia-uvm"),
            "smoke_after_restore": self._smoke("gemma4-tiny"),
        }

    def guard(self) -> dict[str, Any]:
        out = {}
        good = json.loads(self.data_file.read_text())
        g0 = self.gpus[0]["uuid"]
        for label, ref in (("index", "0"), ("uuid", g0)):
            self.write_data(
                good | {"gpu_services": [{"unit": "whisper-server.service", "gpu": ref}]}
            )
            run = self.pyinfra(f"guard-{label}", "deploys/gemma4_mtp.py")
            text = (self.logs / f"pyinfra-{self.n_run:02d}-guard-{label}.txt").read_text()
            out[label] = {
                "rc": run["rc"],
                "changed": run["changed"],
                "error": [ln.strip() for ln in text.splitlines() if "gpu_services" in ln][:3],
            }
        self.write_data(good)
        return out

    def two_gpus(self) -> dict[str, Any]:
        self.inside("systemctl stop whisper-server.service")
        insts = [
            {
                "name": "gemma4",
                "target": "12b-target",
                "drafter": "12b-drafter",
                "gpu": "0",
                "port": 8080,
                "ctx_size": "auto",
            },
            {
                "name": "gemma4-b",
                "target": "12b-target",
                "drafter": "12b-drafter",
                "gpu": "1",
                "port": 8083,
                "ctx_size": "auto",
            },
        ]
        self.write_data(
            self.data(llama_instances=insts, gpu_services=[], gpu_memory_mib={"1": 12288})
        )
        run = self.pyinfra("two-gpus", "deploys/gemma4_mtp.py")
        return {
            "run": run,
            "plan": self.plan("B"),
            "residency": self.residency(["gemma4", "gemma4-b"]),
            "compute_apps": self.inside(
                "nvidia-smi --query-compute-apps=pid,gpu_uuid,used_memory "
                "--format=csv,noheader,nounits"
            ),
        }

    def surgical(self) -> dict[str, Any]:
        before = {u: self.unit(f"llama-server-{u}.service") for u in ("gemma4", "gemma4-b")}
        self.write_data(
            self.data(
                llama_instances=self._instances_with("gemma4-b", draft_n_max=2),
                gpu_services=[],
                gpu_memory_mib={"1": 12288},
            )
        )
        run = self.pyinfra("surgical", "deploys/redeploy_unit.py", "--data", "unit=gemma4-b")
        after = {u: self.unit(f"llama-server-{u}.service") for u in ("gemma4", "gemma4-b")}
        return {
            "run": run,
            "before": before,
            "after": after,
            "gemma4_unchanged": before["gemma4"] == after["gemma4"],
            "gemma4_b_restarted": before["gemma4-b"]["InvocationID"]
            != after["gemma4-b"]["InvocationID"],
        }


def get(path: str, default: Any = None) -> Any:
    """R["a"]["b"]... by a dotted path; `default` where a step is missing or failed."""
    node: Any = R
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return default
        node = node[key]
    return node


def summary() -> str:
    """The figures docs/gpu-proof.md quotes, as markdown."""
    steps = R["steps"]
    env = R.get("env") or {}
    boot = R.get("boot") or {}
    lines = [
        f"date {env.get('date')}, {len(R.get('gpus') or [])} GPU(s): "
        + "; ".join(env.get("gpus_outside") or [])
        + f"; driver {env.get('driver')}; {env.get('nproc')} cores",
        "",
        "| step | ok | s | result |",
        "|---|---|---:|---|",
    ]
    for name, st in steps.items():
        if not isinstance(st, dict):
            lines.append(f"| {name} | {st} | | |")
            continue
        res = st.get("result")
        brief = ""
        if isinstance(res, dict) and "rc" in res:
            brief = f"rc {res['rc']}, {res.get('s')} s, {len(res.get('changed') or {})} changed"
        elif isinstance(res, dict) and isinstance(res.get("run"), dict):
            run = res["run"]
            brief = f"rc {run.get('rc')}, {run.get('s')} s, {len(run.get('changed') or {})} changed"
        what = brief or st.get("error", "")
        lines.append(f"| {name} | {st.get('ok')} | {st.get('s')} | {what} |")
    lines += [
        "",
        f"boot: unpack {boot.get('unpack_s')} s, nspawn -> running {boot.get('boot_s')} s, "
        f"ssh {boot.get('ssh_s')} s",
    ]
    for label, table in (R.get("tune_tables") or {}).items():
        lines += ["", f"### gemma4-fleet tune ({label})", "", "```", table.rstrip(), "```"]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--carry", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cpu", action="store_true", help="dry run without a GPU")
    p.add_argument("--smoke", action="store_true", help="boot and a CUDA program inside only")
    p.add_argument("--reuse-root", action="store_true", help="boot the root already unpacked")
    p.add_argument("--tune", action="store_true", help="issue 14: deploy + tune, 24 GB and full")
    args = p.parse_args()
    proof = Proof(args)
    try:
        proof.run()
    finally:
        proof.save()
        (args.work / "summary.md").write_text(summary())
        say("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
