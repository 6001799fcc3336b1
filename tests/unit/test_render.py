"""The argv builder (exact seed 003 flags), --help parsing and systemd quoting."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import jinja2
import pytest

from gemma4_fleet.config import ConfigError, parse_host_config
from gemma4_fleet.deploys.units import server_unit_values, smoke_unit_values
from gemma4_fleet.gpu_devices import UVM_UNIT
from gemma4_fleet.render import (
    exec_start,
    flag_names,
    parse_help_flags,
    server_argv,
    systemd_escape,
)
from gemma4_fleet.vram_plan import with_kv
from tests.unit.test_config import SHA, host_data

pytestmark = pytest.mark.unit
DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).resolve().parents[2]


def test_seed_003_recipe_argv_exactly() -> None:
    config = parse_host_config("box4090", host_data())
    # cache types "auto": the plan picks q8_0 for 256k on a 24 GB card (tests/unit/test_plan.py)
    argv = server_argv(config, with_kv(config.instances[0], "q8_0"))
    build = f"/opt/llama.cpp/builds/{config.build_id}"
    assert argv == [
        f"{build}/bin/llama-server",
        "--model",
        f"/var/lib/llama-models/{SHA[:16]}/t.gguf",
        "--alias",
        "t",
        "--model-draft",
        f"/var/lib/llama-models/{SHA[:16]}/d.gguf",
        "--spec-type",
        "draft-mtp",
        "--spec-draft-n-max",
        "3",
        "--spec-draft-n-min",
        "0",
        "--spec-draft-p-min",
        "0",
        "--spec-draft-ngl",
        "all",
        "--cache-type-k-draft",
        "q8_0",
        "--cache-type-v-draft",
        "q8_0",
        "--ctx-size",
        "262144",
        "--n-gpu-layers",
        "all",
        "--cache-type-k",
        "q8_0",
        "--cache-type-v",
        "q8_0",
        "--parallel",
        "1",
        "--fit",
        "off",
        "--flash-attn",
        "on",
        "--cont-batching",
        "--jinja",
        "--host",
        "127.0.0.1",
        "--port",
        "8080",
        "--offline",
        "--metrics",
        "--no-webui",
    ]


def test_planned_ctx_replaces_auto() -> None:
    data = host_data()
    data["llama_server"] = {**data["llama_server"], "ctx_size": "auto"}
    config = parse_host_config("box1", data)
    with pytest.raises(ConfigError, match="ctx_size auto needs a VRAM plan"):
        server_argv(config, config.instances[0])
    with pytest.raises(ConfigError, match="cache type auto needs a VRAM plan"):
        server_argv(config, config.instances[0], ctx_size=65536)
    argv = server_argv(config, with_kv(config.instances[0], "f16"), ctx_size=65536)
    assert argv[argv.index("--ctx-size") + 1] == "65536"
    for flag in (
        "--cache-type-k",
        "--cache-type-v",
        "--cache-type-k-draft",
        "--cache-type-v-draft",
    ):
        assert argv[argv.index(flag) + 1] == "f16"


def test_help_of_the_pinned_build_knows_every_recipe_flag() -> None:
    """Recorded `llama-server --help` of commit 0c1e570 (CPU build)."""
    known = parse_help_flags((DATA / "llama-server-help-0c1e570.txt").read_text())
    config = parse_host_config("box1", host_data())
    assert set(flag_names(server_argv(config, with_kv(config.instances[0], "q8_0")))) <= known
    assert {"-fit", "--fit", "-fa", "--flash-attn", "-ctkd", "--spec-draft-type-k"} <= known
    # Removed at this pin (older recipes still use them): the server aborts on them.
    assert "--draft-max" not in known
    assert "--spec-type" in known


def test_flag_names_ignore_values() -> None:
    assert flag_names(["bin", "--port", "8080", "--fit=off", "-c", "-1", "x"]) == [
        "--port",
        "--fit",
        "-c",
    ]


@pytest.mark.parametrize(
    ("value", "command_line", "escaped"),
    [
        ("/opt/llama.cpp/bin/llama-server", True, "/opt/llama.cpp/bin/llama-server"),
        ("my-service; whoami", True, '"my-service; whoami"'),
        ('a "quoted" $HOME %h \\ back', True, '"a \\"quoted\\" $$HOME %%h \\\\ back"'),
        ('a "quoted" $HOME %h \\ back', False, '"a \\"quoted\\" $HOME %%h \\\\ back"'),
        ("new\nline", False, '"new\\nline"'),
        ("100%", False, '"100%%"'),
        ("CUDA_VISIBLE_DEVICES=GPU-1", False, "CUDA_VISIBLE_DEVICES=GPU-1"),
    ],
)
def test_systemd_escape_by_hand(value: str, command_line: bool, escaped: str) -> None:
    assert systemd_escape(value, command_line=command_line) == escaped


HOSTILE = 'x; whoami $HOME %h "q" \\ 50%'


def _render(name: str, values: dict[str, Any]) -> str:
    env = jinja2.Environment(  # noqa: S701 (unit files, not HTML)
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True
    )
    return env.from_string((ROOT / "templates" / name).read_text()).render(**values)


def test_rendered_units_with_hostile_values_pass_systemd_analyze(tmp_path: Path) -> None:
    """systemd parses the real templates, filled with hostile values, without an error.

    The fleet test test_units.py runs such a unit under systemd and reads back argv, environment
    and the read-only path exactly.
    """
    root = tmp_path / "opt x; whoami $HOME %h 50%"  # systemd refuses quotes and \\ here
    valid = parse_host_config("box1", host_data(llamacpp_build={"cuda_architectures": [89]}))
    # Host data refuses these (tests/unit/test_bad_input.py); the renderer must escape them
    # anyway, so they are put past validation here.
    config = valid.model_copy(
        update={
            "build": valid.build.model_copy(update={"install_root": str(root)}),
            "models_dir": f"/var/lib/{HOSTILE}",
            "service_user": "root",
            "instances": [
                valid.instances[0].model_copy(update={"extra_args": ["--alias", HOSTILE]})
            ],
        }
    )
    inst = with_kv(config.instances[0], "q8_0")  # as a plan settles "auto"
    binary = Path(config.server_binary)
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    argv = server_argv(config, inst)
    server = server_unit_values(
        config, inst, argv, f"GPU-{HOSTILE}", groups=["video"], restart_backoff=False, uvm=True
    )
    uvm_script = tmp_path / "nvidia-uvm.sh"  # the GPU unit Requires= the UVM oneshot
    uvm_script.write_text("#!/bin/sh\n")
    uvm_script.chmod(0o755)
    units = {
        inst.unit: _render("llama-server.service.j2", server),
        inst.smoke_unit: _render("llama-smoke.service.j2", smoke_unit_values(config, inst)),
        UVM_UNIT: _render("nvidia-uvm.service.j2", {"script": str(uvm_script)}),
    }
    assert f"ExecStart={exec_start(argv)}\n" in units[inst.unit]
    assert f"ReadOnlyPaths={systemd_escape(config.models_dir)}\n" in units[inst.unit]
    for name, text in units.items():
        (tmp_path / name).write_text(text)
    done = subprocess.run(
        ["systemd-analyze", "verify", *(str(tmp_path / name) for name in units)],
        capture_output=True,
        text=True,
        check=False,
    )
    problems = [line for line in done.stderr.splitlines() if "python3" not in line]
    assert done.returncode == 0 and not problems, done.stderr
