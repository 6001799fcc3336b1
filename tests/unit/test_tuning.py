"""Tuned profiles: loading, applying to host data (host data wins), bad profiles named by file and
field, the measurement spec for tune.py, and results back into a profile and table."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from gemma4_fleet import tuning
from gemma4_fleet.config import ConfigError, parse_host_config
from gemma4_fleet.pipeline import FleetConfigError, host_setups
from gemma4_fleet.render import smoke_argv
from gemma4_fleet.vram_plan import meta_for_model
from tests.unit.test_config import SHA

pytestmark = pytest.mark.unit
COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"


def _data(gemma3_270m: Path, **inst: Any) -> dict[str, Any]:
    model = {"file": "m.gguf", "sha256": SHA, "local_path": str(gemma3_270m)}
    return {
        "llamacpp": {"git_url": "https://example.invalid/l.git", "commit": COMMIT},
        "llama_server": {},
        "llama_models": {"g3": {"role": "target", **model}, "d3": {"role": "drafter", **model}},
        "llama_instances": [
            {
                "name": "gemma3",
                "target": "g3",
                "drafter": "d3",
                "spec_type": "draft-simple",
                "gpu": "0",
                "ctx_size": 8192,
                **inst,
            }
        ],
        "gpu_memory_mib": {"0": 4000},
    }


def _write(folder: Path, host: str, body: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{host}.json"
    path.write_text(json.dumps(body))
    return path


def _profile(**settings: Any) -> dict[str, Any]:
    return {
        "host": "box",
        "format": 1,
        "instances": {
            "gemma3": {
                "settings": settings,
                "baseline": {"tokens_per_second": 50.5, "acceptance": 0.75},
            }
        },
    }


class _Host:
    """What the pipeline reads of a pyinfra inventory host: its name, groups and merged data."""

    def __init__(self, name: str, data: dict[str, Any]) -> None:
        self.name = name
        self.groups: list[str] = []
        self.data = SimpleNamespace(get=data.get, dict=lambda: dict(data))


def test_profile_applies_where_host_data_is_silent(
    gemma3_270m: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write(tmp_path, "box", _profile(kv_order=["q8_0", "f16"], draft_n_max=5))
    data = tuning.apply_profile("box", _data(gemma3_270m), tmp_path)
    inst = parse_host_config("box", data).instances[0]
    assert (inst.draft_n_max, inst.kv_order) == (5, ["q8_0", "f16"])
    assert (inst.baseline_tps, inst.baseline_acceptance) == (50.5, 0.75)
    # host data wins: an explicit draft_n_max (instance entry or llama_server) stays
    data = tuning.apply_profile("box", _data(gemma3_270m, draft_n_max=2), tmp_path)
    assert parse_host_config("box", data).instances[0].draft_n_max == 2
    raw = _data(gemma3_270m)
    raw["llama_server"] = {"draft_n_max": 1}
    assert (
        parse_host_config("box", tuning.apply_profile("box", raw, tmp_path))
        .instances[0]
        .draft_n_max
        == 1
    )
    # through the pipeline (G4F_TUNED_DIR): the plan takes the measured order; smoke gets the
    # baseline
    monkeypatch.setenv("G4F_TUNED_DIR", str(tmp_path))
    setup = host_setups([_Host("box", _data(gemma3_270m))], None, meta_for=meta_for_model)["box"]
    row = setup.plan.instance_plan("gemma3")
    assert row.cache_types[:2] == ("q8_0", "q8_0") and "measured order" in row.kv_reason
    argv = smoke_argv(setup.config, setup.config.instances[0])
    tail = argv[argv.index("--baseline-tps") :]
    assert tail == [
        "--baseline-tps",
        "50.5",
        "--baseline-acceptance",
        "0.75",
        "--regression",
        "0.8",
    ]
    untuned = host_setups([_Host("box", _data(gemma3_270m))], None, tuned=False)["box"]
    assert untuned.config.instances[0].draft_n_max == 3
    assert "--baseline-tps" not in smoke_argv(untuned.config, untuned.config.instances[0])


def test_mtp_off_drops_the_drafter(gemma3_270m: Path, tmp_path: Path) -> None:
    _write(tmp_path, "box", _profile(spec_type="none"))
    data = _data(gemma3_270m)
    del data["llama_instances"][0]["spec_type"]  # the default, draft-mtp
    inst = parse_host_config("box", tuning.apply_profile("box", data, tmp_path)).instances[0]
    assert (inst.spec_type, inst.drafter) == ("none", None)
    # an explicit spec_type wins over the profile
    inst = parse_host_config(
        "box", tuning.apply_profile("box", _data(gemma3_270m), tmp_path)
    ).instances[0]
    assert (inst.spec_type, inst.drafter) == ("draft-simple", "d3")


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (_profile(draft_len=4), "box.json: instances.gemma3.settings.draft_len: Extra inputs"),
        ({**_profile(), "host": "other"}, "box.json: host: the profile is for 'other'"),
        ({**_profile(), "colour": 1}, "box.json: colour: Extra inputs are not permitted"),
        (_profile(kv_order=["q9_0"]), "box.json: instances.gemma3.settings.kv_order.0: Input"),
        (
            {"host": "box", "instances": {"ghost": {}}},
            "box.json: instances.ghost: the host has no llama_instances entry named 'ghost'",
        ),
    ],
)
def test_bad_profiles_name_file_and_field(
    gemma3_270m: Path, tmp_path: Path, body: dict[str, Any], words: str
) -> None:
    _write(tmp_path, "box", body)
    with pytest.raises(ConfigError) as err:
        tuning.apply_profile("box", _data(gemma3_270m), tmp_path)
    message = str(err.value)
    assert message.startswith("host box: ") and words in message, message


def test_a_profile_that_no_longer_fits_the_plan_is_named(
    gemma3_270m: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only f16 in the measured order, and a budget f16 cannot meet at 32768 (q8_0 could):
    # the refusal names the profile and its field.
    _write(tmp_path, "box", _profile(kv_order=["f16"]))
    monkeypatch.setenv("G4F_TUNED_DIR", str(tmp_path))
    data = _data(gemma3_270m, ctx_size=32768)
    data["gpu_memory_mib"] = {"0": 1100}
    with pytest.raises(FleetConfigError) as err:
        host_setups([_Host("box", data)], None)
    (line,) = err.value.errors
    assert line.startswith("host box: ")
    assert f"tuned settings from {tmp_path}/box.json: instances.gemma3.settings: " in line
    assert "kv_order ['f16']" in line and "rerun gemma4-fleet tune" in line


def test_spec_renders_every_candidate_from_the_instance(
    gemma3_270m: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("G4F_TUNED_DIR", str(tmp_path))
    setup = host_setups([_Host("box", _data(gemma3_270m))], None)["box"]
    inst = setup.config.instances[0]
    spec = tuning.instance_spec(
        setup.config,
        setup.plan,
        inst,
        inst,
        kv_types=["f16", "q8_0"],
        stop_service=True,
        gpu_uuid="GPU-1",
        prompts=tuning.read_prompts(None),
        n_predict=32,
        reps=1,
        depth=None,
        margin=0.05,
    )
    labels = [c["label"] for c in spec["single"]]
    assert labels == ["none", "mtp-1", "mtp-2", "mtp-3", "mtp-4", "mtp-5", "mtp-6"]
    none, mtp4 = spec["single"][0]["argv"], spec["single"][4]["argv"]
    assert "--model-draft" not in none and "--spec-type" not in none
    assert mtp4[mtp4.index("--spec-draft-n-max") + 1] == "4"
    for flag in ("--cache-type-k", "--cache-type-v", "--cache-type-k-draft"):
        assert mtp4[mtp4.index(flag) + 1] == "{kv}"
    assert mtp4[mtp4.index("--port") + 1] == "{port}"
    assert mtp4[mtp4.index("--host") + 1] == "127.0.0.1"
    assert mtp4[mtp4.index("--ctx-size") + 1] == "8192"
    recipe = spec["recipe"]["argv"]
    assert recipe[recipe.index("--cache-type-k") + 1] == "q8_0"
    assert recipe[recipe.index("--spec-draft-n-max") + 1] == "3"
    assert spec["recipe"]["single_label"] == "mtp-3" and spec["parallel"] is None
    assert spec["incumbent"] == {"single": "mtp-3", "kv": "f16"}
    assert spec["bench_argv"][spec["bench_argv"].index("-d") + 1] == "4096"  # ctx / 2
    assert spec["env"] == {"CUDA_VISIBLE_DEVICES": "GPU-1"} and spec["stop_service"] is True
    assert [p["name"] for p in spec["prompts"]] == ["code", "prose", "structured"]
    assert len(spec["baseline_prompts"]) == 3 and spec["baseline_n_predict"] == 128


def test_parallel_candidates_when_the_instance_asks_for_slots(
    gemma3_270m: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("G4F_TUNED_DIR", str(tmp_path))
    data = _data(gemma3_270m, parallel=4)
    setup = host_setups([_Host("box", data)], None)["box"]
    inst = setup.config.instances[0]
    spec = tuning.instance_spec(
        setup.config, setup.plan, inst, inst, kv_types=["f16"], stop_service=False,
        gpu_uuid=None, prompts=tuning.read_prompts(None), n_predict=32, reps=1, depth=64,
        margin=0.05,
    )  # fmt: skip
    par = spec["parallel"]
    assert par["n"] == 4
    assert [c["label"] for c in par["candidates"]] == ["np4-none", "np4-mtp", "np1-mtp"]
    np4 = par["candidates"][1]["argv"]
    assert np4[np4.index("--parallel") + 1] == "4"
    assert np4[np4.index("--spec-draft-n-max") + 1] == "{draft_n}"


RESULT: dict[str, Any] = {
    "status": "ok",
    "kv": {"f16": 40.0, "q8_0": 35.0},
    "kv_order": ["f16", "q8_0"],
    "single": {
        "none": {"tps": 30.0, "acceptance": None},
        "mtp-4": {"tps": 45.0, "acceptance": 0.8, "by_position": [0.9, 0.8, 0.7, 0.6]},
    },
    "single_chosen": "mtp-4",
    "tuned_tps": 45.0,
    "recipe": {"tps": 36.0, "acceptance": 0.85},
    "baseline": {"tokens_per_second": 44.0, "acceptance": 0.8},
}


def test_results_become_a_profile_and_a_table(gemma3_270m: Path) -> None:
    inst = parse_host_config("box", _data(gemma3_270m)).instances[0]
    entry = tuning.tuned_instance(inst, inst, RESULT, {"depth": 64, "prompts": []})
    assert entry.settings == tuning.TunedSettings(kv_order=["f16", "q8_0"], draft_n_max=4)
    assert entry.baseline == tuning.TunedBaseline(tokens_per_second=44.0, acceptance=0.8)
    assert entry.evidence["single_stream"] == RESULT["single"]
    profile = tuning.TunedProfile(host="box", instances={"gemma3": entry})
    again = tuning.TunedProfile(host="box", instances={"gemma3": entry})
    assert tuning.same_settings(profile, again)
    longer = entry.model_copy(update={"settings": tuning.TunedSettings(draft_n_max=6)})
    assert not tuning.same_settings(
        profile, tuning.TunedProfile(host="box", instances={"gemma3": longer})
    )
    assert json.loads(tuning.profile_json(profile))["instances"]["gemma3"]["settings"] == {
        "allow_parallel_mtp": None, "draft_n_max": 4, "kv_order": ["f16", "q8_0"],
        "parallel": None, "spec_type": None,
    }  # fmt: skip
    table = tuning.host_table(
        "box",
        [
            {"instance": "gemma3", "recipe": "KV q8_0, draft-n 3", "recipe_tps": 36.0,
             "tuned": "KV f16, draft-n 4", "tuned_tps": 45.0, "acceptance": 0.8,
             "status": "written"}
        ],
    )  # fmt: skip
    lines = table.splitlines()
    assert lines[0] == "host box"
    assert lines[2].split()[-4:] == ["45.0", "1.25x", "0.80", "written"]  # 45 / 36


def test_mtp_off_and_slots_in_a_profile(gemma3_270m: Path) -> None:
    inst = parse_host_config("box", _data(gemma3_270m, parallel=4, allow_parallel_mtp=True))
    one = inst.instances[0]
    off = {**RESULT, "single_chosen": "none", "parallel": {"n": 4, "chosen": "np4-none"}}
    entry = tuning.tuned_instance(one, one, off, {})
    assert entry.settings.spec_type == "none" and entry.settings.parallel == 4
    mtp = {**RESULT, "parallel": {"n": 4, "chosen": "np1-mtp"}}
    entry = tuning.tuned_instance(one, one, mtp, {})
    assert (entry.settings.parallel, entry.settings.draft_n_max) == (1, 4)


def test_prompt_files(tmp_path: Path) -> None:
    text = tmp_path / "p.txt"
    text.write_text("first prompt\nstill first\n\nsecond\n")
    assert tuning.read_prompts(text) == [
        {"name": "prompt1", "text": "first prompt\nstill first"},
        {"name": "prompt2", "text": "second"},
    ]
    js = tmp_path / "p.json"
    js.write_text(json.dumps([{"name": "sql", "text": "SELECT"}, "plain"]))
    assert [p["name"] for p in tuning.read_prompts(js)] == ["sql", "prompt2"]
    js.write_text(json.dumps([3]))
    with pytest.raises(ConfigError, match="item 1"):
        tuning.read_prompts(js)
