"""Host data validation: defaults, the MTP guard, and errors that name host and field."""

from __future__ import annotations

import runpy
from pathlib import Path
from typing import Any

import pytest

from gemma4_fleet.config import ConfigError, parse_host_config

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
SHA = "a" * 64


def group_all() -> dict[str, Any]:
    return runpy.run_path(str(ROOT / "group_data" / "all.py"))


def host_data(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"llamacpp": group_all()["llamacpp"], "llama_server": {}}
    data["llama_models"] = {
        "t": {"role": "target", "file": "t.gguf", "url": "http://m/t.gguf", "sha256": SHA},
        "d": {"role": "drafter", "file": "d.gguf", "url": "http://m/d.gguf", "sha256": SHA},
    }
    data["llama_instances"] = [{"name": "gemma4", "target": "t", "drafter": "d", "gpu": "0"}]
    data.update(overrides)
    return data


def error_of(data: dict[str, Any], host: str = "box1") -> str:
    with pytest.raises(ConfigError) as exc:
        parse_host_config(host, data)
    return str(exc.value)


def test_defaults_are_the_seed_003_recipe() -> None:
    config = parse_host_config("box1", host_data())
    inst = config.instances[0]
    assert config.llamacpp.commit == "0c1e57098bba43ac29e6e3b677cdceebdd22334f"
    assert config.llamacpp.git_url == "https://github.com/ggml-org/llama.cpp.git"
    assert (inst.spec_type, inst.draft_n_max, inst.parallel, inst.fit) == ("draft-mtp", 3, 1, False)
    # KV types: chosen by the plan (f16 where it fits, else q8_0); drafts follow the target
    assert (inst.cache_type_k, inst.cache_type_v) == ("auto", "auto")
    assert (inst.cache_type_k_draft, inst.cache_type_v_draft) == ("auto", "auto")
    assert inst.kv_order is None
    assert (inst.flash_attn, inst.jinja, inst.gpu_layers) == ("on", True, "all")
    assert inst.unit == "llama-server-gemma4.service"


def test_instance_fields_override_the_recipe() -> None:
    data = host_data(
        llama_instances=[
            {
                "name": "a",
                "target": "t",
                "drafter": "d",
                "gpu": "0",
                "port": 8080,
                "ctx_size": 4096,
            },
            {"name": "b", "target": "t", "drafter": "d", "gpu": "1", "port": 8081},
        ]
    )
    config = parse_host_config("box1", data)
    assert [i.ctx_size for i in config.instances] == [4096, 262144]
    assert [i.port for i in config.instances] == [8080, 8081]


def test_parallel_mtp_is_refused_without_the_override() -> None:
    data = host_data(
        llama_instances=[
            {"name": "gemma4", "target": "t", "drafter": "d", "gpu": "0", "parallel": 4}
        ]
    )
    message = error_of(data, host="box4090")
    assert "host box4090: llama_instances[gemma4]" in message
    assert "parallel 4 with draft-mtp is slower" in message
    data["llama_instances"][0]["allow_parallel_mtp"] = True
    assert parse_host_config("box4090", data).instances[0].parallel == 4


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"llamacpp": {"git_url": "x", "commit": "0c1e570"}}, "llamacpp.commit", "pattern"),
        (
            {"llama_server": {"cache_type_k": "q9_0"}},
            "llama_instances[gemma4].cache_type_k",
            "q8_0",
        ),
        ({"llama_server": {"port": 70000}}, "llama_instances[gemma4].port", "65535"),
        (
            {"llama_server": {"flash_attn": "off", "cache_type_v": "q8_0"}},
            "llama_instances[gemma4]",
            "needs flash_attn",
        ),
        (
            {"llamacpp_build": {"cuda": True, "cmake_flags": ["-DX=a b"]}},
            "llamacpp_build.cmake_flags[0]",
            "pattern",
        ),
        (
            {
                "llama_models": {
                    "t": {
                        "role": "target",
                        "file": "t.gguf",
                        "sha256": "FILL-IN",
                        "url": "http://m/t.gguf",
                    }
                }
            },
            "llama_models.t.sha256",
            "pattern",
        ),
        (
            {"llama_models": {"t": {"role": "target", "file": "t.gguf", "sha256": SHA}}},
            "llama_models.t",
            "exactly one of url",
        ),
        ({"llama_instances": []}, "llama_instances", "at least 1"),
        # the build's binary is ExecStart's executable: systemd refuses quotes and backslashes
        (
            {"llamacpp_build": {"install_root": "/opt/it's"}},
            "llamacpp_build.install_root",
            "need quoting",
        ),
        ({"llama_server": {"bogus_flag": 1}}, "llama_instances[gemma4].bogus_flag", "Extra inputs"),
    ],
)
def test_bad_input_names_host_and_field(change: dict[str, Any], field: str, words: str) -> None:
    data = host_data()
    for key, value in change.items():
        data[key] = {**data[key], **value} if key == "llama_server" else value
    message = error_of(data, host="gpu-7")
    assert f"host gpu-7: {field}" in message
    assert words in message


def test_references_and_duplicates() -> None:
    missing = host_data(llama_instances=[{"name": "x", "target": "nope", "drafter": "d"}])
    assert "host box1: llama_instances[x].target: 'nope' is not in llama_models" in error_of(
        missing
    )
    swapped = host_data(llama_instances=[{"name": "x", "target": "d", "drafter": "t"}])
    assert "llama_instances[x].target: 'd' has role drafter, used as target" in error_of(swapped)
    twice = host_data(
        llama_instances=[
            {"name": "x", "target": "t", "drafter": "d", "gpu": "0"},
            {"name": "y", "target": "t", "drafter": "d", "gpu": "1"},
        ]
    )
    assert "llama_instances[y].port: port 8080 is used twice" in error_of(twice)
    cpu = host_data(llamacpp_build={"cuda": False})
    assert "llama_instances[gemma4].gpu: gpu 0 set but llamacpp_build.cuda is off" in error_of(cpu)


def test_gpu_service_on_the_llama_gpu_needs_explicit_sharing() -> None:
    data = host_data(gpu_services=[{"unit": "whisper-server.service", "gpu": "0"}])
    message = error_of(data)
    assert "gpu_services[whisper-server.service].gpu: GPU 0 is one llama-server uses" in message
    data["gpu_services"][0]["share_gpu_with_llama"] = True
    assert parse_host_config("box1", data).gpu_services[0].share_gpu_with_llama


def test_build_id_follows_commit_and_build_options() -> None:
    base = parse_host_config("box1", host_data())
    other_arch = parse_host_config(
        "box1",
        host_data(llamacpp_build={"cuda_architectures": [89]}),
    )
    assert base.build_id.startswith("0c1e57098bba-")
    assert base.build_id != other_arch.build_id
    assert base.server_binary == f"/opt/llama.cpp/builds/{base.build_id}/bin/llama-server"
