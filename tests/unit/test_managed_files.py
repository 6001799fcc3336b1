"""The fact listing our own unit files: names this tool renders, with the marker, nothing else."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from gemma4_fleet.facts import ManagedInstance, parse_managed_files

pytestmark = pytest.mark.unit
D = "/etc/systemd/system"
EXEC = (
    "ExecStart=/opt/llama.cpp/builds/x/bin/llama-server --model /m/t.gguf --ctx-size 4096 "
    "--host 0.0.0.0 --port 8081 --offline --metrics --no-webui"
)


def test_instances_and_drop_ins_are_grouped_by_name() -> None:
    found = parse_managed_files(
        [
            f"{D}/llama-server-a.service\t{EXEC}",
            f"{D}/llama-smoke-a.service\tExecStart=/usr/bin/python3 /x/smoke_check.py",
            f"{D}/llama-smoke-a.timer\t",
            f"{D}/llama-smoke-b.timer\t",
            f"{D}/whisper-server.service.d/gemma4-fleet-gpu.conf\t",
        ]
    )
    assert found.instances == {
        "a": ManagedInstance(
            "a",
            (
                f"{D}/llama-server-a.service",
                f"{D}/llama-smoke-a.service",
                f"{D}/llama-smoke-a.timer",
            ),
            "0.0.0.0",
            8081,
        ),
        "b": ManagedInstance("b", (f"{D}/llama-smoke-b.timer",), None, None),
    }
    assert found.instances["a"].local_url == "http://127.0.0.1:8081"
    assert found.instances["a"].unit == "llama-server-a.service"
    assert found.instances["b"].local_url is None
    assert found.gpu_dropins == {
        "whisper-server.service": f"{D}/whisper-server.service.d/gemma4-fleet-gpu.conf"
    }


def test_names_this_tool_does_not_render_are_ignored() -> None:
    found = parse_managed_files(
        [
            f"{D}/llama-server-A B.service\t",
            f"{D}/llama-server-x.service.bak\t",
            f"{D}/other.service.d/override.conf\t",
            "/etc/llama-server-y.service\t",
            "",
        ]
    )
    assert found.instances == {} and found.gpu_dropins == {}


def test_the_command_lists_marked_files_with_their_first_exec_start(tmp_path: Path) -> None:
    """The fact's real command in a real sh, on a copy of the systemd folder."""
    from gemma4_fleet.facts import GPU_DROPIN_NAME, MANAGED_MARKER, ManagedUnitFiles

    marked = f"{MANAGED_MARKER} (do not edit)\n"
    files = {
        "llama-server-a.service": f"{marked}[Service]\n{EXEC}\nExecStart=/second\n",
        "llama-smoke-a.timer": f"{marked}[Timer]\nOnCalendar=hourly\n",
        "llama-server-theirs.service": f"[Service]\n{MANAGED_MARKER}\n{EXEC}\n",
        "llama-smoke-empty.service": "",
        f"whisper.service.d/{GPU_DROPIN_NAME}": f"{marked}[Service]\n",
        "whisper.service.d/override.conf": marked,
        "unrelated.service": f"{marked}{EXEC}\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)

    def listed(folder: Path) -> list[str]:
        command = ManagedUnitFiles().command().replace(D, str(folder))
        out = subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=True)
        return out.stdout.splitlines()

    assert sorted(listed(tmp_path)) == sorted(
        [
            f"{tmp_path}/llama-server-a.service\t{EXEC}",
            f"{tmp_path}/llama-smoke-a.timer\t",
            f"{tmp_path}/whisper.service.d/{GPU_DROPIN_NAME}\t",
        ]
    )
    assert listed(tmp_path / "none") == []
