"""Bad input, one row each: a clear error naming host and field, and no operation added.

Every row patches a good host config and runs the deploy's own entry (`gemma4_mtp`, through
pyinfra's `add_deploy`) on an in-memory inventory of two hosts that is never connected: `gpu-7`
gets the patch, `gpu-8` stays good. Facts are recorded ones (nvidia-smi of a 4090 + 3090 box,
`getent passwd`), parsed by the real facts; any other fact asked for fails the test, since
nothing past validation may run.
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pyinfra.api import Config, Inventory, State
from pyinfra.api.deploy import add_deploy
from pyinfra.api.host import Host

from gemma4_fleet.config import OWNED_FLAGS, ConfigError, parse_host_config
from gemma4_fleet.deploys import gemma4_mtp, host_setup
from gemma4_fleet.facts import NvidiaGpus, ServiceAccount
from gemma4_fleet.host_checks import SERVICE_ACCOUNT_MARK, account_problems, parse_passwd
from gemma4_fleet.pipeline import HostSetup
from gemma4_fleet.synthetic import write_pair
from tests.unit.test_config import group_all
from tests.unit.test_facts import TWO_GPUS

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
HELP = (ROOT / "tests/unit/data/llama-server-help-0c1e570.txt").read_text()
HOST, OTHER = "gpu-7", "gpu-8"
UUID0 = TWO_GPUS[0].split(", ")[1]  # the 4090's UUID: GPU 0 spelled differently
DELETE = object()


@dataclass(frozen=True)
class Row:
    patch: dict[str, Any]  # "key.sub[0].field": value over the good host data
    field: str  # the host-data field the message must name
    says: str  # a fragment of the message
    gpus: tuple[str, ...] = tuple(TWO_GPUS)  # recorded nvidia-smi lines
    account: str | None = None  # recorded `getent passwd <service user>`; None: no such user
    inventory: str = "plain"  # "twice": listed twice in its group; "alias": a 2nd name, same box
    tags: tuple[str, ...] = field(default=())


def row(patch: dict[str, Any], field: str, says: str, **kw: Any) -> Row:
    return Row(patch, field, says, **kw)


I = "llama_instances[gemma4]"  # noqa: E741 - the instance every row is about
LLAMA = "llama:x:1000:1000:Jane Doe:/home/llama:/bin/bash"
ROWS_B = {"name": "b", "target": "g4", "drafter": "g4-asst", "gpu": "1"}  # a second instance

ROWS: dict[str, Row] = {
    # --- 1. managed directories are dedicated, plain, absolute --------------------------------
    "models dir /": row({"llama_models_dir": "/"}, "llama_models_dir", "shared system directory"),
    "models dir /var/lib": row(
        {"llama_models_dir": "/var/lib"}, "llama_models_dir", "/var/lib is a shared system"
    ),
    "models dir /var/lib/ (slash)": row(
        {"llama_models_dir": "/var/lib/"}, "llama_models_dir", "/var/lib is a shared system"
    ),
    "models dir //usr//": row(
        {"llama_models_dir": "//usr//"}, "llama_models_dir", "/usr is a shared system"
    ),
    "install root /opt": row(
        {"llamacpp_build.install_root": "/opt"}, "llamacpp_build.install_root", "/opt is a shared"
    ),
    "install root /usr/local": row(
        {"llamacpp_build.install_root": "/usr/local"},
        "llamacpp_build.install_root",
        "/usr/local is a shared",
    ),
    "ccache dir /home": row(
        {"llamacpp_build.ccache_dir": "/home"}, "llamacpp_build.ccache_dir", "/home is a shared"
    ),
    "models dir /etc/systemd/system": row(
        {"llama_models_dir": "/etc/systemd/system"}, "llama_models_dir", "shared system"
    ),
    "models dir = tool state": row(
        {"llama_models_dir": "/var/lib/gemma4-fleet"}, "llama_models_dir", "shared system"
    ),
    "models dir under /run": row(
        {"llama_models_dir": "/run/models"}, "llama_models_dir", "kernel or per-boot directory"
    ),
    "models dir with a space": row(
        {"llama_models_dir": "/srv/my models"}, "llama_models_dir", "need quoting"
    ),
    "models dir with %": row({"llama_models_dir": "/srv/m%i"}, "llama_models_dir", "'%'"),
    "models dir with $": row({"llama_models_dir": "/srv/$HOME"}, "llama_models_dir", "'$'"),
    "models dir with ;": row({"llama_models_dir": "/srv/a;rm -rf x"}, "llama_models_dir", "';'"),
    "models dir with a quote": row({"llama_models_dir": '/srv/"q'}, "llama_models_dir", "'\"'"),
    "models dir with a newline": row(
        {"llama_models_dir": "/srv/a\nb"}, "llama_models_dir", r"'\n'"
    ),
    "models dir with ..": row(
        {"llama_models_dir": "/srv/models/../../etc"}, "llama_models_dir", "'..' components"
    ),
    "models dir relative": row(
        {"llama_models_dir": "models"}, "llama_models_dir", "not an absolute path"
    ),
    "install root = models dir": row(
        {"llamacpp_build.install_root": "/srv/llama", "llama_models_dir": "/srv/llama"},
        "llamacpp_build.install_root",
        "/srv/llama is also llama_models_dir",
    ),
    "models dir inside install root": row(
        {"llama_models_dir": "/opt/llama.cpp/models"},
        "llamacpp_build.install_root",
        "contains llama_models_dir",
    ),
    # --- 2. the service account is the tool's own ----------------------------------------------
    "service user root": row({"llama_service_user": "root"}, "llama_service_user", "of the system"),
    "service user nobody": row({"llama_service_user": "nobody"}, "llama_service_user", "system"),
    "service user www-data": row(
        {"llama_service_user": "www-data"}, "llama_service_user", "other software"
    ),
    "service user systemd-*": row(
        {"llama_service_user": "systemd-oom"}, "llama_service_user", "of the system"
    ),
    "service user pattern": row({"llama_service_user": "Llama"}, "llama_service_user", "pattern"),
    "service user exists (not ours)": row(
        {}, "llama_service_user", "not created by gemma4-fleet", account=LLAMA
    ),
    "service user with uid 0": row(
        {}, "llama_service_user", "uid 0", account="llama:x:0:0::/root:/bin/sh"
    ),
    # --- 3. typed settings cannot be undone by extra_args ---------------------------------------
    **{
        f"extra_args {list(args)}": row(
            {"llama_server.extra_args": list(args)}, f"{I}.extra_args", says
        )
        for args, says in [
            (("--port", "9090"), "--port is owned by typed config: set port instead"),
            (("--port=9090",), "set port instead"),
            (("--host", "0.0.0.0"), "set host instead"),
            (("-c", "4096"), "set ctx_size instead"),
            (("--ctx-size=1048576",), "set ctx_size instead"),
            (("-np", "4"), "set parallel instead"),
            (("--parallel", "4"), "set parallel instead"),
            (("-kvu",), "set parallel instead"),
            (("-m", "/srv/other.gguf"), "set target instead"),
            (("-hf", "ggml-org/gemma-3-270m"), "set target instead"),
            (("-md", "/srv/d.gguf"), "set drafter instead"),
            (("-ctk", "f32"), "set cache_type_k instead"),
            (("-ctvd", "f16"), "set cache_type_v_draft instead"),
            (("--spec-type", "none"), "set spec_type instead"),
            (("--draft-max", "8"), "set draft_n_max instead"),
            (("--spec-draft-n-max=8",), "set draft_n_max instead"),
            (("-td", "4"), "the speculative recipe is typed"),
            (("--spec-ngram-size-n", "3"), "the speculative recipe is typed"),
            (("-ngl", "0"), "set gpu_layers instead"),
            (("-ngld", "0"), "set draft_gpu_layers instead"),
            (("-b", "8192"), "default batch sizes"),
            (("-ub", "4096"), "default batch sizes"),
            (("-fa", "off"), "set flash_attn instead"),
            (("--fit", "on"), "set fit instead"),
            (("-t", "8"), "set threads instead"),
            (("--no-jinja",), "set jinja instead"),
            (("-nocb",), "set cont_batching instead"),
            (("--api-key", "s3cret"), "API keys never go into argv"),
            (("--webui",), "always sets --offline --metrics --no-webui"),
            (("-dev", "CUDA1"), "set gpu instead"),
            (("-ts", "1,1"), "set gpu instead"),
            (("-mg", "1"), "set gpu instead"),
            (("--alias", "x"), "set alias instead"),
            (("--port 9090",), "one argument per list item"),
        ]
    },
    "extra_args in an instance": row(
        {"llama_instances[0].extra_args": ["--verbose", "--parallel", "2"]},
        f"{I}.extra_args",
        "set parallel instead",
    ),
    # --- 4. GPUs by identity; only the host's own ------------------------------------------------
    "instance on a GPU the host lacks": row(
        {"llama_instances[0].gpu": "7"}, f"{I}.gpu", "no GPU '7' on the host (nvidia-smi lists: 0"
    ),
    "instance on an unknown UUID": row(
        {"llama_instances[0].gpu": "GPU-00000000-0000-0000-0000-000000000000"},
        f"{I}.gpu",
        "no GPU 'GPU-00000000",
    ),
    "service on a GPU the host lacks": row(
        {"gpu_services[0].gpu": "3"}, "gpu_services[whisper.service].gpu", "no GPU '3'"
    ),
    "budget for a GPU the host lacks": row(
        {"gpu_memory_mib": {"5": 8000}}, "gpu_memory_mib.5", "no GPU '5'"
    ),
    "service on llama's GPU by UUID": row(
        {"gpu_services[0].gpu": UUID0},
        "gpu_services[whisper.service].gpu",
        "is GPU 0, which llama-server uses",
    ),
    "two budgets for one GPU": row(
        {"gpu_memory_mib": {"0": 20000, UUID0: 22000}},
        f"gpu_memory_mib.{UUID0}",
        "are the same GPU; give it one budget",
    ),
    "two auto instances on one GPU": row(
        {
            "llama_server.ctx_size": "auto",
            "llama_instances[1]": {**ROWS_B, "gpu": UUID0, "port": 8081},
        },
        "llama_instances[b].ctx_size",
        "also sizes with auto",
    ),
    "gpu not an index or UUID": row(
        {"llama_instances[0].gpu": "gpu0"}, f"{I}.gpu", "'gpu0' is neither a GPU index"
    ),
    "gpu with shell": row({"llama_instances[0].gpu": "0; rm -rf /"}, f"{I}.gpu", "neither"),
    "service gpu not a UUID": row(
        {"gpu_services[0].gpu": "GPU-xyz"}, "gpu_services[0].gpu", "or MIG UUID"
    ),
    "budget key not a GPU": row(
        {"gpu_memory_mib": {"first": 8000}}, "gpu_memory_mib.first", "neither a GPU index"
    ),
    "index on a host without GPUs": row(
        {"gpu_services": []}, f"{I}.gpu", "on the host (nvidia-smi lists: none", gpus=()
    ),
    "instance UUID on a host without GPUs": row(
        {"gpu_services": [], "llama_instances[0].gpu": UUID0},
        f"{I}.gpu",
        "on the host (nvidia-smi lists: none",
        gpus=(),
    ),
    "gpu with cuda off": row(
        {"llamacpp_build.cuda": False}, f"{I}.gpu", "set but llamacpp_build.cuda is off"
    ),
    # --- 5. model metadata: a dead source is an error, not an old cache entry -------------------
    "model url that does not answer": row(
        {"llama_models.g4.local_path": DELETE, "llama_models.g4.url": "http://127.0.0.1:9/g.gguf"},
        "llama_models.g4.url",
        "unreachable",
    ),
    "model size that does not match": row(
        {"llama_models.g4.size": 1}, "llama_models.g4.local_path", "size says 1"
    ),
    "model local_path missing": row(
        {"llama_models.g4.local_path": "/nonexistent/g4.gguf"},
        "llama_models.g4.local_path",
        "cannot read",
    ),
    # --- 6. slips -------------------------------------------------------------------------------
    "typo llama_instance": row(
        {"llama_instance": []}, "llama_instance", "did you mean llama_instances?"
    ),
    "typo llama_model": row({"llama_model": {}}, "llama_model", "did you mean llama_models?"),
    "typo gpu_memory": row({"gpu_memory": {}}, "gpu_memory", "did you mean gpu_memory_mib?"),
    "typo llama_servers": row({"llama_servers": {}}, "llama_servers", "did you mean llama_server?"),
    "typo models_dir": row(
        {"models_dir": "/srv/m"}, "models_dir", "did you mean llama_models_dir?"
    ),
    "unknown llama_ key": row({"llama_colour": "red"}, "llama_colour", "not a gemma4-fleet key"),
    "host listed twice": row({}, "inventory", "listed twice in group gpu_hosts", inventory="twice"),
    "two names, one machine": row(
        {}, "inventory", "the same machine (gpu-7) as host gpu-7-alias", inventory="alias"
    ),
    "sha256 not hex": row(
        {"llama_models.g4.sha256": "FILL-IN"}, "llama_models.g4.sha256", "pattern"
    ),
    # --- the rules the other tests already had -------------------------------------------------
    "short commit": row({"llamacpp.commit": "0c1e570"}, "llamacpp.commit", "pattern"),
    "unknown cache type": row({"llama_server.cache_type_k": "q9_0"}, f"{I}.cache_type_k", "q8_0"),
    "port out of range": row({"llama_server.port": 70000}, f"{I}.port", "65535"),
    "quantized V without flash attention": row(
        {"llama_server.flash_attn": "off", "llama_server.cache_type_v": "q8_0"},
        I,
        "needs flash_attn on",
    ),
    "cmake flag with a space": row(
        {"llamacpp_build.cmake_flags": ["-DX=a b"]}, "llamacpp_build.cmake_flags[0]", "pattern"
    ),
    "model with neither url nor local_path": row(
        {"llama_models.g4.local_path": DELETE}, "llama_models.g4", "exactly one of url"
    ),
    "no instances": row({"llama_instances": []}, "llama_instances", "at least 1"),
    "unknown server field": row({"llama_server.bogus": 1}, f"{I}.bogus", "Extra inputs"),
    "target not in llama_models": row(
        {"llama_instances[0].target": "nope"}, f"{I}.target", "'nope' is not in llama_models"
    ),
    "roles swapped": row(
        {"llama_instances[0].target": "g4-asst", "llama_instances[0].drafter": "g4"},
        f"{I}.target",
        "has role drafter, used as target",
    ),
    "port used twice": row(
        {"llama_instances[1]": ROWS_B},
        "llama_instances[b].port",
        "port 8080 is used twice",
    ),
    "name used twice": row(
        {"llama_instances[1]": {**ROWS_B, "name": "gemma4", "port": 8081}},
        f"{I}.name",
        "used twice",
    ),
    "parallel with MTP": row({"llama_server.parallel": 4}, I, "slower than MTP off"),
    "service on llama's GPU": row(
        {"gpu_services[0].gpu": "0"}, "gpu_services[whisper.service].gpu", "share_gpu_with_llama"
    ),
    "service listed twice": row(
        {"gpu_services[1]": {"unit": "whisper.service", "gpu": "1"}},
        "gpu_services[whisper.service]",
        "listed twice",
    ),
    "drafter without spec": row({"llama_server.spec_type": "none"}, I, "spec_type is none"),
    "draft min above max": row(
        {"llama_server.draft_n_min": 5}, I, "draft_n_min is larger than draft_n_max"
    ),
    "ctx above n_ctx_train": row(
        {"llama_server.ctx_size": 1 << 24}, f"{I}.ctx_size", "above n_ctx_train"
    ),
    "budget below the weights": row({"gpu_memory_mib": {"0": 600}}, "gpu_memory_mib.0", "leaves"),
    "smoke schedule with a ;": row(
        {"llama_smoke": {"on_calendar": "hourly; reboot"}}, "llama_smoke.on_calendar", "pattern"
    ),
    "llama_server not a dict": row({"llama_server": ["x"]}, "llama_server", "must be a dict"),
}


# --- the harness -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory, gemma3_270m: Path) -> dict[str, Any]:
    """A host config that deploys: the synthetic Gemma 4 pair on GPU 0, whisper on GPU 1."""
    pair = write_pair(tmp_path_factory.mktemp("pair"), tokenizer_from=gemma3_270m)
    model = {"sha256": "ab" * 32}
    return {
        "llamacpp": group_all()["llamacpp"],
        "llamacpp_build": {"cuda": True},
        "llama_server": {"ctx_size": 8192},
        "llama_models": {
            "g4": {**model, "role": "target", "file": "g4.gguf", "local_path": str(pair.target)},
            "g4-asst": {
                **model,
                "role": "drafter",
                "file": "g4-asst.gguf",
                "local_path": str(pair.drafter),
            },
        },
        "llama_instances": [{"name": "gemma4", "target": "g4", "drafter": "g4-asst", "gpu": "0"}],
        "gpu_services": [{"unit": "whisper.service", "gpu": "1"}],
    }


def patched(data: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    data = copy.deepcopy(data)
    for path, value in patch.items():
        *parents, last = re.findall(r"[^.\[\]]+", path)
        node: Any = data
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        if isinstance(node, list) and int(last) == len(node):
            node.append(value)  # "llama_instances[1]": a second instance
        elif isinstance(node, list):
            node[int(last)] = value
        elif value is DELETE:
            del node[last]
        else:
            node[last] = value
    return data


@pytest.fixture
def recorded_facts(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """Host.get_fact answers from recordings, parsed by the real facts; nothing else is asked."""
    recorded: dict[str, Any] = {"gpus": TWO_GPUS, "account": None}  # of HOST; OTHER: good

    def get_fact(self: Host, fact: type, *args: Any, **kwargs: Any) -> Any:
        if fact is NvidiaGpus:
            return NvidiaGpus().process(list(recorded["gpus"] if self.name == HOST else TWO_GPUS))
        if fact is ServiceAccount:
            line = recorded["account"] if self.name == HOST else None
            return ServiceAccount().process([line or "G4F-MISSING", "G4F-MISSING"])
        raise AssertionError(f"{fact.__name__} asked before validation finished")

    monkeypatch.setattr(Host, "get_fact", get_fact)
    yield recorded


def make_state(good: dict[str, Any], bad: dict[str, Any], inventory: str) -> State:
    """`HOST` with `bad`, `OTHER` with `good` data, in group gpu_hosts; never connected."""
    hosts: list[Any] = [(HOST, bad), (OTHER, good)]
    if inventory == "twice":
        hosts.append(HOST)
    if inventory == "alias":
        hosts.append(("gpu-7-alias", {**good, "ssh_hostname": HOST}))
    names = list(dict.fromkeys(h if isinstance(h, str) else h[0] for h in hosts))
    state = State(Inventory((names, {}), gpu_hosts=(hosts, {})), Config())
    for host in state.inventory:
        state.activate_host(host)
    return state


def deploy_error(state: State) -> str:
    """Run the deploy's entry on every host; it must refuse before adding any operation."""
    with pytest.raises(ConfigError) as exc:
        add_deploy(state, gemma4_mtp)
    assert state.get_op_order() == []
    assert all(not ops for ops in state.ops.values())
    return str(exc.value)


