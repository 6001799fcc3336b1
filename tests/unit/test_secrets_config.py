"""API keys and exposure: a server others can reach needs a key file, or an explicit opt-out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from jinja2 import Environment, FileSystemLoader

from gemma4_fleet.config import ConfigError, parse_host_config
from gemma4_fleet.render import parse_help_flags, server_argv, smoke_argv
from gemma4_fleet.vram_plan import with_kv
from tests.unit.test_config import host_data

pytestmark = pytest.mark.unit


def instance(**fields: Any) -> dict[str, Any]:
    return host_data(
        llama_instances=[{"name": "gemma4", "target": "t", "drafter": "d", "gpu": "0", **fields}]
    )


def error_of(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as exc:
        parse_host_config("box1", data)
    return str(exc.value)


@pytest.mark.parametrize("address", ["0.0.0.0", "::", "10.0.0.5", "box1.lan"])
def test_a_reachable_server_without_a_key_is_refused(address: str) -> None:
    message = error_of(instance(host=address))
    assert message == (
        f"host box1: llama_instances[gemma4].host: {address} is reachable from other machines and"
        " no api_key_file is set; set api_key_file, bind to 127.0.0.1, or set"
        " allow_unauthenticated: true"
    )


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.0.53", "::1", "localhost"])
def test_loopback_needs_no_key(address: str) -> None:
    assert parse_host_config("box1", instance(host=address)).instances[0].api_key_file is None


def test_allow_unauthenticated_is_the_explicit_opt_out() -> None:
    config = parse_host_config("box1", instance(host="0.0.0.0", allow_unauthenticated=True))
    assert config.instances[0].allow_unauthenticated


def test_a_key_file_is_read_on_the_controller(tmp_path: Path) -> None:
    key = tmp_path / "gemma4.key"
    key.write_text("# for the web app\nsk-abc123\n")
    config = parse_host_config("box1", instance(host="0.0.0.0", api_key_file=str(key)))
    assert config.instances[0].api_key_file == str(key)


def test_key_file_problems_name_the_field_and_never_echo_the_key(tmp_path: Path) -> None:
    missing = tmp_path / "missing.key"
    assert error_of(instance(api_key_file=str(missing))) == (
        f"host box1: llama_instances[gemma4].api_key_file: cannot read {missing}: "
        "No such file or directory"
    )
    empty = tmp_path / "empty.key"
    empty.write_text("# nothing yet\n\n")
    assert error_of(instance(api_key_file=str(empty))) == (
        f"host box1: llama_instances[gemma4].api_key_file: {empty} holds no key"
    )
    blank = tmp_path / "blank.key"
    blank.write_text("sk-top secret\n")
    message = error_of(instance(api_key_file=str(blank)))
    assert message.endswith("has blanks or controls") and "sk-top" not in message


def test_the_drain_timeout_is_configurable() -> None:
    data = host_data(llama_drain={"timeout_s": 30})
    assert parse_host_config("box1", data).drain.timeout_s == 30
    assert "llama_drain.timeout_s" in error_of(host_data(llama_drain={"timeout_s": -1}))


def test_the_server_and_the_smoke_check_get_a_credential_path_not_the_key(tmp_path: Path) -> None:
    key = tmp_path / "gemma4.key"
    key.write_text("sk-never-rendered\n")
    config = parse_host_config("box1", instance(host="0.0.0.0", api_key_file=str(key)))
    inst = config.instances[0]
    argv = server_argv(config, with_kv(inst, "q8_0"))  # as a plan settles "auto"
    assert argv[-2:] == ["--api-key-file", "/run/credentials/llama-server-gemma4.service/api-key"]
    smoke = smoke_argv(config, inst)
    i = smoke.index("--api-key-file")
    assert smoke[i + 1] == "/run/credentials/llama-smoke-gemma4.service/api-key"
    help_text = (Path(__file__).parent / "data" / "llama-server-help-0c1e570.txt").read_text()
    assert "--api-key-file" in parse_help_flags(help_text)
    env = Environment(  # noqa: S701 - systemd units, not HTML
        loader=FileSystemLoader(Path(__file__).resolve().parents[2] / "templates"),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    unit = env.get_template("llama-server.service.j2").render(
        instance=inst,
        exec_start=" ".join(argv),
        service_user="llama",
        cuda_env=None,
        groups=[],
        restart_backoff=False,
        read_only_paths="/m",
        api_key_path="/etc/gemma4-fleet/keys/gemma4.key",
    )
    assert "LoadCredential=api-key:/etc/gemma4-fleet/keys/gemma4.key\n" in unit
    assert "sk-never-rendered" not in unit + " ".join(argv + smoke)
