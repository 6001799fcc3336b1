#!/usr/bin/env python3
"""Smoke check for one llama-server instance (llama.cpp 0c1e570).

This file is copied as-is to the hosts and run there with the host's `python3`
(Debian bookworm, Python 3.11, nothing pip-installed) after every deploy and from a
systemd timer (oneshot). It imports the standard library and `prometheus_client`
(Debian's python3-prometheus-client, which the deploy installs); the unit tests import
the same file.

Checks, in order:

1. `GET /health` answers 200 `{"status":"ok"}` within `--health-timeout`; 503
   `Loading model` and refused connections are retried until then.
2. `GET /props`: `build_info` (`b<N>-<short sha>`) names `--expect-commit` (compared on
   the common prefix, at least 7 hex digits) and `model_path` equals `--expect-model`.
   `/props` does not expose the drafter's path, so that is not checked.
3. `--gpu`: `--pid` is listed by `nvidia-smi --query-compute-apps=pid,used_memory` with
   at least `--gpu-min-mib` MiB (summed over GPUs). No `nvidia-smi` is a failure. This
   catches the silent CPU fallback (llama.cpp#27923) that keeps /health at 200.
4. Busy check (`GET /slots`, else `/metrics` `requests_processing`): if no slot is idle
   (with `-np 1`: the slot `is_processing`), poll for `--busy-wait` seconds, then stop
   with status `skipped`, reason `busy`. Repeated before every prompt: the check never
   queues behind a user.
5. Throughput: three short prompts (code task, JSON repair, fixed-format list; the
   server's chat template applied via `POST /apply-template`), `POST /completion` with
   temperature 0, fixed `n_predict`, `cache_prompt: false`. Per prompt:
   `timings.predicted_per_second` (llama-server computes it as
   `(predicted_n - 1) / predicted_ms`, the first token comes from the prompt batch),
   `draft_n`, `draft_n_accepted`. tok/s = median over the prompts; acceptance =
   sum(draft_n_accepted) / sum(draft_n), None when no drafts were made.
   Before the prompts, one short `POST /v1/chat/completions` (the path users call,
   temperature 0, `max_tokens` 48): the reply must have `choices[0].message.content`, not
   empty, without chat-template markup such as `<|im_end|>` (what a GGUF without
   `tokenizer.chat_template` gets from llama-server's ChatML fallback). A reply that is all
   `reasoning_content` when `max_tokens` ran out is noted, not failed.
6. `--min-tps` / `--min-acceptance`: each failed check adds a reason; any reason makes
   the status `fail`.
7. `--baseline-tps` / `--baseline-acceptance` (the instance's tuned figures, measured by
   `gemma4-fleet tune` on the same prompts and n_predict) with `--regression F`: a run
   below F times a baseline is a regression; it fails with both figures in the reason.

Per-position acceptance: in llama-server `llamacpp:spec_decode_num_drafts_total` counts
draft *verification steps*, and
`llamacpp:spec_decode_num_accepted_tokens_per_pos_total{position="i"}` counts the steps
in which the draft token at 0-based position `i` was accepted (a step that accepts `k`
draft tokens increments positions `0..k-1`). With `d` the difference of `/metrics`
before and after the run:

    acceptance_by_position[i] = d accepted_per_pos[i] / d drafts_total

i.e. the fraction of verification steps that accepted at least `i + 1` draft tokens
(llama-server's own `acc per pos` log line). It is non-increasing in `i`; its sum is the
mean number of accepted draft tokens per step. It is left out when `/metrics` is off
(no `--metrics`), when no drafts were made, or when the draft-token counter moved by a
different amount than the run's own `draft_n` (concurrent requests, or a restart).

Prometheus textfile (`--prom`) metrics, written with prometheus_client's
`write_to_textfile` (atomic rename), all gauges; every series has the label
`instance_name` (`instance` is reserved by Prometheus). A series is left out when its
value was not measured.

| Metric | Meaning |
|---|---|
| `gemma4_smoke_tokens_per_second` | Median generation speed over the prompts, tokens/s |
| `gemma4_smoke_acceptance_ratio` | Draft tokens accepted / drafted over the run (0..1) |
| `gemma4_smoke_acceptance_ratio_by_position` | `{position="i"}`: share of verification |
| | steps that accepted the draft token at 0-based position i |
| `gemma4_smoke_healthy` | 1 if /health answered 200 within the timeout |
| `gemma4_smoke_passed` | 1 if the status is `pass` |
| `gemma4_smoke_skipped` | 1 if the status is `skipped` (slot busy with a user) |
| `gemma4_smoke_gpu_resident` | 1 if the server PID holds >= the minimum GPU memory |
| | (only with `--gpu`) |
| `gemma4_smoke_chat_ok` | 1 if the `/v1/chat/completions` reply was well-formed |
| `gemma4_smoke_min_tokens_per_second` | `--min-tps`, when given |
| `gemma4_smoke_min_acceptance_ratio` | `--min-acceptance`, when given |
| `gemma4_smoke_build_info` | Always 1; labels `build` (`/props` `build_info`, e.g. |
| | `b1-0c1e570`) and `commit` |
| `gemma4_smoke_baseline_tokens_per_second` | The tuned baseline tok/s compared against |
| `gemma4_smoke_baseline_acceptance_ratio` | The tuned baseline acceptance compared against |
| `gemma4_smoke_regressed` | 1 if tok/s or acceptance fell below the regression fraction |
| | of its baseline (only with a baseline) |
| `gemma4_smoke_duration_seconds` | Wall time of the smoke check, seconds |
| `gemma4_smoke_last_run_timestamp_seconds` | Unix time at which the check finished |

Exit code: 0 pass or skipped, 1 fail, 2 usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

try:
    from prometheus_client import CollectorRegistry, Gauge, generate_latest, write_to_textfile
except ImportError:  # pragma: no cover - exercised on a host without the package
    sys.exit("smoke_check.py: needs prometheus_client (apt-get install python3-prometheus-client)")

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_USAGE = 2

METRIC_PREFIX = "gemma4_smoke_"
DEFAULT_N_PREDICT = 128
DEFAULT_GPU_MIN_MIB = 256

# Short prompts in the style of users' A/B prompts: a small code task, a JSON repair,
# a fixed-format list.
PROMPTS: tuple[tuple[str, str], ...] = (
    (
        "code",
        "Write a Python function is_prime(n) that returns True when n is a prime number. "
        "Reply with the code only.",
    ),
    (
        "json_repair",
        "Fix this JSON and reply with the corrected JSON only:\n"
        '{name: \'Ada Lovelace\', "born": 1815, "languages": ["en", "fr",], }',
    ),
    (
        "list",
        "List the first ten chemical elements, one per line, formatted exactly as "
        "'<number>. <symbol> - <name>'.",
    ),
)

BUSY_UNKNOWN = "busy state unknown (/slots and /metrics unavailable)"

# One short chat request on the path users call. Markup of a chat template in the reply's
# content means the server applied a template the model does not know (llama-server falls
# back to ChatML when the GGUF has no tokenizer.chat_template).
CHAT_PROMPT = "What colour is the sky on a clear day? Answer in one short sentence."
CHAT_MAX_TOKENS = 48
TEMPLATE_MARKUP = (
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<|eot_id|>",
    "<|start_header_id|>",
)

# What llama.cpp logs when CUDA cannot start (e.g. /dev/nvidia-uvm missing): it then serves on the
# CPU with /health 200. Looked for in the journal of the unit's current invocation.
CPU_FALLBACK_MARKERS = ("ggml_cuda_init: failed", "no usable GPU found")

NVIDIA_SMI_ARGS = (
    "--query-compute-apps=pid,used_memory",
    "--format=csv,noheader,nounits",
)


# --------------------------------------------------------------------------- data


@dataclass
class PromptResult:
    """One ``/completion`` call; draft fields are None when no drafts were made."""

    name: str
    predicted_n: int | None = None
    predicted_ms: float | None = None
    predicted_per_second: float | None = None
    draft_n: int | None = None
    draft_n_accepted: int | None = None
    templated: bool = False
    error: str | None = None


@dataclass(frozen=True)
class HealthResult:
    ok: bool
    status_code: int | None
    waited_seconds: float
    error: str | None = None


@dataclass(frozen=True)
class GpuResidency:
    ok: bool
    pid: int
    used_mib: int | None
    min_mib: int
    reason: str | None = None


@dataclass(frozen=True)
class ChatResult:
    """The ``/v1/chat/completions`` check: ``reason`` says why it failed, None when ok."""

    ok: bool
    content: str | None = None
    finish_reason: str | None = None
    reason: str | None = None
    note: str | None = None


@dataclass(frozen=True)
class SpecCounters:
    """llama-server speculative-decoding counters from one ``/metrics`` scrape."""

    drafts: float
    draft_tokens: float
    accepted: float
    accepted_per_pos: Mapping[int, float]


@dataclass
class Report:
    instance: str
    url: str
    status: str = "fail"
    reasons: list[str] = field(default_factory=list)
    health: HealthResult | None = None
    build_info: str | None = None
    expect_commit: str | None = None
    commit_ok: bool | None = None
    model_path: str | None = None
    expect_model: str | None = None
    model_ok: bool | None = None
    total_slots: int | None = None
    gpu: GpuResidency | None = None
    chat: ChatResult | None = None
    min_tps: float | None = None
    min_acceptance: float | None = None
    n_predict: int = DEFAULT_N_PREDICT
    prompts: list[PromptResult] = field(default_factory=list)
    tokens_per_second: float | None = None
    acceptance: float | None = None
    acceptance_by_position: list[float] | None = None
    baseline_tps: float | None = None
    baseline_acceptance: float | None = None
    regression: float | None = None
    regressed: bool | None = None  # None: no baseline, or nothing measured
    notes: list[str] = field(default_factory=list)
    duration_seconds: float = 0.0
    finished_at: float = 0.0


# ------------------------------------------------------------------ pure functions


def parse_build_info(build_info: str) -> tuple[int | None, str | None]:
    """``"b8123-0c1e570"`` -> ``(8123, "0c1e570")``; ``(None, None)`` if malformed."""
    m = re.fullmatch(r"b(\d+)-([0-9A-Za-z]+)", build_info.strip())
    if m is None:
        return None, None
    return int(m.group(1)), m.group(2).lower()


def is_commit_sha(value: str) -> bool:
    return re.fullmatch(r"[0-9a-fA-F]{7,40}", value.strip()) is not None


def commit_matches(build_info: str, expected: str) -> bool:
    """True if the commit in ``build_info`` and ``expected`` (short or full sha) agree
    on their common prefix of at least 7 hex digits."""
    _, commit = parse_build_info(build_info)
    want = expected.strip().lower()
    if commit is None or not is_commit_sha(commit) or not is_commit_sha(want):
        return False
    n = min(len(commit), len(want))
    return commit[:n] == want[:n]


def parse_nvidia_smi_apps(text: str) -> tuple[dict[int, int | None], list[str]]:
    """Parse ``nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits``.

    Returns ``({pid: MiB or None}, malformed_lines)``. A PID on several GPUs is
    summed; ``[N/A]`` / ``[Not Supported]`` memory gives None for that PID.
    """
    apps: dict[int, int | None] = {}
    bad: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 2 or not parts[0].isdigit():
            bad.append(line)
            continue
        pid = int(parts[0])
        mem: int | None
        if parts[1].isdigit():
            mem = int(parts[1])
        elif parts[1].startswith("["):
            mem = None
        else:
            bad.append(line)
            continue
        if pid in apps:
            prev = apps[pid]
            apps[pid] = None if prev is None or mem is None else prev + mem
        else:
            apps[pid] = mem
    return apps, bad


def cpu_fallback_lines(log_text: str) -> list[str]:
    """Server log lines that say CUDA did not start (the server then runs on the CPU)."""
    return [
        line.strip()
        for line in log_text.splitlines()
        if any(marker in line for marker in CPU_FALLBACK_MARKERS)
    ]


def gpu_residency(smi_output: str, pid: int, min_mib: int) -> GpuResidency:
    """Decide GPU residency of ``pid`` from recorded nvidia-smi output."""
    apps, bad = parse_nvidia_smi_apps(smi_output)
    if pid not in apps:
        reason = f"gpu: pid {pid} not among nvidia-smi compute apps (CPU fallback?)"
        if bad:
            reason += f"; unparsed nvidia-smi lines: {bad[:3]!r}"
        return GpuResidency(False, pid, None, min_mib, reason)
    used = apps[pid]
    if used is None:
        return GpuResidency(
            False, pid, None, min_mib, f"gpu: nvidia-smi reports no used memory for pid {pid}"
        )
    if used < min_mib:
        return GpuResidency(
            False, pid, used, min_mib, f"gpu: pid {pid} uses {used} MiB < {min_mib} MiB"
        )
    return GpuResidency(True, pid, used, min_mib)


_SAMPLE_RE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)"
)
_LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

MetricKey = tuple[str, tuple[tuple[str, str], ...]]


def parse_metrics_text(text: str) -> dict[MetricKey, float]:
    """Minimal Prometheus text parser: ``{(name, sorted label pairs): value}``."""
    out: dict[MetricKey, float] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE_RE.match(line)
        if m is None:
            continue
        try:
            value = float(m.group("value"))
        except ValueError:
            continue
        labels = tuple(sorted(_LABEL_RE.findall(m.group("labels") or "")))
        out[(m.group("name"), labels)] = value
    return out


def spec_counters(samples: Mapping[MetricKey, float]) -> SpecCounters | None:
    """Extract the speculative-decoding counters; None if they are absent."""
    p = "llamacpp:"
    try:
        drafts = samples[(p + "spec_decode_num_drafts_total", ())]
        draft_tokens = samples[(p + "spec_decode_num_draft_tokens_total", ())]
        accepted = samples[(p + "spec_decode_num_accepted_tokens_total", ())]
    except KeyError:
        return None
    per_pos: dict[int, float] = {}
    for (name, labels), value in samples.items():
        if name != p + "spec_decode_num_accepted_tokens_per_pos_total":
            continue
        pos = dict(labels).get("position", "")
        if pos.isdigit():
            per_pos[int(pos)] = value
    return SpecCounters(drafts, draft_tokens, accepted, per_pos)


def per_position_acceptance(
    before: SpecCounters, after: SpecCounters, run_draft_tokens: int | None = None
) -> tuple[list[float] | None, str | None]:
    """Per-position acceptance of the run (see the module docstring).

    ``run_draft_tokens`` (sum of the run's ``draft_n``) guards against counters moved
    by other requests. Returns ``(ratios, note)``; ratios None with a note when it
    cannot be computed.
    """
    d_drafts = after.drafts - before.drafts
    d_tokens = after.draft_tokens - before.draft_tokens
    if d_drafts < 0 or d_tokens < 0:
        return None, "metrics counters went backwards (server restarted?)"
    if run_draft_tokens is not None and d_tokens != run_draft_tokens:
        return None, (
            f"draft-token counter moved by {d_tokens:g}, the run drafted "
            f"{run_draft_tokens}: other requests ran concurrently"
        )
    if d_drafts == 0:
        return None, "no drafts in the run"
    if not after.accepted_per_pos:
        return None, "no per-position counters in /metrics"
    n = max(after.accepted_per_pos) + 1
    ratios = []
    for i in range(n):
        d = after.accepted_per_pos.get(i, 0.0) - before.accepted_per_pos.get(i, 0.0)
        if d < 0:
            return None, "metrics counters went backwards (server restarted?)"
        ratios.append(d / d_drafts)
    return ratios, None


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return int(value)


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def prompt_result_from_completion(name: str, body: Mapping[str, Any]) -> PromptResult:
    """Build a PromptResult from a ``/completion`` response body."""
    timings = body.get("timings")
    if not isinstance(timings, Mapping):
        return PromptResult(name=name, error="no timings in /completion response")
    return PromptResult(
        name=name,
        predicted_n=_as_int(timings.get("predicted_n")),
        predicted_ms=_as_float(timings.get("predicted_ms")),
        predicted_per_second=_as_float(timings.get("predicted_per_second")),
        draft_n=_as_int(timings.get("draft_n")),
        draft_n_accepted=_as_int(timings.get("draft_n_accepted")),
    )


def check_chat_reply(code: int, body: Any) -> ChatResult:
    """Judge a ``/v1/chat/completions`` reply: well-formed, not empty, no template markup."""
    if code != 200:
        return ChatResult(False, reason=_error_message(code, body))
    if not isinstance(body, Mapping):
        return ChatResult(False, reason="reply is not a JSON object")
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], Mapping):
        return ChatResult(False, reason="no choices in the reply")
    finish = choices[0].get("finish_reason")
    finish = finish if isinstance(finish, str) else None
    message = choices[0].get("message")
    if not isinstance(message, Mapping):
        return ChatResult(False, None, finish, "choices[0].message is missing")
    content = message.get("content")
    if not isinstance(content, str):
        return ChatResult(False, None, finish, "choices[0].message.content is missing")
    shown = content[:200]
    for marker in TEMPLATE_MARKUP:
        if marker in content:
            return ChatResult(
                False,
                shown,
                finish,
                f"content holds chat-template markup {marker!r}: the chat template does not fit "
                "the model (a GGUF without tokenizer.chat_template gets llama-server's ChatML "
                f"fallback); set a chat template for this instance. Content: {shown!r}",
            )
    if not content.strip():
        reasoning = message.get("reasoning_content")
        if finish == "length" and isinstance(reasoning, str) and reasoning.strip():
            note = f"chat: the reply was all reasoning within max_tokens {CHAT_MAX_TOKENS}"
            return ChatResult(True, shown, finish, note=note)
        return ChatResult(False, shown, finish, f"empty content (finish_reason {finish!r})")
    return ChatResult(True, shown, finish)


def median_tps(results: Iterable[PromptResult]) -> float | None:
    """Median ``predicted_per_second`` over the successful prompts."""
    values = [
        r.predicted_per_second
        for r in results
        if r.error is None and r.predicted_per_second is not None and r.predicted_per_second > 0
    ]
    return statistics.median(values) if values else None


def acceptance_ratio(results: Iterable[PromptResult]) -> float | None:
    """sum(draft_n_accepted) / sum(draft_n); None when no drafts were made."""
    drafted = accepted = 0
    for r in results:
        if r.error is None and r.draft_n:
            drafted += r.draft_n
            accepted += r.draft_n_accepted or 0
    return accepted / drafted if drafted else None


def sum_draft_tokens(results: Iterable[PromptResult]) -> int:
    return sum(r.draft_n or 0 for r in results if r.error is None)


def threshold_reasons(
    tps: float | None,
    acceptance: float | None,
    min_tps: float | None,
    min_acceptance: float | None,
) -> list[str]:
    """Human-readable reasons for each failed threshold."""
    reasons: list[str] = []
    if min_tps is not None:
        if tps is None:
            reasons.append(f"throughput: no tok/s measured (minimum {min_tps:g})")
        elif tps < min_tps:
            reasons.append(f"throughput: {tps:.2f} tok/s < minimum {min_tps:g}")
    if min_acceptance is not None:
        if acceptance is None:
            reasons.append(f"acceptance: no drafts were made (minimum {min_acceptance:g})")
        elif acceptance < min_acceptance:
            reasons.append(f"acceptance: {acceptance:.3f} < minimum {min_acceptance:g}")
    return reasons


def regression_reasons(
    tps: float | None,
    acceptance: float | None,
    baseline_tps: float | None,
    baseline_acceptance: float | None,
    fraction: float,
) -> list[str]:
    """A reason per figure below ``fraction`` of its tuned baseline, with both figures."""
    reasons: list[str] = []
    for what, value, base, unit in (
        ("throughput", tps, baseline_tps, " tok/s"),
        ("acceptance", acceptance, baseline_acceptance, ""),
    ):
        if value is None or base is None or base <= 0 or value >= fraction * base:
            continue
        reasons.append(
            f"regression: {what} {value:.3g}{unit} is {value / base:.0%} of the tuned baseline "
            f"{base:.3g}{unit} (below {fraction:.0%})"
        )
    return reasons


def decide_status(failures: Sequence[str], busy: bool) -> tuple[str, list[str]]:
    """Failures win over busy; busy alone gives ``skipped`` with reason ``busy``."""
    if failures:
        return "fail", list(failures)
    if busy:
        return "skipped", ["busy"]
    return "pass", []


def report_to_dict(report: Report) -> dict[str, Any]:
    """JSON-ready view of the report."""
    return {
        "instance": report.instance,
        "url": report.url,
        "status": report.status,
        "reasons": list(report.reasons),
        "health": asdict(report.health) if report.health else None,
        "build_info": report.build_info,
        "expect_commit": report.expect_commit,
        "commit_ok": report.commit_ok,
        "model_path": report.model_path,
        "expect_model": report.expect_model,
        "model_ok": report.model_ok,
        "total_slots": report.total_slots,
        "gpu": asdict(report.gpu) if report.gpu else None,
        "chat": asdict(report.chat) if report.chat else None,
        "min_tps": report.min_tps,
        "min_acceptance": report.min_acceptance,
        "n_predict": report.n_predict,
        "tokens_per_second": {
            "median": report.tokens_per_second,
            "per_prompt": {p.name: p.predicted_per_second for p in report.prompts},
        },
        "prompts": [asdict(p) for p in report.prompts],
        "acceptance": report.acceptance,
        "acceptance_by_position": report.acceptance_by_position,
        "baseline": {
            "tokens_per_second": report.baseline_tps,
            "acceptance": report.baseline_acceptance,
            "regression": report.regression,
            "regressed": report.regressed,
        },
        "notes": list(report.notes),
        "duration_seconds": report.duration_seconds,
        "finished_at": report.finished_at,
    }


def report_from_dict(data: Mapping[str, Any]) -> Report:
    """The report back from its JSON view (what ``report_to_dict`` wrote)."""
    health = data.get("health")
    gpu = data.get("gpu")
    chat = data.get("chat")
    tps = data.get("tokens_per_second") or {}
    return Report(
        instance=data["instance"],
        url=data["url"],
        status=data["status"],
        reasons=list(data.get("reasons") or []),
        health=HealthResult(**health) if health else None,
        build_info=data.get("build_info"),
        expect_commit=data.get("expect_commit"),
        commit_ok=data.get("commit_ok"),
        model_path=data.get("model_path"),
        expect_model=data.get("expect_model"),
        model_ok=data.get("model_ok"),
        total_slots=data.get("total_slots"),
        gpu=GpuResidency(**gpu) if gpu else None,
        chat=ChatResult(**chat) if chat else None,
        min_tps=data.get("min_tps"),
        min_acceptance=data.get("min_acceptance"),
        n_predict=data.get("n_predict", DEFAULT_N_PREDICT),
        prompts=[PromptResult(**p) for p in data.get("prompts") or []],
        tokens_per_second=tps.get("median"),
        acceptance=data.get("acceptance"),
        acceptance_by_position=data.get("acceptance_by_position"),
        notes=list(data.get("notes") or []),
        duration_seconds=data.get("duration_seconds", 0.0),
        finished_at=data.get("finished_at", 0.0),
    )


def load_report(path: str) -> Report:
    """Read a report written by this check (``--json``)."""
    with open(path, encoding="utf-8") as fh:
        return report_from_dict(json.load(fh))


def prometheus_registry(report: Report) -> CollectorRegistry:
    """The report's metrics; a family is left out when its value was not measured."""
    registry = CollectorRegistry()

    def family(name: str, help_text: str, samples: list[tuple[dict[str, str], float]]) -> None:
        if not samples:
            return
        extra = sorted(samples[0][0])
        gauge = Gauge(METRIC_PREFIX + name, help_text, ["instance_name", *extra], registry=registry)
        for labels, value in samples:
            gauge.labels(instance_name=report.instance, **labels).set(value)

    def one(value: float | None) -> list[tuple[dict[str, str], float]]:
        return [] if value is None else [({}, value)]

    family(
        "tokens_per_second",
        "Median generation speed over the smoke prompts, tokens per second.",
        one(report.tokens_per_second),
    )
    family(
        "acceptance_ratio",
        "Draft tokens accepted / draft tokens generated during the smoke run.",
        one(report.acceptance),
    )
    family(
        "acceptance_ratio_by_position",
        "Fraction of draft verification steps that accepted the draft token at this "
        "0-based position.",
        [({"position": str(i)}, v) for i, v in enumerate(report.acceptance_by_position or [])],
    )
    healthy = report.health is not None and report.health.ok
    family("healthy", "1 if /health answered 200 within the timeout.", one(float(healthy)))
    family("passed", "1 if the smoke check passed.", one(float(report.status == "pass")))
    family(
        "skipped",
        "1 if the smoke check was skipped because the slot was busy.",
        one(float(report.status == "skipped")),
    )
    if report.gpu is not None:
        family(
            "gpu_resident",
            "1 if the server process holds at least the minimum GPU memory.",
            one(float(report.gpu.ok)),
        )
    if report.chat is not None:
        family(
            "chat_ok",
            "1 if the /v1/chat/completions reply was well-formed (content, no template markup).",
            one(float(report.chat.ok)),
        )
    family(
        "min_tokens_per_second",
        "The smoke check's minimum tokens/s (--min-tps).",
        one(report.min_tps),
    )
    family(
        "min_acceptance_ratio",
        "The smoke check's minimum draft acceptance (--min-acceptance).",
        one(report.min_acceptance),
    )
    if report.build_info is not None:
        _, commit = parse_build_info(report.build_info)
        family(
            "build_info",
            "llama-server build reported by /props (always 1).",
            [({"build": report.build_info, "commit": commit or ""}, 1.0)],
        )
    family(
        "baseline_tokens_per_second",
        "Tuned baseline tokens per second the smoke check compares against.",
        one(report.baseline_tps),
    )
    family(
        "baseline_acceptance_ratio",
        "Tuned baseline draft acceptance the smoke check compares against.",
        one(report.baseline_acceptance),
    )
    if report.regressed is not None:
        family(
            "regressed",
            "1 if tok/s or acceptance fell below the regression fraction of its tuned baseline.",
            one(float(report.regressed)),
        )
    family(
        "duration_seconds", "Wall time of the smoke check, seconds.", one(report.duration_seconds)
    )
    family(
        "last_run_timestamp_seconds",
        "Unix time at which the smoke check finished.",
        one(report.finished_at),
    )
    return registry


def render_prometheus(report: Report) -> str:
    """The text exposition of :func:`prometheus_registry` (what the textfile holds)."""
    return generate_latest(prometheus_registry(report)).decode()


def summary_line(report: Report) -> str:
    """One-line human summary."""
    parts = [f"smoke {report.instance} {report.status.upper()}:"]
    parts.append(
        f"{report.tokens_per_second:.1f} tok/s median"
        if report.tokens_per_second is not None
        else "tok/s n/a"
    )
    parts.append(
        f"acceptance {report.acceptance:.3f}" if report.acceptance is not None else "acceptance n/a"
    )
    if report.acceptance_by_position:
        parts.append("by pos [" + " ".join(f"{v:.2f}" for v in report.acceptance_by_position) + "]")
    parts.append(f"build {report.build_info or 'n/a'}")
    if report.gpu is not None:
        parts.append(f"gpu {report.gpu.used_mib} MiB" if report.gpu.ok else "gpu NOT resident")
    parts.append(f"{report.duration_seconds:.1f}s")
    text = ", ".join([" ".join(parts[:2]), *parts[2:]])
    if report.reasons:
        text += " | " + "; ".join(report.reasons)
    return text


# ------------------------------------------------------------------------------ I/O


def write_atomic(path: str, text: str, mode: int = 0o644) -> None:
    """Write ``text`` to ``path`` via a temp file in the same directory + rename."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".smoke-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)  # mkstemp makes 0600; node_exporter must read it
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class HttpClient:
    """Tiny JSON/text client for llama-server; ignores *_proxy environment variables."""

    def __init__(self, base_url: str, api_key: str | None, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        auth: bool = True,
        timeout: float | None = None,
    ) -> tuple[int, bytes]:
        """Return ``(status, body)``; HTTP errors are returned, network errors raise."""
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if auth and self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(  # noqa: S310 - scheme validated in parse_args
            self.base_url + path, data=data, headers=headers, method=method
        )
        try:
            with self._opener.open(req, timeout=timeout or self.timeout) as resp:
                return int(resp.status), bytes(resp.read())
        except urllib.error.HTTPError as e:
            return int(e.code), bytes(e.read())

    def get_json(self, path: str, *, timeout: float | None = None) -> tuple[int, Any]:
        code, raw = self.request("GET", path, timeout=timeout)
        return code, _loads(raw)

    def post_json(self, path: str, body: Any, *, timeout: float | None = None) -> tuple[int, Any]:
        code, raw = self.request("POST", path, body, timeout=timeout)
        return code, _loads(raw)


NETWORK_ERRORS: tuple[type[BaseException], ...] = (OSError, http.client.HTTPException)


def _loads(raw: bytes) -> Any:
    try:
        return json.loads(raw.decode("utf-8", "replace"))
    except ValueError:
        return None


def _network_error(e: BaseException) -> str:
    if isinstance(e, urllib.error.URLError) and not isinstance(e.reason, str):
        e = e.reason
    return f"{type(e).__name__}: {e}"


def _error_message(code: int, body: Any) -> str:
    if isinstance(body, Mapping):
        err = body.get("error")
        if isinstance(err, Mapping) and isinstance(err.get("message"), str):
            return f"HTTP {code}: {err['message']}"
    return f"HTTP {code}"


def wait_health(
    client: HttpClient,
    timeout: float,
    poll: float = 1.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> HealthResult:
    """Poll ``/health`` until 200 ``{"status":"ok"}`` or ``timeout`` seconds."""
    start = clock()
    code: int | None = None
    error: str | None = None
    while True:
        remaining = timeout - (clock() - start)
        try:
            code, raw = client.request(
                "GET", "/health", auth=False, timeout=max(1.0, min(5.0, remaining))
            )
            body = _loads(raw)
            if code == 200 and isinstance(body, Mapping) and body.get("status") == "ok":
                return HealthResult(True, code, round(clock() - start, 3))
            error = _error_message(code, body)
        except NETWORK_ERRORS as e:
            code, error = None, _network_error(e)
        remaining = timeout - (clock() - start)
        if remaining <= 0:
            return HealthResult(False, code, round(clock() - start, 3), error)
        sleep(min(poll, remaining))


def run_nvidia_smi(timeout: float = 15.0) -> tuple[str | None, str | None]:
    """``(stdout, None)`` or ``(None, reason)``."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None, "gpu: nvidia-smi not found on this host but --gpu was given"
    try:
        proc = subprocess.run(
            [exe, *NVIDIA_SMI_ARGS], capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"gpu: nvidia-smi failed: {e}"
    if proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        return None, f"gpu: nvidia-smi exited {proc.returncode}: {msg[0] if msg else ''}"
    return proc.stdout, None


def unit_log(unit: str, timeout: float = 15.0) -> str:
    """The journal of the unit's current invocation ("" when unreadable or not under systemd)."""
    try:
        inv = subprocess.run(
            ["systemctl", "show", "-p", "InvocationID", "--value", unit],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        ).stdout.strip()
        if not inv:
            return ""
        return subprocess.run(
            ["journalctl", "--no-pager", "-o", "cat", f"_SYSTEMD_INVOCATION_ID={inv}"],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


def slots_all_busy(slots: Any) -> bool | None:
    """True if every slot ``is_processing`` (None if ``slots`` is not a slot list)."""
    if not isinstance(slots, list) or not slots:
        return None
    return all(isinstance(s, Mapping) and bool(s.get("is_processing")) for s in slots)


def server_busy(client: HttpClient) -> bool | None:
    """Whether no slot is idle, from /slots, else /metrics; None if unknown."""
    try:
        code, slots = client.get_json("/slots")
        if code == 200:
            busy = slots_all_busy(slots)
            if busy is not None:
                return busy
        code, raw = client.request("GET", "/metrics")
        if code == 200:
            samples = parse_metrics_text(raw.decode("utf-8", "replace"))
            processing = samples.get(("llamacpp:requests_processing", ()))
            code, props = client.get_json("/props")
            total = props.get("total_slots") if isinstance(props, Mapping) else None
            if processing is not None and isinstance(total, int):
                return processing >= total
    except NETWORK_ERRORS:
        return None
    return None


def wait_until_idle(
    client: HttpClient,
    budget: float,
    poll: float = 1.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> bool | None:
    """True once a slot is idle, False if still busy after ``budget`` s, None if unknown."""
    start = clock()
    while True:
        busy = server_busy(client)
        if busy is None:
            return None
        if not busy:
            return True
        remaining = budget - (clock() - start)
        if remaining <= 0:
            return False
        sleep(min(poll, remaining))


def fetch_spec_counters(client: HttpClient) -> SpecCounters | None:
    try:
        code, raw = client.request("GET", "/metrics")
    except NETWORK_ERRORS:
        return None
    if code != 200:
        return None
    return spec_counters(parse_metrics_text(raw.decode("utf-8", "replace")))


def run_chat(client: HttpClient, timeout: float) -> ChatResult:
    """One short ``/v1/chat/completions`` request, judged by :func:`check_chat_reply`."""
    body = {
        "messages": [{"role": "user", "content": CHAT_PROMPT}],
        "max_tokens": CHAT_MAX_TOKENS,
        "temperature": 0,
        "stream": False,
    }
    try:
        code, reply = client.post_json("/v1/chat/completions", body, timeout=timeout)
    except NETWORK_ERRORS as e:
        return ChatResult(False, reason=_network_error(e))
    return check_chat_reply(code, reply)


def run_prompt(
    client: HttpClient, name: str, text: str, n_predict: int, timeout: float
) -> PromptResult:
    """Apply the server's chat template, then one ``/completion`` call."""
    templated = False
    prompt = text
    try:
        code, body = client.post_json(
            "/apply-template", {"messages": [{"role": "user", "content": text}]}
        )
        if code == 200 and isinstance(body, Mapping) and isinstance(body.get("prompt"), str):
            prompt, templated = body["prompt"], True
        code, body = client.post_json(
            "/completion",
            {
                "prompt": prompt,
                "n_predict": n_predict,
                "temperature": 0,
                "cache_prompt": False,
                "stream": False,
            },
            timeout=timeout,
        )
    except NETWORK_ERRORS as e:
        return PromptResult(name=name, templated=templated, error=_network_error(e))
    if code != 200 or not isinstance(body, Mapping):
        return PromptResult(name=name, templated=templated, error=_error_message(code, body))
    result = prompt_result_from_completion(name, body)
    result.templated = templated
    return result


@dataclass(frozen=True)
class Config:
    url: str
    instance: str
    expect_commit: str
    expect_model: str
    gpu: bool = False
    pid: int | None = None
    gpu_min_mib: int = DEFAULT_GPU_MIN_MIB
    unit: str | None = None
    api_key: str | None = None
    min_tps: float | None = None
    min_acceptance: float | None = None
    baseline_tps: float | None = None
    baseline_acceptance: float | None = None
    regression: float = 0.8
    n_predict: int = DEFAULT_N_PREDICT
    health_timeout: float = 120.0
    busy_wait: float = 5.0
    request_timeout: float = 120.0
    poll: float = 1.0  # seconds between /health and /slots polls


def run_smoke(cfg: Config, client: HttpClient | None = None) -> Report:
    """Run all checks against the live server and return the report."""
    t0 = time.monotonic()
    client = client or HttpClient(cfg.url, cfg.api_key)
    report = Report(
        instance=cfg.instance,
        url=cfg.url,
        expect_commit=cfg.expect_commit,
        expect_model=cfg.expect_model,
        n_predict=cfg.n_predict,
        min_tps=cfg.min_tps,
        min_acceptance=cfg.min_acceptance,
        baseline_tps=cfg.baseline_tps,
        baseline_acceptance=cfg.baseline_acceptance,
        regression=cfg.regression if cfg.baseline_tps or cfg.baseline_acceptance else None,
    )
    failures: list[str] = []
    busy = False

    # 1. health
    report.health = wait_health(client, cfg.health_timeout, cfg.poll)
    if not report.health.ok:
        failures.append(f"health: not ready after {cfg.health_timeout:g}s ({report.health.error})")
    else:
        # 2. props
        try:
            code, props = client.get_json("/props")
        except NETWORK_ERRORS as e:
            code, props = 0, None
            failures.append(f"props: {_network_error(e)}")
        if code == 200 and isinstance(props, Mapping):
            bi, mp, ts = props.get("build_info"), props.get("model_path"), props.get("total_slots")
            report.build_info = bi if isinstance(bi, str) else None
            report.model_path = mp if isinstance(mp, str) else None
            report.total_slots = ts if isinstance(ts, int) else None
            report.commit_ok = report.build_info is not None and commit_matches(
                report.build_info, cfg.expect_commit
            )
            if not report.commit_ok:
                failures.append(f"build: {report.build_info!r} is not commit {cfg.expect_commit}")
            report.model_ok = report.model_path == cfg.expect_model
            if not report.model_ok:
                failures.append(f"model: {report.model_path!r} != {cfg.expect_model!r}")
        elif code == 200:
            failures.append("props: unexpected /props response (not a JSON object)")
        elif code:
            failures.append(f"props: {_error_message(code, props)}")

    # 3. GPU residency
    if cfg.gpu:
        pid = cfg.pid if cfg.pid is not None else -1
        out, err = run_nvidia_smi()
        if out is None:
            report.gpu = GpuResidency(False, pid, None, cfg.gpu_min_mib, err)
        else:
            report.gpu = gpu_residency(out, pid, cfg.gpu_min_mib)
        fallback = cpu_fallback_lines(unit_log(cfg.unit)) if cfg.unit else []
        if fallback:
            failures.append(f"gpu: CPU fallback, the server logged: {fallback[0]}")
        if not report.gpu.ok and report.gpu.reason:
            failures.append(report.gpu.reason)

    # 4 + 5. busy check before every request, the chat check, then throughput
    if report.health.ok and wait_until_idle(client, cfg.busy_wait, cfg.poll) is False:
        busy = True
    elif report.health.ok:
        report.chat = run_chat(client, cfg.request_timeout)
        if report.chat.reason:
            failures.append(f"chat: {report.chat.reason}")
        if report.chat.note:
            report.notes.append(report.chat.note)
    if report.health.ok and not busy:
        before = fetch_spec_counters(client)
        for name, text in PROMPTS:
            idle = wait_until_idle(client, cfg.busy_wait, cfg.poll)
            if idle is False:
                busy = True
                break
            if idle is None and BUSY_UNKNOWN not in report.notes:
                report.notes.append(BUSY_UNKNOWN)
            result = run_prompt(client, name, text, cfg.n_predict, cfg.request_timeout)
            report.prompts.append(result)
            if result.error:
                failures.append(f"completion {name}: {result.error}")
                break  # the next prompts would fail the same way
        completed = bool(report.prompts) and all(p.error is None for p in report.prompts)
        if not busy and completed:
            report.tokens_per_second = median_tps(report.prompts)
            report.acceptance = acceptance_ratio(report.prompts)
            after = fetch_spec_counters(client)
            if before is None or after is None:
                report.notes.append("per-position acceptance: /metrics unavailable")
            else:
                ratios, note = per_position_acceptance(
                    before, after, sum_draft_tokens(report.prompts)
                )
                report.acceptance_by_position = ratios
                if note:
                    report.notes.append(f"per-position acceptance: {note}")
            # 6. thresholds
            failures.extend(
                threshold_reasons(
                    report.tokens_per_second,
                    report.acceptance,
                    cfg.min_tps,
                    cfg.min_acceptance,
                )
            )
            if report.regression is not None:
                regressions = regression_reasons(
                    report.tokens_per_second,
                    report.acceptance,
                    cfg.baseline_tps,
                    cfg.baseline_acceptance,
                    report.regression,
                )
                report.regressed = bool(regressions)
                failures.extend(regressions)

    report.status, report.reasons = decide_status(failures, busy)
    report.duration_seconds = round(time.monotonic() - t0, 3)
    report.finished_at = round(time.time(), 3)
    return report


# ------------------------------------------------------------------------------ CLI


class _UsageError(Exception):
    pass


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="smoke_check.py",
        description="Smoke-check one llama-server instance (exit 0 pass/skipped, 1 fail).",
    )
    p.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:8080")
    p.add_argument("--instance", required=True, help="instance name (instance_name label)")
    p.add_argument("--expect-commit", required=True, help="llama.cpp commit, short or full sha")
    p.add_argument("--expect-model", required=True, help="expected /props model_path")
    p.add_argument("--gpu", action="store_true", help="require GPU residency of --pid")
    p.add_argument("--pid", type=_positive_int, help="llama-server PID (systemd MainPID)")
    p.add_argument("--unit", help="systemd unit of the server: its MainPID is used as --pid")
    p.add_argument("--gpu-min-mib", type=_positive_int, default=DEFAULT_GPU_MIN_MIB)
    p.add_argument("--api-key-file", help="file holding the server's API key")
    p.add_argument("--min-tps", type=_positive_float, help="minimum median tokens/s")
    p.add_argument("--min-acceptance", type=float, help="minimum draft acceptance (0..1)")
    p.add_argument("--baseline-tps", type=_positive_float, help="tuned baseline median tok/s")
    p.add_argument("--baseline-acceptance", type=float, help="tuned baseline acceptance (0..1)")
    p.add_argument(
        "--regression",
        type=_positive_float,
        default=0.8,
        help="fail below this fraction of a baseline (default 0.8)",
    )
    p.add_argument("--n-predict", type=_positive_int, default=DEFAULT_N_PREDICT)
    p.add_argument("--health-timeout", type=_positive_float, default=120.0, help="seconds")
    p.add_argument("--busy-wait", type=float, default=5.0, help="seconds to wait for an idle slot")
    p.add_argument("--request-timeout", type=_positive_float, default=120.0, help="per prompt, s")
    p.add_argument("--json", required=True, dest="json_path", help="JSON report path")
    p.add_argument("--prom", required=True, dest="prom_path", help="Prometheus textfile path")
    return p


def unit_main_pid(unit: str) -> int | None:
    """MainPID of a systemd unit, None when it has none (not running) or systemctl is missing."""
    try:
        out = subprocess.run(
            ["systemctl", "show", "-p", "MainPID", "--value", unit],
            capture_output=True,
            text=True,
            timeout=15,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return int(out) if out.isdigit() and int(out) > 0 else None


def config_from_args(ns: argparse.Namespace) -> Config:
    """Validate parsed arguments; raises _UsageError."""
    parsed = urllib.parse.urlsplit(ns.url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise _UsageError(f"--url must be http(s)://host:port, got {ns.url!r}")
    if not is_commit_sha(ns.expect_commit):
        raise _UsageError(f"--expect-commit must be 7-40 hex digits, got {ns.expect_commit!r}")
    if ns.unit and ns.pid is None:
        ns.pid = unit_main_pid(ns.unit)
    if ns.gpu and ns.pid is None:
        raise _UsageError("--gpu needs --pid (or --unit of a running server)")
    if ns.min_acceptance is not None and not 0 <= ns.min_acceptance <= 1:
        raise _UsageError("--min-acceptance must be within 0..1")
    if ns.baseline_acceptance is not None and not 0 <= ns.baseline_acceptance <= 1:
        raise _UsageError("--baseline-acceptance must be within 0..1")
    if ns.regression > 1:
        raise _UsageError("--regression must be a fraction within 0..1")
    if ns.busy_wait < 0:
        raise _UsageError("--busy-wait must be >= 0")
    api_key = None
    if ns.api_key_file:
        try:
            with open(ns.api_key_file, encoding="utf-8") as fh:
                # The first key; lines starting with # are comments (as llama-server reads it).
                keys = [ln.strip() for ln in fh if ln.strip() and not ln.startswith("#")]
                api_key = keys[0] if keys else None
        except OSError as e:
            raise _UsageError(f"--api-key-file: {e}") from e
    return Config(
        url=ns.url,
        instance=ns.instance,
        expect_commit=ns.expect_commit,
        expect_model=ns.expect_model,
        gpu=ns.gpu,
        pid=ns.pid,
        gpu_min_mib=ns.gpu_min_mib,
        unit=ns.unit,
        api_key=api_key,
        min_tps=ns.min_tps,
        min_acceptance=ns.min_acceptance,
        baseline_tps=ns.baseline_tps,
        baseline_acceptance=ns.baseline_acceptance,
        regression=ns.regression,
        n_predict=ns.n_predict,
        health_timeout=ns.health_timeout,
        busy_wait=ns.busy_wait,
        request_timeout=ns.request_timeout,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)  # exits 2 on usage errors
    try:
        cfg = config_from_args(ns)
    except _UsageError as e:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    report = run_smoke(cfg)
    print(summary_line(report), flush=True)
    try:
        write_atomic(ns.json_path, json.dumps(report_to_dict(report), indent=2) + "\n")
        write_to_textfile(ns.prom_path, prometheus_registry(report))
        os.chmod(ns.prom_path, 0o644)  # node_exporter, another user, reads it whatever the umask
    except OSError as e:
        print(f"{parser.prog}: error: cannot write report: {e}", file=sys.stderr)
        return EXIT_FAIL
    return EXIT_FAIL if report.status == "fail" else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