@pytest.mark.parametrize("name", list(ROWS))
def test_bad_input(
    name: str, good: dict[str, Any], recorded_facts: dict[str, Any], tmp_path: Path
) -> None:
    r = ROWS[name]
    recorded_facts.update(gpus=r.gpus, account=r.account)
    message = deploy_error(make_state(good, patched(good, r.patch), r.inventory))
    assert f"host {HOST}: {r.field}" in message, message
    assert r.says in message, message
    assert f"host {OTHER}:" not in message  # the good host is not blamed
    assert "Traceback" not in message


def test_the_table_is_large_enough_and_the_good_config_deploys(
    good: dict[str, Any], recorded_facts: dict[str, Any]
) -> None:
    assert len(ROWS) >= 60
    with state_context(make_state(good, good, "plain")):
        setups = {name: host_setup_of(name) for name in (HOST, OTHER)}
    assert setups[HOST].plan.ctx_for("gemma4") == 8192
    assert setups[OTHER].gpu_uuid("1") == TWO_GPUS[1].split(", ")[1]


def test_every_hosts_errors_come_together(
    good: dict[str, Any], recorded_facts: dict[str, Any]
) -> None:
    other = patched(good, {"llama_service_user": "root", "llama_instance": []})
    message = deploy_error(make_state(other, patched(good, {"llama_server.port": 0}), "plain"))
    assert f"host {OTHER}: llama_instance: not a gemma4-fleet key" in message  # typo and field
    assert message.startswith("invalid configuration")
    assert f"host {OTHER}: llama_service_user" in message
    assert f"host {HOST}: {I}.port" in message


