"""What users see: model ids (--alias), the chat template, progress lines, status, plan --data."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from pyinfra.api import FactProcessError

from gemma4_fleet import operations as g4f
from gemma4_fleet.config import (
    BUILTIN_CHAT_TEMPLATES,
    ConfigError,
    HostConfig,
    ModelFile,
    parse_host_config,
    stand_in_checksums,
)
from gemma4_fleet.facts import ModelFileStamp, parse_instance_state
from gemma4_fleet.gguf_meta import read_meta
from gemma4_fleet.progress import ProgressCommand, curl_progress, ninja_progress
from gemma4_fleet.render import flag_names, parse_help_flags, server_argv
from gemma4_fleet.status import StatusRow, age, status_table
from gemma4_fleet.vram_plan import meta_for_model, plan_host, with_kv
from tests.unit.test_operations import RecordedHost, fact, run_here, run_op

pytestmark = pytest.mark.unit
DATA = Path(__file__).parent / "data"
HELP = (DATA / "llama-server-help-0c1e570.txt").read_text()
SHA = "ab" * 32
COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"


def _config(model: Path | None = None, **inst: Any) -> HostConfig:
    source = {"local_path": str(model)} if model else {"url": "http://m/g3.gguf"}
    return parse_host_config(
        "box1",
        {
            "llamacpp": {"git_url": "https://example.invalid/llama.cpp.git", "commit": COMMIT},
            "llamacpp_build": {"cuda": False},
            "llama_models": {
                "gemma-3-270m": {"role": "target", "file": "g3.gguf", "sha256": SHA, **source}
            },
            "llama_instances": [
                {
                    "name": "gemma3",
                    "target": "gemma-3-270m",
                    "spec_type": "none",
                    "ctx_size": 4096,
                    **inst,
                }
            ],
        },
    )


def _argv(**inst: Any) -> list[str]:
    config = _config(**inst)
    return server_argv(config, with_kv(config.instances[0], "q8_0"))  # as a plan settles "auto"


def _after(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


# --- names -------------------------------------------------------------------------------------


def test_model_id_defaults_to_the_model_name_and_alias_wins() -> None:
    assert _after(_argv(), "--alias") == "gemma-3-270m"
    assert _after(_argv(alias="gemma-4-12b-it"), "--alias") == "gemma-4-12b-it"


@pytest.mark.parametrize("alias", ["two,names", "with space", "", "-dash-first"])
def test_bad_alias_names_the_field(alias: str) -> None:
    with pytest.raises(ConfigError, match=r"host box1: llama_instances\[gemma3\]\.alias: "):
        _config(alias=alias)


# --- chat template ------------------------------------------------------------------------------


def test_builtin_template_list_is_the_pinned_help() -> None:
    listed = HELP.split("--chat-template JINJA_TEMPLATE", 1)[1].split("(env:", 1)[0]
    listed = listed.split("list of built-in templates:", 1)[1]
    assert set(re.findall(r"[a-z0-9_.-]+", listed)) == BUILTIN_CHAT_TEMPLATES


def test_chat_template_argv() -> None:
    plain = _argv()
    assert "--jinja" in plain and "--no-jinja" not in plain
    assert "--chat-template" not in plain and "--chat-template-file" not in plain
    # jinja is on by default at the pin: off must be said
    assert "--no-jinja" in _argv(jinja=False) and "--jinja" not in _argv(jinja=False)
    # a built-in name is a template only to the legacy engine
    builtin = _argv(chat_template="gemma")
    assert _after(builtin, "--chat-template") == "gemma"
    assert "--no-jinja" in builtin and "--jinja" not in builtin
    from_file = _argv(chat_template_file="/srv/t/my.jinja")
    assert _after(from_file, "--chat-template-file") == (
        "/etc/gemma4-fleet/chat-templates/gemma3.jinja"
    )
    assert "--jinja" in from_file
    known = parse_help_flags(HELP)
    for argv in (plain, builtin, from_file, _argv(jinja=False)):
        assert set(flag_names(argv)) <= known


def test_chat_template_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"llama_instances\[gemma3\]\.chat_template: .*gemma"):
        _config(chat_template="gemma3")
    with pytest.raises(ConfigError, match=r"chat_template .* or chat_template_file, not both"):
        _config(chat_template="gemma", chat_template_file="/x.jinja")


def _gguf_with_template(path: Path, template: str | None) -> Path:
    writer = gguf.GGUFWriter(path, "gemma3")
    writer.add_name("tiny-gemma3")
    writer.add_block_count(2)
    writer.add_context_length(4096)
    writer.add_embedding_length(64)
    writer.add_head_count(2)
    writer.add_token_list([f"t{i}" for i in range(300)])
    if template is not None:
        writer.add_chat_template(template)
    writer.add_tensor("token_embd.weight", np.zeros((300, 64), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_chat_template_presence(tmp_path: Path, gemma3_270m: Path) -> None:
    assert read_meta(gemma3_270m).has_chat_template is False  # the demo's model has none
    with_one = _gguf_with_template(tmp_path / "t.gguf", "{{ messages[0]['content'] }}")
    assert read_meta(with_one).has_chat_template is True
    assert read_meta(_gguf_with_template(tmp_path / "n.gguf", None)).has_chat_template is False


def test_plan_warns_about_a_missing_template_and_shows_what_is_used(gemma3_270m: Path) -> None:
    bare = plan_host("box1", _config(gemma3_270m), [], meta_for_model)
    (warning,) = bare.warnings
    assert warning.startswith("host box1: llama_instances[gemma3].chat_template: ")
    assert "chatml" in warning and "chat_template: gemma" in warning
    assert "falls back to chatml" in bare.table()
    assert bare.to_json()["instances"][0]["chat_template"]["source"] == "chatml-fallback"
    assert bare.to_json()["instances"][0]["model_id"] == "gemma-3-270m"

    fixed = plan_host(
        "box1", _config(gemma3_270m, chat_template="gemma", alias="g3"), [], meta_for_model
    )
    assert fixed.warnings == []
    assert "gemma3: model id 'g3'; chat template: llama.cpp built-in gemma" in fixed.table()


def test_plan_refuses_a_missing_template_file(gemma3_270m: Path, tmp_path: Path) -> None:
    config = _config(gemma3_270m, chat_template_file=str(tmp_path / "nope.jinja"))
    with pytest.raises(ConfigError, match=r"llama_instances\[gemma3\]\.chat_template_file: no"):
        plan_host("box1", config, [], meta_for_model)
    (tmp_path / "yes.jinja").write_text("{{ messages }}")
    config = _config(gemma3_270m, chat_template_file=str(tmp_path / "yes.jinja"))
    assert plan_host("box1", config, [], meta_for_model).warnings == []


# --- progress -----------------------------------------------------------------------------------

# Recorded: curl 7.88.1 writing its meter to a file (updates separated by CR).
CURL_METER = (
    "  % Total    % Received % Xferd  Average Speed   Time    Time     Time  Current\n"
    "                                 Dload  Upload   Total   Spent    Left  Speed\n"
    "\r  0     0    0     0    0     0      0      0 --:--:-- --:--:-- --:--:--     0"
    "\r 12 6981M   12  862M    0     0  98.1M      0  0:01:11  0:00:08  0:01:03  101M"
    "\r 13 6981M   13  963M    0     0  98.3M      0  0:01:11  0:00:09  0:01:02  100M"
)


def test_curl_progress() -> None:
    assert curl_progress(CURL_METER) == "13% of 6981MB (963MB, 98.3MB/s, 0:01:02 left)"
    assert curl_progress(CURL_METER.split("\r")[0]) is None  # only the header yet
    unknown = "\r  0     0    0  512k    0     0   400k      0 --:--:--  0:00:01 --:--:--  400k"
    assert curl_progress(unknown) == "512kB received (400kB/s)"


def test_ninja_progress() -> None:
    log = (
        "-- Build files have been written to: /opt/llama.cpp/build/x\n"
        "[1/212] Building C object ggml/src/CMakeFiles/ggml-base.dir/ggml.c.o\n"
        "[53/212] Building CXX object src/CMakeFiles/llama.dir/llama.cpp.o\n"
    )
    assert ninja_progress(log) == "step 53/212 (25%)"
    assert ninja_progress("-- Configuring done\n") is None


# --- status -------------------------------------------------------------------------------------

# Recorded output of LlamaInstanceState's command on a test host (report shortened).
_REPORT = {
    "instance": "gemma3",
    "status": "pass",
    "reasons": [],
    "build_info": "b1-0c1e570",
    "model_path": "/var/lib/llama-models/abababababababab/g3.gguf",
    "tokens_per_second": {"median": 41.27},
    "acceptance": 0.8125,
}
SERVING = [
    "active=active",
    "pid=4242",
    "health=200",
    "now=1764530000",
    "gpu=4242, 8006",
    "gpu=999, 120",
    "report_mtime=1764529100",
    "report=" + json.dumps(_REPORT),
]
STOPPED = ["active=inactive", "pid=0", "health=000", "now=1764530000"]


def test_instance_state_of_a_serving_instance() -> None:
    state = parse_instance_state(SERVING)
    assert (state.active, state.main_pid, state.health) == ("active", 4242, 200)
    assert state.report_age_s == 900
    assert state.server_gpu_mib == 8006
    assert state.report == _REPORT


def test_instance_state_of_a_stopped_instance() -> None:
    state = parse_instance_state(STOPPED)
    assert (state.active, state.main_pid, state.health, state.report) == (
        "inactive",
        None,
        None,
        None,
    )
    assert state.report_age_s is None and state.server_gpu_mib is None
    assert parse_instance_state([*STOPPED, "report={not json"]).report == {
        "status": "unreadable report"
    }
    with pytest.raises(FactProcessError):
        parse_instance_state(["something else"])


def test_status_table_and_json() -> None:
    inst = _config(alias="g3-chat").instances[0]
    rows = [
        StatusRow("box1", inst, "g3.gguf", parse_instance_state(SERVING)),
        StatusRow("box2", inst, "g3.gguf", parse_instance_state(STOPPED)),
        StatusRow("box3", error="unreachable: Could not connect (timed out)"),
    ]
    lines = status_table(rows).splitlines()
    assert lines[0].split() == [
        "host", "instance", "unit", "health", "model", "id", "model", "build", "smoke", "age",
        "tok/s", "accept", "GPU", "MiB",
    ]  # fmt: skip
    assert lines[1].split() == [
        "box1", "gemma3", "active", "200", "g3-chat", "g3.gguf", "b1-0c1e570", "pass", "15m",
        "41.3", "0.81", "8006",
    ]  # fmt: skip
    assert lines[2].split() == [
        "box2", "gemma3", "inactive", "down", "g3-chat", "g3.gguf", "-", "none", "-", "-", "-",
        "-",
    ]  # fmt: skip
    assert lines[3].split(None, 1) == ["box3", "unreachable: Could not connect (timed out)"]
    assert lines[3].index("unreachable") == lines[1].index("gemma3")
    assert [row.ok for row in rows] == [True, False, False]
    serving = rows[0].to_json()
    assert serving["smoke_age_seconds"] == 900 and serving["gpu_memory_mib"] == 8006
    assert serving["model_id"] == "g3-chat" and serving["ok"] is True
    assert rows[2].to_json() == {
        "host": "box3",
        "reachable": False,
        "error": "unreachable: Could not connect (timed out)",
    }


def test_a_failed_smoke_check_is_not_ok() -> None:
    failed = [*SERVING[:-1], "report=" + json.dumps({**_REPORT, "status": "fail"})]
    assert not StatusRow("box1", _config().instances[0], "g3.gguf", parse_instance_state(failed)).ok


@pytest.mark.parametrize(
    ("seconds", "text"), [(None, "-"), (59, "59s"), (60, "1m"), (7300, "2h"), (90000, "1d")]
)
def test_age(seconds: int | None, text: str) -> None:
    assert age(seconds) == text


# --- plan --data and placeholder checksums ------------------------------------------------------


def _override_data(*pairs: str) -> subprocess.CompletedProcess[str]:
    """In a child: pyinfra_cli monkey-patches the stdlib for gevent when imported."""
    code = (
        "import json, sys; from gemma4_fleet.cli import override_data, ConfigError\n"
        "try: print(json.dumps(override_data(sys.argv[1:])))\n"
        "except ConfigError as e: sys.exit(str(e))"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *pairs], capture_output=True, text=True, check=False
    )


def test_data_is_parsed_as_pyinfra_parses_it() -> None:
    parsed = _override_data(
        "a=true", "b=False", "c=8080", 'd={"min_tps": 50}', "e=plain", "f=x=y", "g="
    )
    assert json.loads(parsed.stdout) == {
        "a": True,
        "b": False,
        "c": 8080,
        "d": {"min_tps": 50},
        "e": "plain",
        "f": "x=y",
        "g": "",
    }
    refused = _override_data("novalue")
    assert refused.returncode == 1
    assert "--data novalue: expected KEY=VALUE" in refused.stderr


def test_placeholder_checksums_get_a_stand_in_and_a_warning() -> None:
    good = {"role": "target", "file": "t.gguf", "url": "http://m/t.gguf", "sha256": SHA}
    fill = {**good, "file": "d.gguf", "role": "drafter", "sha256": "FILL-IN: sha256sum d.gguf"}
    data, warnings = stand_in_checksums("box1", {"llama_models": {"t": good, "d": fill}})
    assert data["llama_models"]["t"] == good
    stand_in = data["llama_models"]["d"]["sha256"]
    assert re.fullmatch(r"[0-9a-f]{64}", stand_in)
    assert list(warnings) == [stand_in]
    assert warnings[stand_in].startswith(
        "host box1: llama_models.d.sha256: not a sha256 yet (got 'FILL-IN: sha256sum d.gguf')"
    )
    assert "the deploy refuses this host" in warnings[stand_in]


def _inventory(tmp_path: Path, gemma3_270m: Path, sha: str) -> Path:
    """An inventory of one host planned from host data alone (no group data, no SSH)."""
    data = {
        "llamacpp": {"git_url": "https://example.invalid/llama.cpp.git", "commit": COMMIT},
        "llamacpp_build": {"cuda": False},
        "llama_models": {
            "gemma-3-270m": {
                "role": "target",
                "file": "g3.gguf",
                "local_path": str(gemma3_270m),
                "sha256": sha,
            }
        },
        "llama_instances": [
            {"name": "gemma3", "target": "gemma-3-270m", "spec_type": "none", "ctx_size": 4096}
        ],
    }
    inventory = tmp_path / "inventory.py"
    inventory.write_text(f"hosts = [('box1', {data!r})]\n")
    return inventory


def _gemma4_fleet(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).with_name("gemma4-fleet")), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )


def test_plan_with_data_plans_what_pyinfra_data_deploys(tmp_path: Path, gemma3_270m: Path) -> None:
    inventory = _inventory(tmp_path, gemma3_270m, SHA)
    plain = _gemma4_fleet(tmp_path, "plan", str(inventory), "--json")
    assert plain.returncode == 0, plain.stderr
    (row,) = json.loads(plain.stdout)["hosts"]["box1"]["instances"]
    assert (row["ctx"], row["model_id"]) == (4096, "gemma-3-270m")

    instances = [
        {
            "name": "gemma3",
            "target": "gemma-3-270m",
            "spec_type": "none",
            "ctx_size": 2048,
            "alias": "tiny",
            "chat_template": "gemma",
        }
    ]
    changed = _gemma4_fleet(
        tmp_path,
        "plan",
        str(inventory),
        "--json",
        "--data",
        f"llama_instances={json.dumps(instances)}",
    )
    assert changed.returncode == 0, changed.stderr
    (row,) = json.loads(changed.stdout)["hosts"]["box1"]["instances"]
    assert (row["ctx"], row["model_id"]) == (2048, "tiny")
    assert row["chat_template"] == {"source": "builtin", "name": "gemma", "engine": "legacy"}
    assert "warning" not in changed.stderr


def test_plan_of_placeholder_checksums_warns_and_shows_the_table(
    tmp_path: Path, gemma3_270m: Path
) -> None:
    inventory = _inventory(tmp_path, gemma3_270m, "FILL-IN: sha256sum g3.gguf")
    plan = _gemma4_fleet(tmp_path, "plan", str(inventory))
    assert plan.returncode == 0, plan.stderr
    assert plan.stdout.startswith("host box1 (MiB)")
    assert "gemma3" in plan.stdout
    warnings = [line for line in plan.stderr.splitlines() if "warning" in line]
    assert warnings[0] == (
        "gemma4-fleet: warning: host box1: llama_models.gemma-3-270m.sha256: not a sha256 yet "
        "(got 'FILL-IN: sha256sum g3.gguf'); planned from the file's header, but the deploy "
        "refuses this host until it is filled in (sha256sum g3.gguf)"
    )
    # the chat template warning of the same model comes with it
    assert any("chat_template" in w for w in warnings[1:]), plan.stderr


@pytest.fixture
def file_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "srv"
    root.mkdir()
    handler = partial(SimpleHTTPRequestHandler, directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()
    server.server_close()


def test_a_download_runs_with_progress_and_says_why_it_failed(
    tmp_path: Path, file_server: tuple[str, Path]
) -> None:
    url, root = file_server
    (root / "t.gguf").write_bytes(b"GGUF good")
    dest = tmp_path / "models" / "t.gguf"
    model = ModelFile(
        role="target",
        file="t.gguf",
        url=f"{url}/t.gguf",
        sha256=hashlib.sha256(b"GGUF good").hexdigest(),
    )
    host = RecordedHost(fact(ModelFileStamp, None, path=str(dest)))
    (command,) = run_op(g4f.model_file, host, dest=str(dest), model=model)
    assert isinstance(command, ProgressCommand)
    assert (command.what, command.log_path) == ("download t.gguf", f"{dest}.partial.progress")
    done = run_here(command)
    assert done.returncode == 0, done.stderr
    assert dest.read_bytes() == b"GGUF good"
    assert not Path(command.log_path).exists()  # the meter is removed with the download

    gone = model.model_copy(
        update={"url": f"{url}/gone.gguf", "sha256": hashlib.sha256(b"new").hexdigest()}
    )
    (command,) = run_op(g4f.model_file, host, dest=str(dest), model=gone)
    failed = run_here(command)
    assert failed.returncode == 1
    assert failed.stderr.startswith("curl: (22)") and "404" in failed.stderr, failed.stderr
    assert dest.read_bytes() == b"GGUF good"  # the placed model stays
