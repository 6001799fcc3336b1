#!/usr/bin/env python3
"""Wait (bounded) until a llama-server has no request in flight; say what it waited for.

Copied as is to the hosts and run there as root with the host's `python3` (standard library
only) before a deploy restarts or stops an instance, so that no user's generation is cut off.

It polls `GET /slots` (every slot's `is_processing`); where /slots is off (`--no-slots`) it
falls back to `/metrics` `llamacpp:requests_processing`. It never fails the deploy: a server
that is down, still loading, or whose slots it cannot see has nothing to drain; after
`--timeout` seconds it gives up waiting and says so (the caller restarts anyway).

New requests that arrive between "idle" and the restart are not held back (llama-server has no
way to stop accepting them); the window is the time systemd needs to send SIGTERM.

Output (one line each, for the deploy log), e.g.:
    llama-server-a.service: idle, nothing to wait for
    llama-server-a.service: waiting up to 300 s for slot 0 (task 12, 40 tokens so far)
    llama-server-a.service: drained after 7.3 s (waited for task 12 on slot 0)
    llama-server-a.service: still busy after 300 s (slot 0, task 31); going ahead

Exit code: 0 (also on timeout), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

NETWORK_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError)


@dataclass(frozen=True)
class Busy:
    """One slot with a request in flight."""

    slot: int
    task: int | None
    decoded: int | None

    def describe(self) -> str:
        parts = [] if self.task is None else [f"task {self.task}"]
        if self.decoded is not None:
            parts.append(f"{self.decoded} tokens so far")
        return f"slot {self.slot}" + (f" ({', '.join(parts)})" if parts else "")


def busy_slots(slots: Any) -> list[Busy] | None:
    """The slots that are processing, from a `/slots` reply; None if it is not a slot list."""
    if not isinstance(slots, list):
        return None
    busy = []
    for index, slot in enumerate(slots):
        if not isinstance(slot, Mapping):
            return None
        if slot.get("is_processing"):
            decoded = None
            for token in slot.get("next_token") or []:
                if isinstance(token, Mapping) and isinstance(token.get("n_decoded"), int):
                    decoded = token["n_decoded"]
            slot_id = slot.get("id")
            task = slot.get("id_task")
            busy.append(
                Busy(
                    slot_id if isinstance(slot_id, int) else index,
                    task if isinstance(task, int) else None,
                    decoded,
                )
            )
    return busy


def processing_from_metrics(text: str) -> int | None:
    """`llamacpp:requests_processing` from a Prometheus text reply, None if absent."""
    for line in text.splitlines():
        if line.startswith("llamacpp:requests_processing"):
            try:
                return int(float(line.split()[-1]))
            except ValueError:
                return None
    return None


def read_key(paths: Sequence[str]) -> str | None:
    """The first key in the first readable file (lines starting with # are comments)."""
    for path in paths:
        try:
            with open(path, encoding="utf-8") as fh:
                for line in fh:
                    if line.strip() and not line.startswith("#"):
                        return line.strip()
        except OSError:
            continue
    return None


Fetch = Callable[[str], tuple[int, bytes]]


def http_fetch(base_url: str, api_key: str | None, timeout: float = 5.0) -> Fetch:
    """GET `path` on the server: (status, body); network errors raise."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def fetch(path: str) -> tuple[int, bytes]:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        req = urllib.request.Request(base_url.rstrip("/") + path, headers=headers)  # noqa: S310
        try:
            with opener.open(req, timeout=timeout) as resp:
                return int(resp.status), bytes(resp.read())
        except urllib.error.HTTPError as e:
            return int(e.code), bytes(e.read())

    return fetch


@dataclass
class Poll:
    """What one look at the server found: busy slots, or why there is nothing to wait for."""

    busy: list[Busy] = field(default_factory=list)
    unknown: str | None = None


def poll(fetch: Fetch) -> Poll:
    try:
        code, body = fetch("/slots")
        if code == 200:
            try:
                slots = busy_slots(json.loads(body.decode("utf-8", "replace")))
            except ValueError:
                slots = None
            if slots is not None:
                return Poll(busy=slots)
        if code in (401, 403):
            return Poll(unknown=f"/slots answered {code} (no usable API key)")
        if code == 503:
            return Poll(unknown="still loading its model (503)")
        m_code, m_body = fetch("/metrics")
        processing = (
            processing_from_metrics(m_body.decode("utf-8", "replace")) if m_code == 200 else None
        )
        if processing is None:
            return Poll(unknown=f"neither /slots ({code}) nor /metrics ({m_code}) tell")
        return Poll(busy=[Busy(i, None, None) for i in range(processing)])
    except NETWORK_ERRORS as e:
        reason = getattr(e, "reason", e)
        return Poll(unknown=f"not answering ({type(reason).__name__}: {reason})")


def drain(
    name: str,
    fetch: Fetch,
    timeout: float,
    interval: float = 0.5,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    say: Callable[[str], None] = print,
) -> bool:
    """Poll until no slot is processing or `timeout` s have passed; True when idle (or unknown)."""
    start = clock()
    waited_for: dict[tuple[int, int | None], Busy] = {}
    while True:
        seen = poll(fetch)
        elapsed = clock() - start
        if seen.unknown is not None:
            say(f"{name}: {seen.unknown}; nothing to wait for")
            return True
        if not seen.busy:
            if not waited_for:
                say(f"{name}: idle, nothing to wait for")
            else:
                what = ", ".join(
                    f"task {b.task} on slot {b.slot}" if b.task is not None else f"slot {b.slot}"
                    for b in waited_for.values()
                )
                say(f"{name}: drained after {elapsed:.1f} s (waited for {what})")
            return True
        if not waited_for:
            listed = ", ".join(b.describe() for b in seen.busy)
            say(f"{name}: waiting up to {timeout:g} s for {listed}")
        for b in seen.busy:
            waited_for.setdefault((b.slot, b.task), b)
        if elapsed >= timeout:
            listed = ", ".join(b.describe() for b in seen.busy)
            say(f"{name}: still busy after {elapsed:.0f} s ({listed}); going ahead")
            return False
        sleep(min(interval, max(timeout - elapsed, 0.01)))


def unit_active(unit: str) -> bool:
    try:
        result = subprocess.run(
            ["systemctl", "is-active", "--quiet", unit], capture_output=True, check=False
        )
    except OSError:  # no systemctl: nothing of ours can be running
        return False
    return result.returncode == 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="wait until a llama-server has no request in flight")
    p.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:8080")
    p.add_argument("--unit", required=True, help="the server's systemd unit")
    p.add_argument("--timeout", type=float, required=True, help="seconds to wait at most")
    p.add_argument(
        "--api-key-file",
        action="append",
        default=[],
        help="file holding the key (repeatable: the first readable one is used)",
    )
    p.add_argument("--interval", type=float, default=0.5, help="seconds between polls")
    args = p.parse_args(argv)
    if args.timeout < 0 or args.interval <= 0:
        p.error("--timeout must be >= 0 and --interval > 0")
    if not unit_active(args.unit):
        print(f"{args.unit}: not running, nothing to wait for")
        return 0
    fetch = http_fetch(args.url, read_key(args.api_key_file))
    drain(args.unit, fetch, args.timeout, args.interval)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
