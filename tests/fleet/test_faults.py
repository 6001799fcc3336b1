"""Faults on the test fleet: interrupted, corrupt and disk-full downloads, a host powered off
mid-deploy, and a controller interrupted with Ctrl-C. Each ends with nothing lost: the model in
service keeps serving, no half-written file sits at a final path, and a rerun converges.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests

from gemma4_fleet.testfleet.hosts import Fleet
from gemma4_fleet.testfleet.inventory import demo_data
from gemma4_fleet.testfleet.results import results_table
from tests.fleet.conftest import PYINFRA, ROOT, PyinfraRun, data_arg, run_pyinfra
from tests.fleet.test_deploy import UNIT, unit_state

pytestmark = pytest.mark.fleet
NODE = "g4f-node1"
OTHER = "g4f-node2"
PORT = 8766


@pytest.fixture(scope="module", autouse=True)
def controller_cache(fleet: Fleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """This module's own, empty controller cache (G4F_CACHE for its pyinfra runs): a model that
    another run left in the shared cache would be copied from there, and the download whose
    faults these tests make would never happen."""
    patch = pytest.MonkeyPatch()
    patch.setenv("G4F_CACHE", str(tmp_path_factory.mktemp("controller-cache")))
    yield
    patch.undo()


@dataclass
class Served:
    """What the flaky mirror did: each request's Range header and the bytes it sent."""

    requests: list[tuple[str | None, int]] = field(default_factory=list)
    # Cut the next full download after this many bytes (then serve normally).
    cut_at: int | None = None
    # Flip bytes at this offset in everything served (a corrupting proxy).
    corrupt_at: int | None = None


