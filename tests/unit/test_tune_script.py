"""host_scripts/tune.py: the pure parts (parsing, figures, choosing with hysteresis).

The measuring itself (llama-bench, temporary llama-servers, drain and restore) runs against real
servers in tests/fleet/test_tune.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from gemma4_fleet.host_scripts import tune
from tests.unit.conftest import StandIn, import_roots

pytestmark = pytest.mark.unit

# llama-bench -o json at this pin prints one object per test; a -p 0 -n 64 run has n_prompt 0.
BENCH_JSON = json.dumps(
    [
        {"n_prompt": 0, "n_gen": 64, "n_depth": 256, "avg_ts": 41.25, "stddev_ts": 0.5},
    ]
)
METRICS = """# HELP llamacpp:spec_decode_num_drafts_total drafts
llamacpp:spec_decode_num_drafts_total 10
llamacpp:spec_decode_num_draft_tokens_total 30
llamacpp:spec_decode_num_accepted_tokens_per_pos_total{position="0"} 8
llamacpp:spec_decode_num_accepted_tokens_per_pos_total{position="1"} 6
llamacpp:spec_decode_num_accepted_tokens_per_pos_total{position="2"} 3
llamacpp:requests_processing 0
"""


def test_imports_only_the_standard_library() -> None:
    modules = import_roots(Path(tune.__file__))
    assert modules <= set(sys.stdlib_module_names) | {"__future__"}


def test_fill_replaces_placeholders() -> None:
    argv = ["srv", "--port", "{port}", "-ctk", "{kv}", "--spec-draft-n-max", "{draft_n}"]
    assert tune.fill(argv, {"port": 4321, "kv": "f16", "draft_n": 4}) == [
        "srv", "--port", "4321", "-ctk", "f16", "--spec-draft-n-max", "4",
    ]  # fmt: skip
    assert tune.fill(["{kv}"], {}) == ["{kv}"]


def test_bench_tps() -> None:
    assert tune.bench_tps(BENCH_JSON) == 41.25
    assert tune.bench_tps("not json") is None
    assert tune.bench_tps(json.dumps([{"n_prompt": 512, "n_gen": 0, "avg_ts": 900.0}])) is None


def test_per_position_acceptance_from_metrics_differences() -> None:
    before = tune.spec_counters(METRICS)
    assert before == {
        "spec_decode_num_drafts_total": 10,
        "spec_decode_num_draft_tokens_total": 30,
        "pos0": 8,
        "pos1": 6,
        "pos2": 3,
    }
    after = {**before, "spec_decode_num_drafts_total": 20, "pos0": 16, "pos1": 10, "pos2": 4}
    # 10 new verification steps: 8, 4 and 1 of them accepted positions 0, 1, 2
    assert tune.by_position(before, after) == [0.8, 0.4, 0.1]
    assert tune.by_position(before, before) is None  # no drafts in between


def test_summarize() -> None:
    results = [
        {"predicted_n": 64, "predicted_ms": 1000.0, "predicted_per_second": 63.0, "draft_n": 30,
         "draft_n_accepted": 15},
        {"predicted_n": 64, "predicted_ms": 3000.0, "predicted_per_second": 21.0, "draft_n": 10,
         "draft_n_accepted": 5},
        {"predicted_n": 64, "predicted_ms": 2000.0, "predicted_per_second": 31.5},
    ]  # fmt: skip
    assert tune.summarize(results) == {
        "tps": 32.0,  # 192 tokens in 6 s
        "median_tps": 31.5,
        "acceptance": 0.5,  # 20 / 40
        "predicted_n": 192,
        "draft_n": 40,
        "draft_n_accepted": 20,
    }
    assert tune.summarize([{"predicted_n": 8, "predicted_ms": 100.0}])["acceptance"] is None


def test_pick_keeps_the_incumbent_within_the_margin() -> None:
    figures = {"none": 40.0, "mtp-2": 52.0, "mtp-3": 50.0, "mtp-6": None}
    assert tune.pick(figures, None, 0.05) == "mtp-2"
    assert tune.pick(figures, "mtp-3", 0.05) == "mtp-3"  # 50 * 1.05 >= 52
    assert tune.pick(figures, "none", 0.05) == "mtp-2"  # 40 * 1.05 < 52
    assert tune.pick(figures, "mtp-3", 0.0) == "mtp-2"
    assert tune.pick(figures, "mtp-6", 0.05) == "mtp-2"  # the incumbent was not measured
    with pytest.raises(tune.TuneError):
        tune.pick({"none": None}, None, 0.05)


def test_the_recipe_beats_settings_in_use_only_beyond_the_margin() -> None:
    # a new pick loses to a faster recipe; the settings in use (margin 0.3) stay within noise
    assert tune.recipe_wins(139.9, 134.6, 0.0)
    assert not tune.recipe_wins(139.9, 134.6, 0.3)
    assert tune.recipe_wins(180.0, 134.6, 0.3)
    assert not tune.recipe_wins(None, 134.6, 0.0)
    assert tune.recipe_wins(1.0, None, 0.3)


def test_kv_order_fastest_first_with_the_pick_leading() -> None:
    assert tune.kv_order({"f16": 178.3, "q8_0": 149.6}, None, 0.05) == ["f16", "q8_0"]
    assert tune.kv_order({"f16": 150.0, "q8_0": 149.6}, "q8_0", 0.05) == ["q8_0", "f16"]
    assert tune.kv_order({"f16": None, "q8_0": 149.6}, "f16", 0.05) == ["q8_0"]


def test_slots_idle_and_draft_length_of_a_label() -> None:
    assert tune.slots_idle([{"id": 0, "is_processing": False}]) is True
    assert tune.slots_idle([{"id": 0, "is_processing": False}, {"is_processing": True}]) is False
    assert tune.slots_idle({"error": "x"}) is None
    assert (tune._draft_n("mtp-4"), tune._draft_n("none")) == (4, 0)


def test_a_busy_service_is_left_alone(tmp_path: Path, stand_in: StandIn) -> None:
    """A service that never goes idle: nothing is started or stopped, status busy, exit 3."""
    stand_in.bodies.append(json.dumps([{"id": 0, "is_processing": True}]).encode())
    spec = {
        "instance": "gemma4",
        "unit": "llama-server-gemma4.service",
        "service_url": stand_in.url,
        "drain_timeout": 0.3,
        "stop_service": True,
    }
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    assert tune.main(["--spec", str(path)]) == tune.EXIT_BUSY
