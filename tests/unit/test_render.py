"""The argv builder (exact seed 003 flags), --help parsing and systemd quoting."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

from gemma4_fleet.config import ConfigError, parse_host_config
from gemma4_fleet.render import (
    exec_start,
    flags_of,
    parse_help_flags,
    server_argv,
    systemd_escape,
)
from tests.unit.test_config import SHA, host_data

pytestmark = pytest.mark.unit
DATA = Path(__file__).parent / "data"


def test_seed_003_recipe_argv_exactly() -> None:
    config = parse_host_config("box4090", host_data())
    argv = server_argv(config, config.instances[0])
    build = f"/opt/llama.cpp/builds/{config.build_id}"
    assert argv == [
        f"{build}/bin/llama-server",
        "--model",
        f"/var/lib/llama-models/{SHA[:16]}/t.gguf",
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
    argv = server_argv(config, config.instances[0], ctx_size=65536)
    assert argv[argv.index("--ctx-size") + 1] == "65536"


def test_help_of_the_pinned_build_knows_every_recipe_flag() -> None:
    """Recorded `llama-server --help` of commit 0c1e570 (CPU build)."""
    known = parse_help_flags((DATA / "llama-server-help-0c1e570.txt").read_text())
    config = parse_host_config("box1", host_data())
    assert set(flags_of(server_argv(config, config.instances[0]))) <= known
    assert {"-fit", "--fit", "-fa", "--flash-attn", "-ctkd", "--spec-draft-type-k"} <= known
    # Removed at this pin (seed 000/001 still use them): the server aborts on them.
    assert "--draft-max" not in known
    assert "--spec-type" in known


def test_flags_of_ignores_values() -> None:
    assert flags_of(["bin", "--port", "8080", "--fit=off", "-c", "-1", "x"]) == [
        "--port",
        "--fit",
        "-c",
    ]


@pytest.mark.parametrize(
    "hostile",
    ["my-service; whoami", 'a "quoted" $HOME %h \\ back', "two words", "new\nline", "100%"],
)
def test_systemd_quoting_survives_hostile_values(hostile: str) -> None:
    quoted = systemd_escape(hostile)
    # systemd unescapes %% and $$; after that the word must split back to exactly one argument.
    unescaped = quoted.replace("%%", "%").replace("$$", "$").replace("\\n", "\n")
    assert shlex.split(unescaped, posix=True) == [hostile.replace("\n", "\n")] or (
        "\n" in hostile and shlex.split(unescaped) == [hostile]
    )
    assert ";" not in quoted or quoted.startswith('"')


def test_exec_start_verified_by_systemd_analyze(tmp_path: Path) -> None:
    """systemd itself parses the rendered ExecStart back into the same argv."""
    analyze = subprocess.run(["which", "systemd-analyze"], capture_output=True, check=False)
    if analyze.returncode != 0:
        pytest.skip("systemd-analyze not installed")
    argv = ["/bin/echo", "my-service; whoami", "$HOME", "50%", 'say "hi"']
    unit = tmp_path / "q.service"
    unit.write_text(f"[Service]\nExecStart={exec_start(argv)}\n")
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False
    )
    assert "Failed to parse" not in result.stderr, result.stderr