def test_slips_that_are_accepted(good: dict[str, Any], recorded_facts: dict[str, Any]) -> None:
    """Upper-case sha256, a trailing slash, our own marked account, a UUID for GPU 0's budget."""
    upper = patched(
        good,
        {
            "llama_models.g4.sha256": "AB" * 32,
            "llama_models_dir": "/srv/llama-models/",
            "gpu_memory_mib": {UUID0: 20000},
            "ssh_user": "root",  # pyinfra's own keys are not ours to judge
        },
    )
    config = parse_host_config(HOST, upper)
    assert config.models["g4"].sha256 == "ab" * 32
    assert config.models_dir == "/srv/llama-models"
    recorded_facts["account"] = f"llama:x:998:998:{SERVICE_ACCOUNT_MARK}:/nonexistent:/bin/false"
    state = make_state(good, upper, "plain")
    with state_context(state):
        plan = host_setup_of(HOST).plan
    assert plan.instance_plan("gemma4").budget_source == f"gpu_memory_mib.{UUID0}"


def help_lines(text: str) -> Iterator[set[str]]:
    """The spellings of each option of a recorded --help (one line's aliases together)."""
    for line in text.splitlines():
        if line.startswith("-") and not line.startswith("-----"):
            names = re.split(r"(?<![,\s])\s{2,}", line, maxsplit=1)[0]
            yield set(re.findall(r"(?:^|(?<=[\s,]))(--?[A-Za-z][A-Za-z0-9.-]*)", names))


