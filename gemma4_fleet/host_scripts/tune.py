#!/usr/bin/env python3
"""Measure one llama-server instance on its own host for `gemma4-fleet tune` (stdlib only).

Copied to the host and run there as root with the host's python3. The controller renders every
command line (the instance's own models, planned ctx and flags, with the changes under test) and
passes them in a JSON spec; this script only runs them, measures, and picks:

1. **Drain**: waits (bounded, ``drain_timeout``) until no slot of the running service is
   processing (``/slots``, else ``/metrics`` ``requests_processing``). A service still busy then
   is left alone and the instance is reported ``busy``: a user's request is never cut.
2. If ``stop_service`` (the controller's plan says a second copy does not fit the GPU), the
   service is stopped; it is always started again at the end and waited for (``/health`` 200),
   whatever happened in between.
3. **KV types**: ``llama-bench`` decode tok/s (``-p 0 -n N -d depth``) for each KV type that fits.
   The order, fastest first, is the kv_order the planner's ``cache_type auto`` uses.
4. **Single stream** with the fastest KV type: a temporary ``llama-server`` on a spare port per
   candidate (MTP off, ``--spec-draft-n-max`` 1..6) over the prompt set: tok/s (generated tokens
   / generation time over all prompts), acceptance, acceptance per draft position (``/metrics``).
5. **Slots** (only when the instance asks for N > 1): aggregate tok/s of N concurrent clients at
   ``--parallel N`` with MTP off and with the best draft length, and at ``--parallel 1``.
6. **Recipe**: the seed 003 flags on the same prompts, for the recipe-vs-tuned ratio.
7. **Baseline**: the chosen settings over the smoke check's prompts (its n_predict, median tok/s
   as the smoke check computes it): the figures the scheduled smoke check compares against.

Choosing: the fastest candidate wins, unless the incumbent (what the host runs now) is within
``margin`` of it: measurement noise never flips a setting back and forth, and a rerun with
nothing changed changes nothing. The result is never slower than the recipe as measured: if the
recipe beats the pick, the recipe's settings are kept.

Placeholders in the rendered argv: ``{port}`` (a free local port), ``{kv}`` (the KV type under
test or chosen), ``{draft_n}`` (the chosen draft length).

Usage: ``tune.py --spec SPEC.json`` prints the result as one JSON document on stdout; progress
goes to stderr. Exit 0 when measured, 1 on an error, 3 when the service stayed busy.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

EXIT_OK, EXIT_ERROR, EXIT_BUSY = 0, 1, 3
NETWORK_ERRORS = (OSError, ValueError)


class TuneError(RuntimeError):
    """A measurement could not be made (server did not start, llama-bench failed, ...)."""


# ------------------------------------------------------------------------------ pure functions


def fill(argv: Sequence[str], values: Mapping[str, object]) -> list[str]:
    """argv with the ``{name}`` placeholders replaced (only whole or embedded known names)."""
    out = []
    for arg in argv:
        for name, value in values.items():
            arg = arg.replace("{" + name + "}", str(value))
        out.append(arg)
    return out


def bench_tps(text: str) -> float | None:
    """Decode tok/s from ``llama-bench -o json`` (the test with n_gen > 0)."""
    try:
        rows = json.loads(text)
    except ValueError:
        return None
    if not isinstance(rows, list):
        return None
    for row in rows:
        if isinstance(row, Mapping) and row.get("n_gen", 0) and row.get("n_prompt", 0) == 0:
            value = row.get("avg_ts")
            if isinstance(value, int | float) and value > 0:
                return float(value)
    return None


_SAMPLE = re.compile(r"^(llamacpp:[a-z_]+)(\{[^}]*\})?\s+(\S+)\s*$")


def spec_counters(text: str) -> dict[str, float]:
    """The speculative-decoding counters of a ``/metrics`` scrape; per position as ``pos<i>``."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line.strip())
        if not m:
            continue
        name, labels, value = m.groups()
        try:
            number = float(value)
        except ValueError:
            continue
        short = name.removeprefix("llamacpp:")
        if short == "spec_decode_num_accepted_tokens_per_pos_total":
            pos = re.search(r'position="(\d+)"', labels or "")
            if pos:
                out[f"pos{pos.group(1)}"] = number
        elif short in ("spec_decode_num_drafts_total", "spec_decode_num_draft_tokens_total"):
            out[short] = number
    return out


def by_position(before: Mapping[str, float], after: Mapping[str, float]) -> list[float] | None:
    """Share of verification steps that accepted the draft token at each 0-based position."""
    drafts = after.get("spec_decode_num_drafts_total", 0) - before.get(
        "spec_decode_num_drafts_total", 0
    )
    positions = sorted(int(k[3:]) for k in after if k.startswith("pos"))
    if drafts <= 0 or not positions:
        return None
    return [
        round((after.get(f"pos{i}", 0) - before.get(f"pos{i}", 0)) / drafts, 4)
        for i in range(positions[-1] + 1)
    ]


