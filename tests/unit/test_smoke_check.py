"""Unit tests for gemma4_fleet/host_scripts/smoke_check.py (standard library + prometheus_client).

Fixtures under data/smoke/ are trimmed copies of real responses recorded from the CPU
llama-server build of llama.cpp 0c1e570 with Gemma 3 270M Q4_K_M as target and draft
(``--spec-type draft-simple --spec-draft-n-max 4 -c 2048 -np 1 --metrics``):

* same_model/: drafter identical to the target; /metrics "before" already holds one
  earlier request (26 drafts), so the per-position maths has to take differences.
* q4_draft_kv/: same, with the drafter's KV cache in q4_0 (``-ctkd q4_0 -ctvd q4_0``)
  so that some drafts are rejected; /metrics "before" is a fresh server (no
  per-position series yet).
* chat_*.json: NOT recorded yet - constructed in the shape llama-server 0c1e570 gives a
  /v1/chat/completions reply (tools/server/server-task.cpp, to_json_oaicompat_chat; id
  ``chatcmpl-CONSTRUCTEDnotRECORDED``): a well-formed answer, and one with the ChatML markup
  issue 17 reports for the demo GGUF (no tokenizer.chat_template). Replace them with
  recordings of the demo server (built-in ``gemma`` template / ChatML fallback).
* nvidia_smi_h100_*.txt: nvidia-smi output recorded on an H100 with and without a
  CUDA context (a 1 GiB allocation, pid 405).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import stat
import sys
import threading
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gemma4_fleet.deploys.reporting import table_row
from gemma4_fleet.host_scripts import smoke_check as sc
from tests.unit.conftest import import_roots

pytestmark = pytest.mark.unit

DATA = Path(__file__).parent / "data" / "smoke"
MODEL = "/var/cache/gemma4-fleet/models/gemma-3-270m-q4_k_m.gguf"
PROMPT_NAMES = ("code", "json_repair", "list")


def load_json(rel: str) -> Any:
    return json.loads((DATA / rel).read_text())


def recorded_results(run: str) -> list[sc.PromptResult]:
    return [
        sc.prompt_result_from_completion(n, load_json(f"{run}/completion_{n}.json"))
        for n in PROMPT_NAMES
    ]


def counters(run: str, which: str) -> sc.SpecCounters:
    c = sc.spec_counters(sc.parse_metrics_text((DATA / run / f"metrics_{which}.txt").read_text()))
    assert c is not None
    return c


# ------------------------------------------------------------------ the file itself


def test_module_imports_only_stdlib_and_prometheus_client() -> None:
    roots = import_roots(Path(sc.__file__))
    assert roots - {"__future__", "prometheus_client"} <= set(sys.stdlib_module_names)
    assert "prometheus_client" in roots


def test_docstring_lists_every_rendered_metric() -> None:
    report = full_report()
    report.gpu = sc.GpuResidency(True, 405, 1542, 256)
    report.chat = sc.ChatResult(True, "The sky is blue.", "stop")
    report.min_tps, report.min_acceptance = 20.0, 0.5
    names = {f.name for f in text_string_to_metric_families(sc.render_prometheus(report))}
    assert sc.__doc__ is not None
    for name in names:
        assert f"`{name}`" in sc.__doc__


# ------------------------------------------------------------- recorded responses


def test_prompt_results_from_recorded_completions() -> None:
    code = recorded_results("q4_draft_kv")[0]
    assert code == sc.PromptResult(
        name="code",
        predicted_n=128,
        predicted_ms=5646.416,
        predicted_per_second=22.492143689023266,
        draft_n=103,
        draft_n_accepted=101,
    )
    # llama-server: predicted_per_second = (predicted_n - 1) / predicted_ms (first token free)
    assert code.predicted_per_second == pytest.approx(127 / 5.646416)


def test_completion_without_drafts_or_timings() -> None:
    r = sc.prompt_result_from_completion(
        "x", {"timings": {"predicted_n": 10, "predicted_ms": 900.0, "predicted_per_second": 10.0}}
    )
    assert r.draft_n is None and r.draft_n_accepted is None and r.error is None
    assert sc.acceptance_ratio([r]) is None
    assert sc.prompt_result_from_completion("x", {"content": ""}).error is not None


def test_median_and_acceptance_same_model() -> None:
    results = recorded_results("same_model")
    # 16.712..., 19.457..., 15.334... -> median is the code prompt's value
    assert sc.median_tps(results) == 16.71240206302102
    # 101 / 101 drafted tokens accepted in every prompt
    assert sc.acceptance_ratio(results) == 1.0
    assert sc.sum_draft_tokens(results) == 303


def test_median_and_acceptance_q4_drafter() -> None:
    results = recorded_results("q4_draft_kv")
    # 22.492..., 32.341..., 29.678... -> median 29.678...
    assert sc.median_tps(results) == 29.6785971511351
    # (101 + 101 + 99) / (103 + 103 + 112) = 301 / 318
    assert sc.acceptance_ratio(results) == pytest.approx(301 / 318)
    assert sc.sum_draft_tokens(results) == 318


def test_median_ignores_failed_prompts() -> None:
    results = [
        *recorded_results("q4_draft_kv")[:2],
        sc.PromptResult(name="list", error="HTTP 500"),
    ]
    assert sc.median_tps(results) == pytest.approx((22.492143689023266 + 32.34136180052255) / 2)
    assert sc.median_tps([]) is None


def test_metrics_text_parsing() -> None:
    samples = sc.parse_metrics_text((DATA / "same_model/metrics_after.txt").read_text())
    assert samples[("llamacpp:tokens_predicted_total", ())] == 512
    assert samples[("llamacpp:prompt_seconds_total", ())] == pytest.approx(7.70504)
    key = ("llamacpp:spec_decode_num_accepted_tokens_per_pos_total", (("position", "3"),))
    assert samples[key] == 100


def test_per_position_acceptance_differences_counters() -> None:
    before, after = counters("same_model", "before"), counters("same_model", "after")
    assert (before.drafts, dict(before.accepted_per_pos)) == (26, {0: 26, 1: 25, 2: 25, 3: 25})
    assert (after.drafts, dict(after.accepted_per_pos)) == (104, {0: 104, 1: 100, 2: 100, 3: 100})
    ratios, note = sc.per_position_acceptance(before, after, run_draft_tokens=303)
    # 78 verification steps in the run; positions 1..3 accepted in 75 of them
    assert note is None
    assert ratios == pytest.approx([78 / 78, 75 / 78, 75 / 78, 75 / 78])


def test_per_position_acceptance_from_fresh_server() -> None:
    before, after = counters("q4_draft_kv", "before"), counters("q4_draft_kv", "after")
    assert before.accepted_per_pos == {}  # the labelled family appears after the first draft
    ratios, note = sc.per_position_acceptance(before, after, run_draft_tokens=318)
    assert note is None
    assert ratios == pytest.approx([78 / 80, 77 / 80, 74 / 80, 72 / 80])
    # sum of the ratios = accepted draft tokens per verification step (301 / 80)
    assert sum(ratios or []) == pytest.approx(301 / 80)


def test_per_position_acceptance_refuses_contaminated_or_reset_counters() -> None:
    before, after = counters("same_model", "before"), counters("same_model", "after")
    ratios, note = sc.per_position_acceptance(before, after, run_draft_tokens=200)
    assert ratios is None and note is not None and "concurrent" in note
    ratios, note = sc.per_position_acceptance(after, before)
    assert ratios is None and note is not None and "backwards" in note
    ratios, note = sc.per_position_acceptance(after, after, run_draft_tokens=0)
    assert ratios is None and note == "no drafts in the run"


def test_spec_counters_absent_without_llamacpp_metrics() -> None:
    assert sc.spec_counters(sc.parse_metrics_text("# nothing\nfoo 1\n")) is None


# ---------------------------------------------------------------------- build_info


@pytest.mark.parametrize(
    ("expected", "ok"),
    [
        ("0c1e570", True),
        ("0C1E570", True),
        ("0c1e5701234567890abcdef0123456789abcdef0", True),  # full sha
        ("0c1e571", False),
        ("1c1e5701234567890abcdef0123456789abcdef0", False),
        ("0c1e57", False),  # too short to mean anything
        ("not-a-sha", False),
    ],
)
def test_commit_matching(expected: str, ok: bool) -> None:
    build_info = load_json("props.json")["build_info"]
    assert build_info == "b1-0c1e570"
    assert sc.commit_matches(build_info, expected) is ok


def test_build_info_parsing() -> None:
    assert sc.parse_build_info("b8123-0c1e570") == (8123, "0c1e570")
    assert sc.parse_build_info("b0-unknown") == (0, "unknown")
    assert sc.commit_matches("b0-unknown", "0c1e570") is False
    assert sc.parse_build_info("garbage") == (None, None)


# ---------------------------------------------------------------------- nvidia-smi


def test_nvidia_smi_recorded_one_app() -> None:
    text = (DATA / "nvidia_smi_h100_one_app.txt").read_text()
    assert sc.parse_nvidia_smi_apps(text) == ({405: 1542}, [])
    assert sc.gpu_residency(text, 405, 256) == sc.GpuResidency(True, 405, 1542, 256)
    too_small = sc.gpu_residency(text, 405, 2048)
    assert not too_small.ok and too_small.reason == "gpu: pid 405 uses 1542 MiB < 2048 MiB"
    other = sc.gpu_residency(text, 17507, 256)
    assert not other.ok and other.reason is not None and "not among" in other.reason


def test_nvidia_smi_recorded_no_apps() -> None:
    text = (DATA / "nvidia_smi_h100_no_apps.txt").read_text()
    assert text == ""
    assert sc.parse_nvidia_smi_apps(text) == ({}, [])
    res = sc.gpu_residency(text, 405, 256)
    assert not res.ok and res.used_mib is None


def test_nvidia_smi_malformed() -> None:
    # recorded with the wrong flags (header and units): every line is malformed
    text = (DATA / "nvidia_smi_h100_with_header.txt").read_text()
    apps, bad = sc.parse_nvidia_smi_apps(text)
    assert apps == {}
    assert bad == ["pid, used_gpu_memory [MiB]", "405, 1542 MiB"]
    res = sc.gpu_residency(text, 405, 256)
    assert not res.ok and res.reason is not None and "unparsed" in res.reason
    # garbage lines are skipped, good lines still count; a PID on two GPUs is summed
    apps, bad = sc.parse_nvidia_smi_apps("No devices were found\n7, 100\n7, 300\n8,\n")
    assert apps == {7: 400}
    assert bad == ["No devices were found", "8,"]
    # memory that the driver cannot report
    apps, _ = sc.parse_nvidia_smi_apps("9, [N/A]\n")
    assert apps == {9: None}
    res = sc.gpu_residency("9, [N/A]\n", 9, 256)
    assert not res.ok and res.reason == "gpu: nvidia-smi reports no used memory for pid 9"


def test_missing_nvidia_smi_is_a_clear_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    out, err = sc.run_nvidia_smi()
    assert out is None and err == "gpu: nvidia-smi not found on this host but --gpu was given"


# ---------------------------------------------------------------------- thresholds


def test_thresholds_and_status() -> None:
    assert sc.threshold_reasons(29.68, 0.9465, 20.0, 0.9) == []
    assert sc.threshold_reasons(29.68, 0.9465, None, None) == []
    assert sc.threshold_reasons(29.68, 0.9465, 50.0, 0.95) == [
        "throughput: 29.68 tok/s < minimum 50",
        "acceptance: 0.947 < minimum 0.95",
    ]
    assert sc.threshold_reasons(None, None, 1.0, 0.5) == [
        "throughput: no tok/s measured (minimum 1)",
        "acceptance: no drafts were made (minimum 0.5)",
    ]
    assert sc.decide_status([], busy=False) == ("pass", [])
    assert sc.decide_status([], busy=True) == ("skipped", ["busy"])
    assert sc.decide_status(["gpu: x"], busy=True) == ("fail", ["gpu: x"])


def test_busy_from_recorded_slots() -> None:
    assert sc.slots_all_busy(load_json("slots_idle.json")) is False
    assert sc.slots_all_busy(load_json("slots_busy.json")) is True
    two = [{"id": 0, "is_processing": True}, {"id": 1, "is_processing": False}]
    assert sc.slots_all_busy(two) is False
    assert sc.slots_all_busy(load_json("unauthorized.json")) is None


# ---------------------------------------------------------------------- Prometheus


def full_report() -> sc.Report:
    results = recorded_results("q4_draft_kv")
    ratios, _ = sc.per_position_acceptance(
        counters("q4_draft_kv", "before"), counters("q4_draft_kv", "after"), 318
    )
    return sc.Report(
        instance='gpu01/gemma4 "a"',
        url="http://127.0.0.1:8080",
        status="pass",
        health=sc.HealthResult(True, 200, 0.01),
        build_info="b1-0c1e570",
        model_path=MODEL,
        prompts=results,
        tokens_per_second=sc.median_tps(results),
        acceptance=sc.acceptance_ratio(results),
        acceptance_by_position=ratios,
        duration_seconds=12.5,
        finished_at=1_795_462_939.5,
    )


def samples_of(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        assert family.type == "gauge"
        assert family.documentation
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_prometheus_rendering() -> None:
    text = sc.render_prometheus(full_report())
    inst = ("instance_name", 'gpu01/gemma4 "a"')
    assert samples_of(text) == {
        ("gemma4_smoke_tokens_per_second", (inst,)): 29.6785971511351,
        ("gemma4_smoke_acceptance_ratio", (inst,)): pytest.approx(301 / 318),
        ("gemma4_smoke_acceptance_ratio_by_position", (inst, ("position", "0"))): 0.975,
        ("gemma4_smoke_acceptance_ratio_by_position", (inst, ("position", "1"))): 0.9625,
        ("gemma4_smoke_acceptance_ratio_by_position", (inst, ("position", "2"))): 0.925,
        ("gemma4_smoke_acceptance_ratio_by_position", (inst, ("position", "3"))): 0.9,
        ("gemma4_smoke_healthy", (inst,)): 1.0,
        ("gemma4_smoke_passed", (inst,)): 1.0,
        ("gemma4_smoke_skipped", (inst,)): 0.0,
        ("gemma4_smoke_build_info", (("build", "b1-0c1e570"), ("commit", "0c1e570"), inst)): 1.0,
        ("gemma4_smoke_duration_seconds", (inst,)): 12.5,
        ("gemma4_smoke_last_run_timestamp_seconds", (inst,)): 1_795_462_939.5,
    }
    # every family has HELP and TYPE; 'instance' (reserved by Prometheus) is never used
    for family in text_string_to_metric_families(text):
        assert f"# HELP {family.name} " in text and f"# TYPE {family.name} gauge" in text
        assert all("instance" not in s.labels for s in family.samples)


def test_prometheus_rendering_unmeasured_and_gpu() -> None:
    report = sc.Report(
        instance="a",
        url="http://x",
        status="fail",
        health=sc.HealthResult(False, 503, 120.0, "HTTP 503: Loading model"),
        gpu=sc.GpuResidency(False, 1, None, 256, "gpu: ..."),
    )
    samples = samples_of(sc.render_prometheus(report))
    names = {name for name, _ in samples}
    assert "gemma4_smoke_tokens_per_second" not in names
    assert "gemma4_smoke_acceptance_ratio_by_position" not in names
    assert "gemma4_smoke_build_info" not in names
    assert samples[("gemma4_smoke_healthy", (("instance_name", "a"),))] == 0.0
    assert samples[("gemma4_smoke_passed", (("instance_name", "a"),))] == 0.0
    assert samples[("gemma4_smoke_gpu_resident", (("instance_name", "a"),))] == 0.0


def test_prometheus_special_values() -> None:
    report = sc.Report(instance="a\nb\\", url="u", tokens_per_second=math.inf)
    samples = samples_of(sc.render_prometheus(report))
    assert samples[("gemma4_smoke_tokens_per_second", (("instance_name", "a\nb\\"),))] == math.inf


# --------------------------------------------------------------- report and output


def test_report_json_and_summary() -> None:
    report = full_report()
    d = json.loads(json.dumps(sc.report_to_dict(report)))
    assert d["status"] == "pass"
    assert d["tokens_per_second"]["median"] == 29.6785971511351
    assert d["tokens_per_second"]["per_prompt"] == {
        "code": 22.492143689023266,
        "json_repair": 32.34136180052255,
        "list": 29.6785971511351,
    }
    assert d["acceptance_by_position"] == pytest.approx([0.975, 0.9625, 0.925, 0.9])
    assert d["health"]["ok"] is True
    line = sc.summary_line(report)
    assert "\n" not in line
    assert line.startswith('smoke gpu01/gemma4 "a" PASS: 29.7 tok/s median, acceptance 0.947')
    # what every reader gets back: the same typed report
    assert sc.report_from_dict(d) == report


def test_fleet_table_reads_the_typed_report(tmp_path: Path) -> None:
    path = tmp_path / "gemma4.json"
    path.write_text(json.dumps(sc.report_to_dict(replace(full_report(), instance="gemma4"))))
    row = table_row("gpu01", sc.load_report(str(path)))
    assert row == (
        "gpu01", "llama-server-gemma4.service", "gemma-3-270m-q4_k_m.gguf", "b1-0c1e570", "200",
        "29.7",
        "0.95", "pass",
    )  # fmt: skip
    down = sc.Report(instance="x", url="u", health=sc.HealthResult(False, None, 900.0))
    assert table_row("h", down)[2:] == ("-", "-", "down", "-", "-", "fail")


def test_chat_reply_with_a_fitting_template_passes() -> None:
    chat = sc.check_chat_reply(200, load_json("chat_gemma_template.json"))
    assert chat.ok and chat.reason is None
    assert chat.content and "blue" in chat.content.lower()


def test_chat_reply_with_chatml_markup_fails_naming_the_marker() -> None:
    chat = sc.check_chat_reply(200, load_json("chat_chatml_fallback.json"))
    assert not chat.ok
    assert chat.reason is not None
    assert chat.reason.startswith("content holds chat-template markup '<|im_")
    assert "GGUF without tokenizer.chat_template" in chat.reason


@pytest.mark.parametrize(
    ("code", "body", "reason"),
    [
        (500, {"error": {"message": "boom"}}, "HTTP 500: boom"),
        (200, ["not", "an", "object"], "reply is not a JSON object"),
        (200, {"choices": []}, "no choices in the reply"),
        (200, {"choices": [{"finish_reason": "stop"}]}, "choices[0].message is missing"),
        (
            200,
            {"choices": [{"message": {"role": "assistant", "content": None}}]},
            "choices[0].message.content is missing",
        ),
        (
            200,
            {"choices": [{"message": {"content": " \n"}, "finish_reason": "stop"}]},
            "empty content (finish_reason 'stop')",
        ),
    ],
)
def test_chat_reply_malformed(code: int, body: Any, reason: str) -> None:
    recorded = load_json("chat_gemma_template.json")
    if isinstance(body, dict) and body.get("choices"):  # a real reply with one field broken
        body = {**recorded, "choices": body["choices"]}
    chat = sc.check_chat_reply(code, body)
    assert (chat.ok, chat.reason) == (False, reason)


def test_chat_reply_all_reasoning_at_max_tokens_is_a_note() -> None:
    reply = load_json("chat_gemma_template.json")
    choice = {
        **reply["choices"][0],
        "finish_reason": "length",
        "message": {"role": "assistant", "content": "", "reasoning_content": "The user asks"},
    }
    chat = sc.check_chat_reply(200, {**reply, "choices": [choice]})
    assert chat.ok and chat.reason is None
    assert chat.note == "chat: the reply was all reasoning within max_tokens 48"


def test_write_atomic(tmp_path: Path) -> None:
    target = tmp_path / "smoke.prom"
    target.write_text("old")
    sc.write_atomic(str(target), "new\n")
    assert target.read_text() == "new\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["smoke.prom"]


# ------------------------------------------------ run_smoke against a replay server


class Replay:
    """Replays the recorded q4_draft_kv run over HTTP."""

    def __init__(self) -> None:
        self.api_key: str | None = None
        self.loading_polls = 0
        self.busy = False
        self.model_path = MODEL
        self.metrics = [
            (DATA / "q4_draft_kv/metrics_before.txt").read_text(),
            (DATA / "q4_draft_kv/metrics_after.txt").read_text(),
        ]
        self.completions = [load_json(f"q4_draft_kv/completion_{n}.json") for n in PROMPT_NAMES]
        self.chat = load_json("chat_gemma_template.json")
        self.requests: list[tuple[str, str, dict[str, Any] | None]] = []
        # what failed inside the server thread; the fixture raises it in the test
        self.errors: list[BaseException] = []


def make_handler(replay: Replay) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def send(self, code: int, body: Any, ctype: str = "application/json") -> None:
            raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def handle_any(self, body: dict[str, Any] | None) -> None:
            replay.requests.append((self.command, self.path, body))
            if self.path == "/health" or replay.loading_polls > 0:
                if replay.loading_polls > 0:
                    replay.loading_polls -= 1
                    return self.send(503, load_json("health_loading.json"))
                return self.send(200, {"status": "ok"})
            if replay.api_key and self.headers.get("Authorization") != f"Bearer {replay.api_key}":
                return self.send(401, load_json("unauthorized.json"))
            if self.path == "/props":
                props = load_json("props.json")
                props["model_path"] = replay.model_path
                return self.send(200, props)
            if self.path == "/slots":
                slots = "slots_busy.json" if replay.busy else "slots_idle.json"
                return self.send(200, load_json(slots))
            if self.path == "/metrics":
                text = replay.metrics.pop(0) if len(replay.metrics) > 1 else replay.metrics[0]
                return self.send(200, text, "text/plain; version=0.0.4")
            if self.path == "/apply-template":
                assert body is not None
                return self.send(200, {"prompt": body["messages"][0]["content"]})
            if self.path == "/completion":
                return self.send(200, replay.completions.pop(0))
            if self.path == "/v1/chat/completions":
                return self.send(200, replay.chat)
            return self.send(404, {"error": {"message": "File Not Found"}})

        def recorded(self, body: dict[str, Any] | None) -> None:
            try:
                self.handle_any(body)
            except BaseException as exc:
                replay.errors.append(exc)
                self.send(500, {"error": {"message": f"replay handler failed: {exc!r}"}})

        def do_GET(self) -> None:
            self.recorded(None)

        def do_POST(self) -> None:
            n = int(self.headers.get("Content-Length", "0"))
            self.recorded(json.loads(self.rfile.read(n)))

    return Handler


@pytest.fixture
def replay() -> Iterator[tuple[Replay, str]]:
    state = Replay()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    if state.errors:  # an assert in the handler thread fails the test that made the request
        raise state.errors[0]


def config(url: str, **kw: Any) -> sc.Config:
    base: dict[str, Any] = {
        "url": url,
        "instance": "replay",
        "expect_commit": "0c1e570",
        "expect_model": MODEL,
        "poll": 0.01,
        "busy_wait": 0.05,
        "health_timeout": 2.0,
    }
    base.update(kw)
    return sc.Config(**base)


def test_run_smoke_pass_on_replayed_run(replay: tuple[Replay, str]) -> None:
    state, url = replay
    state.api_key = "sekrit"
    state.loading_polls = 2
    report = sc.run_smoke(config(url, api_key="sekrit", min_tps=20, min_acceptance=0.9))
    assert (report.status, report.reasons) == ("pass", [])
    assert report.health is not None and report.health.ok
    assert report.tokens_per_second == 29.6785971511351
    assert report.acceptance == pytest.approx(301 / 318)
    assert report.acceptance_by_position == pytest.approx([0.975, 0.9625, 0.925, 0.9])
    assert report.build_info == "b1-0c1e570" and report.commit_ok and report.model_ok
    assert report.chat is not None and report.chat.ok
    chats = [b for _, p, b in state.requests if p == "/v1/chat/completions"]
    assert len(chats) == 1 and chats[0] is not None
    assert chats[0]["messages"] == [{"role": "user", "content": sc.CHAT_PROMPT}]
    assert chats[0]["temperature"] == 0 and chats[0]["max_tokens"] == sc.CHAT_MAX_TOKENS
    completions = [b for m, p, b in state.requests if p == "/completion"]
    assert len(completions) == 3
    for body in completions:
        assert body is not None
        assert body["temperature"] == 0 and body["cache_prompt"] is False
        assert body["n_predict"] == sc.DEFAULT_N_PREDICT


def test_run_smoke_fail_reasons(replay: tuple[Replay, str]) -> None:
    state, url = replay
    state.model_path = "/srv/models/other.gguf"
    state.chat = load_json("chat_chatml_fallback.json")
    report = sc.run_smoke(config(url, expect_commit="deadbee", min_tps=1000))
    assert report.status == "fail"
    assert [reason[:40] for reason in report.reasons] == [
        "build: 'b1-0c1e570' is not commit deadbee"[:40],
        f"model: '/srv/models/other.gguf' != '{MODEL}'"[:40],
        "chat: content holds chat-template markup",
        "throughput: 29.68 tok/s < minimum 1000",
    ]
    samples = samples_of(sc.render_prometheus(report))
    assert samples[("gemma4_smoke_chat_ok", (("instance_name", "replay"),))] == 0.0
    assert samples[("gemma4_smoke_min_tokens_per_second", (("instance_name", "replay"),))] == 1000


def test_regression_against_the_tuned_baseline_fails_with_the_figures(
    replay: tuple[Replay, str],
) -> None:
    # The replayed run: 29.68 tok/s median, acceptance 301/318 = 0.947.
    _, url = replay
    report = sc.run_smoke(config(url, baseline_tps=40.0, baseline_acceptance=0.95))
    assert report.status == "fail" and report.regressed is True
    # 29.68 / 40 = 74 % < 80 %; acceptance 0.947 / 0.95 = 99.6 % is fine
    assert report.reasons == [
        "regression: throughput 29.7 tok/s is 74% of the tuned baseline 40 tok/s (below 80%)"
    ]
    samples = samples_of(sc.render_prometheus(report))
    labels = (("instance_name", "replay"),)
    assert samples[("gemma4_smoke_baseline_tokens_per_second", labels)] == 40
    assert samples[("gemma4_smoke_baseline_acceptance_ratio", labels)] == 0.95
    assert samples[("gemma4_smoke_regressed", labels)] == 1
    assert sc.report_to_dict(report)["baseline"]["regressed"] is True


def test_regression_reasons() -> None:
    assert sc.regression_reasons(29.68, 0.9465, 30.0, 0.95, 0.8) == []
    assert sc.regression_reasons(29.68, 0.9465, None, 1.0, 0.99) == [
        "regression: acceptance 0.947 is 95% of the tuned baseline 1 (below 99%)"
    ]
    assert sc.regression_reasons(None, None, 30.0, 0.9, 0.8) == []  # nothing measured
    no_baseline = sc.Report(instance="x", url="http://h")
    assert "gemma4_smoke_regressed" not in sc.render_prometheus(no_baseline)


def test_run_smoke_busy_is_skipped(replay: tuple[Replay, str]) -> None:
    state, url = replay
    state.busy = True
    report = sc.run_smoke(config(url))
    assert (report.status, report.reasons) == ("skipped", ["busy"])
    assert not any(p in ("/completion", "/v1/chat/completions") for _, p, _ in state.requests)


def test_run_smoke_wrong_key(replay: tuple[Replay, str]) -> None:
    state, url = replay
    state.api_key = "sekrit"
    report = sc.run_smoke(config(url, api_key="wrong"))
    assert report.status == "fail"
    assert report.reasons == [
        "props: HTTP 401: Invalid API Key",
        "chat: HTTP 401: Invalid API Key",
        "completion code: HTTP 401: Invalid API Key",
    ]


def test_run_smoke_health_timeout() -> None:
    with socket.socket() as s:  # a port that nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    report = sc.run_smoke(config(f"http://127.0.0.1:{port}", health_timeout=0.3, poll=0.05))
    assert report.status == "fail"
    assert report.health is not None and not report.health.ok
    assert report.reasons[0].startswith("health: not ready after 0.3s (ConnectionRefusedError")


def test_main_writes_outputs_and_exit_codes(
    replay: tuple[Replay, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _state, url = replay
    out_json, out_prom = tmp_path / "r.json", tmp_path / "r.prom"
    argv = [
        "--url", url, "--instance", "replay", "--expect-commit", "0c1e570",
        "--expect-model", MODEL, "--min-tps", "5",
        "--json", str(out_json), "--prom", str(out_prom),
    ]  # fmt: skip
    umask = os.umask(0o077)
    try:
        assert sc.main(argv) == sc.EXIT_OK
    finally:
        os.umask(umask)
    assert capsys.readouterr().out.startswith("smoke replay PASS: 29.7 tok/s median")
    assert json.loads(out_json.read_text())["status"] == "pass"
    samples = samples_of(out_prom.read_text())
    assert samples[("gemma4_smoke_passed", (("instance_name", "replay"),))] == 1.0
    assert samples[("gemma4_smoke_chat_ok", (("instance_name", "replay"),))] == 1.0
    assert samples[("gemma4_smoke_min_tokens_per_second", (("instance_name", "replay"),))] == 5
    # node_exporter (another user) reads it; write_to_textfile leaves no temporary file
    assert stat.S_IMODE(out_prom.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.prom"]


@pytest.mark.parametrize(
    "extra",
    [
        ["--expect-commit", "0c1e57"],
        ["--url", "file:///etc/passwd"],
        ["--gpu"],  # without --pid
        ["--min-acceptance", "1.5"],
        ["--api-key-file", "/nonexistent/key"],
        ["--n-predict", "0"],
    ],
)
def test_usage_errors_exit_2(extra: list[str], tmp_path: Path) -> None:
    argv = [
        "--url", "http://127.0.0.1:9", "--instance", "x", "--expect-commit", "0c1e570",
        "--expect-model", MODEL, "--json", str(tmp_path / "j"), "--prom", str(tmp_path / "p"),
        *extra,
    ]  # fmt: skip
    with pytest.raises(SystemExit) as exc:
        raise SystemExit(sc.main(argv))
    assert exc.value.code == sc.EXIT_USAGE
    assert not (tmp_path / "j").exists()