def test_owned_flags_cover_every_spelling_of_their_help_line() -> None:
    """An owned flag's aliases (one line of the recorded --help) are all owned too, every
    speculative option is owned, and every owned flag exists at the pinned commit."""
    owned = {flag for flags in OWNED_FLAGS.values() for flag in flags}
    lines = list(help_lines(HELP))
    for spellings in lines:
        if spellings & owned:
            assert spellings <= owned, f"{sorted(spellings - owned)} not owned"
    assert sum(1 for spellings in lines if spellings & owned) >= 40
    speculative = HELP.split("----- speculative params -----")[1].split("\n-----")[0]
    assert set().union(*help_lines(speculative)) <= owned
    assert owned <= set().union(*lines), sorted(owned - set().union(*lines))


def host_setup_of(name: str) -> HostSetup:
    """The deploy's own setup of one host (inside a state context)."""
    from pyinfra.context import ctx_host, ctx_state

    with ctx_host.use(ctx_state.get().inventory.get_host(name)):
        return host_setup()


def state_context(state: State) -> Any:
    from pyinfra.context import ctx_state

    return ctx_state.use(state)


@pytest.mark.parametrize(
    ("files", "says"),
    [
        ({"inv.py": 'hosts = [("a", {"llama_instances": [}])]\n'}, "inv.py:1: SyntaxError: "),
        ({"inv.py": "x = 1\nhosts = [undefined]\n"}, "inv.py:2: NameError: name 'undefined'"),
        ({"inv.py": "hosts = []\n"}, "inventory inv.py: no hosts"),
        (
            {"inv.py": 'hosts = ["a"]\n', "group_data/all.py": "llamacpp = {\n"},
            "group_data/all.py:1: SyntaxError: '{' was never closed",
        ),
        (
            {"inv.py": 'hosts = ["a"]\n', "group_data/hosts.py": "a = 1\nb = 1 / 0\n"},
            "group_data/hosts.py:2: ZeroDivisionError: division by zero",
        ),
    ],
)
def test_broken_inventory_files_give_one_line(
    tmp_path: Path, files: dict[str, str], says: str
) -> None:
    """`gemma4-fleet plan` loads the inventory as pyinfra does: a broken file is one line."""
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    run = subprocess.run(
        [sys.executable, "-m", "gemma4_fleet.cli", "plan", "inv.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 1
    assert run.stderr.startswith(f"gemma4-fleet: {says}"), run.stderr
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert "Traceback" not in run.stderr + run.stdout


def test_the_account_fact_and_decision_on_this_machine(good: dict[str, Any]) -> None:
    """ServiceAccount's real command (getent) here: root is found and refused, an absent name is
    None and accepted, our marked account is accepted."""

    def looked_up(user: str) -> str | None:
        command = ServiceAccount().command(user).get_raw_value()
        out = subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=True)
        return ServiceAccount().process(out.stdout.splitlines())[0]

    config = parse_host_config(HOST, good)
    root = looked_up("root")
    assert root is not None and root.startswith("root:x:0:0:")
    (problem,) = account_problems(config, parse_passwd(root))
    assert problem == ("llama_service_user", "'llama' has uid 0 (root); use the tool's own account")
    assert looked_up("g4f-nobody-has-this-name") is None
    assert account_problems(config, None) == []
    ours = parse_passwd(f"llama:x:998:998:{SERVICE_ACCOUNT_MARK},,,:/nonexistent:/usr/sbin/nologin")
    assert account_problems(config, ours) == []