def summarize(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Figures of one candidate from its ``/completion`` timings.

    ``tps``: generated tokens / generation time over all prompts (what a user waits for);
    ``median_tps``: the median of the per-prompt ``predicted_per_second`` (what the smoke check
    reports); ``acceptance``: accepted / drafted tokens, None without drafts.
    """
    n = sum(int(r.get("predicted_n") or 0) for r in results)
    ms = sum(float(r.get("predicted_ms") or 0.0) for r in results)
    per = [float(r["predicted_per_second"]) for r in results if r.get("predicted_per_second")]
    drafted = sum(int(r.get("draft_n") or 0) for r in results)
    accepted = sum(int(r.get("draft_n_accepted") or 0) for r in results)
    return {
        "tps": round(n / ms * 1000.0, 3) if ms > 0 else None,
        "median_tps": round(statistics.median(per), 3) if per else None,
        "acceptance": round(accepted / drafted, 4) if drafted else None,
        "predicted_n": n,
        "draft_n": drafted,
        "draft_n_accepted": accepted,
    }


def pick(figures: Mapping[str, float | None], incumbent: str | None, margin: float) -> str:
    """The fastest label; the incumbent when it is within ``margin`` (a fraction) of it."""
    measured = {k: v for k, v in figures.items() if v is not None and v > 0}
    if not measured:
        raise TuneError("no candidate produced a measurement")
    best = max(measured, key=lambda k: (measured[k], k))
    if incumbent in measured and measured[incumbent] * (1.0 + margin) >= measured[best]:
        return incumbent
    return best


def recipe_wins(recipe_tps: float | None, chosen_tps: float | None, margin: float) -> bool:
    """Whether the recipe measured faster than the chosen setting by more than `margin`."""
    return (recipe_tps or 0.0) > (chosen_tps or 0.0) * (1.0 + margin)


def kv_order(
    figures: Mapping[str, float | None], incumbent: str | None, margin: float
) -> list[str]:
    """KV types fastest first, the picked one (see ``pick``) leading."""
    first = pick(figures, incumbent, margin)
    rest = sorted(
        (k for k, v in figures.items() if k != first and v),
        key=lambda k: -(figures[k] or 0.0),
    )
    return [first, *rest]


def slots_idle(slots: Any) -> bool | None:
    """True when no slot is processing; None if ``slots`` is not a slot list."""
    if not isinstance(slots, list):
        return None
    return not any(isinstance(s, Mapping) and s.get("is_processing") for s in slots)


# ------------------------------------------------------------------------------------- I/O


def log(message: str) -> None:
    print(f"tune: {message}", file=sys.stderr, flush=True)


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http(url: str, body: Any = None, timeout: float = 10.0) -> tuple[int, bytes]:
    """(status, body); HTTP errors are returned, network errors raise."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if data else {}
    req = urllib.request.Request(url, data=data, headers=headers)  # noqa: S310 - local URLs
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            return int(resp.status), bytes(resp.read())
    except urllib.error.HTTPError as e:
        return int(e.code), bytes(e.read())


def healthy(url: str) -> bool:
    try:
        code, raw = http(url + "/health", timeout=5.0)
    except NETWORK_ERRORS:
        return False
    return code == 200 and b'"ok"' in raw


def wait_healthy(url: str, timeout: float, alive: Callable[[], bool] = lambda: True) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if healthy(url):
            return True
        if not alive():
            return False
        time.sleep(0.5)
    return False


def service_idle(url: str) -> bool | None:
    """Whether the running service has no request in flight (None: cannot tell, e.g. down)."""
    try:
        code, raw = http(url + "/slots")
        if code == 200:
            idle = slots_idle(json.loads(raw or b"null"))
            if idle is not None:
                return idle
        code, raw = http(url + "/metrics")
        if code == 200:
            m = re.search(rb"^llamacpp:requests_processing\s+(\S+)", raw, re.M)
            if m:
                return float(m.group(1)) == 0
    except NETWORK_ERRORS:
        return None
    return None


def drain(url: str, timeout: float, poll: float = 1.0) -> bool:
    """Wait until the service is idle; False if it is still busy after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        idle = service_idle(url)
        if idle is None or idle:
            return True  # down or idle: nothing to cut
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def systemctl(*args: str) -> None:
    subprocess.run(["systemctl", *args], check=True, capture_output=True, timeout=120)


class TempServer:
    """A llama-server on a spare local port, stopped (TERM, then KILL) when the block ends."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], spec: Mapping[str, Any]):
        self.port = free_port()
        self.argv = fill(argv, {"port": self.port})
        self.env = {**os.environ, **env}
        self.user = spec.get("user")
        self.timeout = float(spec.get("health_timeout", 600))
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in __exit__
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> TempServer:
        argv = self.argv if not self.user else ["runuser", "-u", str(self.user), "--", *self.argv]
        self.proc = subprocess.Popen(argv, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        proc = self.proc
        if not wait_healthy(self.url, self.timeout, alive=lambda: proc.poll() is None):
            self.__exit__(None, None, None)
            raise TuneError(f"temporary server did not become healthy: {self.tail()}")
        return self

    def tail(self) -> str:
        self.log.seek(0)
        lines = self.log.read().decode("utf-8", "replace").strip().splitlines()
        return " | ".join(lines[-5:])

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self.log.close()

    def complete(self, prompt: str, n_predict: int, timeout: float = 600.0) -> dict[str, Any]:
        """One request at temperature 0, through the server's chat template as the smoke check
        sends it (the raw text when the server has no template)."""
        code, raw = http(
            self.url + "/apply-template", {"messages": [{"role": "user", "content": prompt}]}
        )
        templated = json.loads(raw or b"null") if code == 200 else None
        if isinstance(templated, Mapping) and isinstance(templated.get("prompt"), str):
            prompt = templated["prompt"]
        body = {
            "prompt": prompt,
            "n_predict": n_predict,
            "temperature": 0,
            "cache_prompt": False,
            "stream": False,
        }
        code, raw = http(self.url + "/completion", body, timeout=timeout)
        reply = json.loads(raw or b"null")
        if code != 200 or not isinstance(reply, Mapping) or "timings" not in reply:
            raise TuneError(f"/completion answered {code}: {raw[:200]!r}")
        timings = reply["timings"]
        return {k: timings.get(k) for k in _TIMINGS}

    def metrics(self) -> dict[str, float]:
        try:
            code, raw = http(self.url + "/metrics")
        except NETWORK_ERRORS:
            return {}
        return spec_counters(raw.decode("utf-8", "replace")) if code == 200 else {}


_TIMINGS = ("predicted_n", "predicted_ms", "predicted_per_second", "draft_n", "draft_n_accepted")


def single_stream(server: TempServer, spec: Mapping[str, Any]) -> dict[str, Any]:
    """The prompt set, one request at a time, ``reps`` times; figures and per-position."""
    server.complete("Hello", 8)  # warm-up: first-request allocations are not measured
    before = server.metrics()
    results = []
    for _ in range(int(spec.get("reps", 1))):
        for prompt in spec["prompts"]:
            results.append(server.complete(prompt["text"], int(spec["n_predict"])))
    figures = summarize(results)
    figures["by_position"] = by_position(before, server.metrics())
    return figures


def concurrent(server: TempServer, spec: Mapping[str, Any], clients: int) -> dict[str, Any]:
    """Aggregate tok/s of ``clients`` clients each sending the prompt set at once."""
    server.complete("Hello", 8)
    results: list[dict[str, Any]] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client() -> None:
        for prompt in spec["prompts"]:
            try:
                got = server.complete(prompt["text"], int(spec["n_predict"]))
            except (TuneError, OSError, ValueError) as e:
                with lock:
                    errors.append(str(e))
                return
            with lock:
                results.append(got)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    began = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - began
    if errors:
        raise TuneError(f"concurrent clients failed: {errors[0]}")
    tokens = sum(int(r.get("predicted_n") or 0) for r in results)
    return {"aggregate_tps": round(tokens / wall, 3), "clients": clients, "seconds": round(wall, 3)}


def bench(spec: Mapping[str, Any], env: Mapping[str, str]) -> dict[str, float | None]:
    """llama-bench decode tok/s per KV type."""
    out: dict[str, float | None] = {}
    for kv in spec["kv_types"]:
        argv = fill(spec["bench_argv"], {"kv": kv})
        log(f"llama-bench {kv}")
        proc = subprocess.run(
            argv,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=float(spec.get("bench_timeout", 1800)),
            check=False,
        )
        out[kv] = bench_tps(proc.stdout) if proc.returncode == 0 else None
        if out[kv] is None:
            log(f"llama-bench {kv} failed: {proc.stderr.strip()[-300:]}")
    return out


@contextlib.contextmanager
def service_paused(spec: Mapping[str, Any], result: dict[str, Any]) -> Iterator[None]:
    """Stop the service for the block if the spec says so; always start it again after."""
    unit, url = spec["unit"], spec["service_url"]
    was_up = healthy(url)
    stopped = False
    try:
        if spec.get("stop_service") and was_up:
            log(f"stopping {unit} (a second copy does not fit the GPU)")
            systemctl("stop", unit)
            stopped = True
        yield
    finally:
        restored = None
        if stopped:
            systemctl("start", unit)
            restored = wait_healthy(url, float(spec.get("health_timeout", 600)))
            log(f"{unit} started again, healthy: {restored}")
        result["service"] = {"was_up": was_up, "stopped": stopped, "restored": restored}


def measure(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The whole measurement of one instance (see the module doc); the result as a dict."""
    margin = float(spec.get("margin", 0.05))
    incumbent = spec.get("incumbent") or {}
    env = {str(k): str(v) for k, v in (spec.get("env") or {}).items()}
    result: dict[str, Any] = {"instance": spec["instance"], "status": "ok"}
    if not drain(spec["service_url"], float(spec.get("drain_timeout", 120))):
        result["status"] = "busy"
        result["error"] = f"{spec['unit']} stayed busy for {spec.get('drain_timeout', 120)} s"
        return result
    with service_paused(spec, result):
        kv_figures = bench(spec, env)
        result["kv"] = kv_figures
        order = kv_order(kv_figures, incumbent.get("kv"), margin)
        result["kv_order"] = order

        single: dict[str, Any] = {}
        for cand in spec["single"]:
            log(f"server {cand['label']} ({order[0]} KV)")
            with TempServer(fill(cand["argv"], {"kv": order[0]}), env, spec) as server:
                single[cand["label"]] = single_stream(server, spec)
        result["single"] = single
        chosen = pick({k: v["tps"] for k, v in single.items()}, incumbent.get("single"), margin)
        result["tuned_tps"] = single[chosen]["tps"]

        recipe = spec.get("recipe")
        if recipe:
            log("server recipe")
            with TempServer(recipe["argv"], env, spec) as server:
                result["recipe"] = {**single_stream(server, spec), "label": recipe["label"]}
            # Never slower than the recipe as measured: its settings win then (against settings
            # already in use only by more than the margin, as any challenger).
            kept = chosen == incumbent.get("single")
            if recipe_wins(result["recipe"]["tps"], single[chosen]["tps"], margin if kept else 0):
                log("the recipe measured fastest: keeping its settings")
                chosen = recipe["single_label"]
                order = list(dict.fromkeys([recipe["kv"], *order]))
                result["kv_order"] = order
                result["tuned_tps"] = result["recipe"]["tps"]
        result["single_chosen"] = chosen
        draft_n = _draft_n(chosen)
        final_argv = next(c["argv"] for c in spec["single"] if c["label"] == chosen)

        par = spec.get("parallel")
        if par:
            runs = {}
            for cand in par["candidates"]:
                if draft_n == 0 and any("{draft_n}" in a for a in cand["argv"]):
                    continue  # MTP measured slower than off: no MTP candidate with slots
                log(f"server {cand['label']}, {par['n']} concurrent clients")
                argv = fill(cand["argv"], {"kv": order[0], "draft_n": draft_n})
                with TempServer(argv, env, spec) as server:
                    runs[cand["label"]] = concurrent(server, spec, int(par["n"]))
            best = pick(
                {k: v["aggregate_tps"] for k, v in runs.items()}, incumbent.get("parallel"), margin
            )
            result["parallel"] = {"n": par["n"], "runs": runs, "chosen": best}
            final_argv = next(c["argv"] for c in par["candidates"] if c["label"] == best)

        log("baseline for the smoke check")
        baseline_spec = {
            **spec,
            "prompts": spec["baseline_prompts"],
            "n_predict": spec["baseline_n_predict"],
            "reps": 1,
        }
        argv = fill(final_argv, {"kv": order[0], "draft_n": draft_n})
        with TempServer(argv, env, spec) as server:
            figures = single_stream(server, baseline_spec)
        result["baseline"] = {
            "tokens_per_second": figures["median_tps"],
            "acceptance": figures["acceptance"],
        }
    return result


def _draft_n(label: str) -> int:
    """The draft length of a single-stream label ("mtp-4" -> 4; "none" -> 0)."""
    m = re.fullmatch(r"[a-z-]*?(\d+)", label)
    return int(m.group(1)) if m else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tune.py", description=__doc__.split("\n")[0])
    parser.add_argument("--spec", required=True, help="JSON spec written by gemma4-fleet tune")
    args = parser.parse_args(argv)
    with open(args.spec, encoding="utf-8") as fh:
        spec = json.load(fh)
    try:
        result = measure(spec)
    except (TuneError, subprocess.SubprocessError, OSError, ValueError) as e:
        result = {"instance": spec.get("instance"), "status": "error", "error": str(e)}
    print(json.dumps(result, indent=2, sort_keys=True, default=_json_default))
    return {"ok": EXIT_OK, "busy": EXIT_BUSY}.get(result["status"], EXIT_ERROR)


def _json_default(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"not JSON serializable: {value!r}")


if __name__ == "__main__":
    sys.exit(main())