@pytest.fixture(scope="module")
def flaky(
    fleet: Fleet, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Served, dict[str, Any]]]:
    """A model mirror on the bridge that can cut a download short or corrupt it.

    The file is Gemma 3 270M with 8 KiB appended (another sha256, loads the same), so placing
    it is a new model version next to the one in service.
    """
    source = (
        fleet.cache
        / "models"
        / demo_data(fleet.mirror_url, fleet.mirror_commit)["llama_models"]["gemma-3-270m"]["file"]
    )
    data = source.read_bytes() + b"\0" * 8192
    path = tmp_path_factory.mktemp("flaky") / "gemma-3-270m-flaky.gguf"
    path.write_bytes(data)
    served = Served()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            header = self.headers.get("Range")
            start, end = 0, len(data) - 1
            if header:
                first, _, last = header.removeprefix("bytes=").partition("-")
                start = int(first)
                end = min(int(last), end) if last else end
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.end_headers()
                    served.requests.append((header, 0))
                    return
            body = bytearray(data[start : end + 1])
            if served.corrupt_at is not None and start <= served.corrupt_at <= end:
                body[served.corrupt_at - start] ^= 0xFF
            limit = len(body)
            if served.cut_at is not None and not header:
                limit, served.cut_at = served.cut_at, None
            self.send_response(206 if header else 200)
            if header:
                self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            sent = 0
            try:
                for offset in range(0, limit, 1 << 20):
                    chunk = body[offset : min(offset + (1 << 20), limit)]
                    self.wfile.write(chunk)
                    sent += len(chunk)
            except (BrokenPipeError, ConnectionResetError):
                return  # the client gave up (a full disk on its side)
            finally:
                served.requests.append((header, sent))
            if limit < len(body):
                self.close_connection = True
                self.connection.shutdown(2)

    httpd = ThreadingHTTPServer((fleet.gateway, PORT), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    model = {
        "role": "target",
        "file": path.name,
        "url": f"http://{fleet.gateway}:{PORT}/{path.name}",
        "sha256": hashlib.sha256(data).hexdigest(),
        "_size": len(data),
    }
    try:
        yield served, model
    finally:
        httpd.shutdown()


def with_flaky_target(fleet: Fleet, model: dict[str, Any]) -> list[str]:
    demo = demo_data(fleet.mirror_url, fleet.mirror_commit)
    models = {
        **demo["llama_models"],
        "flaky": {k: v for k, v in model.items() if not k.startswith("_")},
    }
    instance = {**demo["llama_instances"][0], "target": "flaky"}
    return [*data_arg("llama_models", models), *data_arg("llama_instances", [instance])]


def deploy(*args: str, limit: str | None = NODE) -> PyinfraRun:
    return run_pyinfra("deploys/gemma4_mtp.py", *(["--limit", limit] if limit else []), *args)


def model_in_service(fleet: Fleet, name: str = NODE) -> str:
    return (
        fleet.ssh(name, f"systemctl show -p ExecStart --value {UNIT}")
        .stdout.split("--model ")[1]
        .split()[0]
    )


@pytest.fixture
def restore(fleet: Fleet, deployed: PyinfraRun) -> Iterator[None]:
    yield
    back = deploy()  # node1: the only host these tests change
    assert back.returncode == 0, back.output[-3000:]


@pytest.fixture
def restore_all(fleet: Fleet, deployed: PyinfraRun) -> Iterator[None]:
    yield
    back = deploy(limit=None)
    assert back.returncode == 0, back.output[-3000:]


def download_requests(served: Served) -> list[tuple[str | None, int]]:
    """Requests of curl's download (the controller's header reads ask for small ranges)."""
    return [(h, n) for h, n in served.requests if h is None or h.endswith("-")]


def test_a_full_disk_keeps_the_old_model_and_says_so(
    fleet: Fleet, flaky: tuple[Served, dict[str, Any]], restore: None
) -> None:
    _, model = flaky
    before = (unit_state(fleet, NODE), model_in_service(fleet))
    target_dir = f"/var/lib/llama-models/{model['sha256'][:16]}"
    # A small file system where the new version goes: the download runs out of space.
    fleet.ssh(NODE, f"mkdir -p {target_dir} && mount -t tmpfs -o size=32m g4f-full {target_dir}")
    try:
        run = deploy(*with_flaky_target(fleet, model))
        assert run.returncode != 0
        assert f"cannot write {target_dir}/{model['file']}.partial (disk full?" in run.output
        assert "the model in service is untouched" in run.output
        assert (unit_state(fleet, NODE), model_in_service(fleet)) == before
        left = fleet.ssh(NODE, f"ls -A {target_dir}").stdout.split()
        assert not [name for name in left if name.endswith((".partial", ".gguf"))], left
        assert requests.get(f"http://{fleet.hosts[NODE].address}:8080/health", timeout=10).ok
    finally:
        fleet.ssh(NODE, f"umount {target_dir}; rmdir {target_dir}", check=False)


def test_corrupt_bytes_are_rejected_and_the_old_model_stays(
    fleet: Fleet, flaky: tuple[Served, dict[str, Any]], restore: None
) -> None:
    served, model = flaky
    before = (unit_state(fleet, NODE), model_in_service(fleet))
    served.corrupt_at = model["_size"] // 2
    try:
        run = deploy(*with_flaky_target(fleet, model))
    finally:
        served.corrupt_at = None
    assert run.returncode != 0
    assert "sha256 mismatch" in run.output
    assert (unit_state(fleet, NODE), model_in_service(fleet)) == before
    partials = fleet.ssh(NODE, "find /var/lib/llama-models -name '*.partial'").stdout
    assert partials == ""


def test_an_interrupted_download_resumes_and_the_next_host_gets_the_controllers_copy(
    fleet: Fleet, flaky: tuple[Served, dict[str, Any]], restore_all: None
) -> None:
    served, model = flaky
    size = model["_size"]
    served.requests.clear()
    served.cut_at = size * 2 // 5
    partial = f"/var/lib/llama-models/{model['sha256'][:16]}/{model['file']}.partial"
    before = (unit_state(fleet, NODE), model_in_service(fleet))
    cut = deploy(*with_flaky_target(fleet, model))
    assert cut.returncode != 0
    assert "the next run resumes it" in cut.output
    assert (unit_state(fleet, NODE), model_in_service(fleet)) == before
    have = int(fleet.ssh(NODE, f"stat -c %s {partial}").stdout)
    assert 0 < have < size
    served.requests.clear()
    resumed = deploy(*with_flaky_target(fleet, model))
    assert resumed.returncode == 0, resumed.output[-3000:]
    downloads = download_requests(served)
    assert downloads == [(f"bytes={have}-", size - have)], downloads
    assert model_in_service(fleet).endswith(model["file"])
    print(f"\ndownload resume: {have} of {size} bytes kept, the rerun fetched {size - have}")

    # The next host gets the model from the controller's copy: the mirror is not asked again.
    served.requests.clear()
    second = deploy(*with_flaky_target(fleet, model), limit=OTHER)
    assert second.returncode == 0, second.output[-3000:]
    assert download_requests(served) == []
    assert model_in_service(fleet, OTHER).endswith(model["file"])
    placed = f"Models | {model['file']} from the controller cache"
    assert [n for op, n in second.changed().items() if op.endswith(placed)] == [1]


def start_deploy(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [PYINFRA, "-y", "--parallel", "1", "inventories/local.py", "deploys/gemma4_mtp.py", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=os.environ.copy(),
    )


def wait_for_line(proc: subprocess.Popen[str], needle: str, lines: list[str]) -> None:
    """Read the run's output until a line contains `needle` (the output is kept in `lines`)."""
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if needle in line:
            return
    raise AssertionError(f"never saw {needle!r}:\n{''.join(lines)[-3000:]}")


def finish(proc: subprocess.Popen[str], lines: list[str]) -> PyinfraRun:
    assert proc.stdout is not None
    lines.extend(proc.stdout)
    proc.wait(timeout=900)
    output = "".join(lines)
    return PyinfraRun(proc.returncode, output, results_table(output))


def unit_sums(fleet: Fleet, name: str) -> dict[str, str]:
    out = fleet.ssh(
        name,
        "cd /etc/systemd/system && sha256sum llama-server-gemma3.service llama-smoke-gemma3.*",
    ).stdout
    return {line.split()[1]: line.split()[0] for line in out.splitlines()}


def temporaries(fleet: Fleet, name: str) -> str:
    return fleet.ssh(
        name,
        "find /etc/systemd/system /etc/gemma4-fleet /var/lib/llama-models /var/lib/gemma4-fleet "
        "\\( -name '*.partial' -o -name '*.tmp' -o -name '*.g4f-new' \\) -print 2>/dev/null; true",
    ).stdout


def running_argv(fleet: Fleet, name: str) -> str:
    """The command line of the process that serves now (not the unit file's)."""
    pid = fleet.ssh(name, f"systemctl show -p MainPID --value {UNIT}").stdout.strip()
    return fleet.ssh(name, f"ps -o args= -p {pid}").stdout


# Nested @deploy names prefix it: "Gemma 4 + MTP llama-server | llama-server units | ...".
NEEDLE = f"llama-server units | Unit {UNIT}"


def test_a_host_powered_off_mid_deploy_converges_on_the_rerun(
    fleet: Fleet, restore_all: None
) -> None:
    off = "g4f-node2"
    old = unit_sums(fleet, off)
    changed = data_arg("llama_server", {"draft_p_min": 0.25})
    proc, lines = start_deploy(*changed), []
    # Power off when the units are being written (each step runs on node1, then node2).
    wait_for_line(proc, NEEDLE, lines)
    fleet.stop_host(off)
    t_off = time.monotonic()
    run = finish(proc, lines)
    try:
        assert run.returncode != 0
        assert "EOFError" not in run.output, run.output[-3000:]  # node2 failed alone
        assert "--spec-draft-p-min 0.25" in running_argv(fleet, NODE), run.output[-4000:]
        assert requests.get(f"http://{fleet.hosts[NODE].address}:8080/health", timeout=10).ok
    finally:
        fleet.start_host(off)
    print(f"\npower-off: host back after {time.monotonic() - t_off:.1f} s")
    mid, leftovers = unit_sums(fleet, off), temporaries(fleet, off)
    rerun = deploy(*changed, limit=None)
    assert rerun.returncode == 0, rerun.output[-3000:]
    assert "--spec-draft-p-min 0.25" in running_argv(fleet, off)
    assert temporaries(fleet, off) == ""
    # Nothing half-written: each unit file was the old one or the new one.
    new = unit_sums(fleet, off)
    assert all(mid[path] in (old[path], new[path]) for path in new), (old, mid, new)
    print(f"power-off: temporaries before the rerun: {leftovers.split() or 'none'}")


def test_ctrl_c_on_the_controller_then_a_rerun_converges(fleet: Fleet, restore_all: None) -> None:
    changed = data_arg("llama_server", {"draft_p_min": 0.25})
    proc, lines = start_deploy(*changed), []
    wait_for_line(proc, NEEDLE, lines)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    run = finish(proc, lines)
    # pyinfra's CLI exits 0 on Ctrl-C ("Exiting upon user request!"): the interrupt shows there.
    assert "Exiting upon user request" in run.output, run.output[-2000:]
    states = {name: "0.25" in running_argv(fleet, name) for name in fleet.hosts}
    for name in fleet.hosts:
        # Whatever state the hosts were left in, they still serve (old or new unit).
        deadline = time.monotonic() + 120
        while not _healthy(fleet, name):
            assert time.monotonic() < deadline, f"{name} not healthy after Ctrl-C"
            time.sleep(0.5)
    rerun = deploy(*changed, limit=None)
    assert rerun.returncode == 0, rerun.output[-3000:]
    for name in fleet.hosts:
        assert "--spec-draft-p-min 0.25" in running_argv(fleet, name)
        assert temporaries(fleet, name) == ""
    print(f"\nctrl-c: running the new flags right after the interrupt: {states}")


def _healthy(fleet: Fleet, name: str) -> bool:
    try:
        return requests.get(f"http://{fleet.hosts[name].address}:8080/health", timeout=5).ok
    except requests.RequestException:
        return False
