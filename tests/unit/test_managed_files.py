"""The fact listing our own unit files: names this tool renders, with the marker, nothing else."""

from __future__ import annotations

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
