#!/usr/bin/env python3
"""Accept a (re)started llama-server unit, or put its last-known-good units back (stdlib only).

Shipped to the hosts next to smoke_check.py and run with the host's python3 by the deploy after
every start or restart of an instance:

1. `--health-url` must answer 2xx within `--timeout` seconds (503 "Loading model" and refused
   connections are waited out); a unit that fails, goes inactive or restarts stops the wait.
2. With `--smoke-unit`, that oneshot unit must succeed; its report (`--report`) gives the
   reasons when it does not.
3. Accepted: the live unit (and the smoke unit) are copied to `--lkg-dir`.
   Rejected: the saved units are copied back (when they differ), systemd reloads and restarts
   the unit, and the script exits 1 with the reason, after the unit's last journal lines.

Exit code: 0 accepted, 1 rejected.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence

try:
    from gemma4_fleet.host_scripts.smoke_check import load_report
except ImportError:  # on the host: shipped side by side
    from smoke_check import load_report  # type: ignore[no-redef]

UNITS_DIR = "/etc/systemd/system"


class Systemd:
    """The few systemctl/journalctl calls the verdict needs."""

    def show(self, unit: str, prop: str) -> str:
        done = subprocess.run(
            ["systemctl", "show", "-p", prop, "--value", unit],
            capture_output=True,
            text=True,
            check=False,
        )
        return done.stdout.strip()

    def run(self, *args: str) -> bool:
        return subprocess.run(["systemctl", *args], stdout=sys.stderr, check=False).returncode == 0

    def journal(self, unit: str) -> None:
        subprocess.run(
            ["journalctl", "-u", unit, "-n", "15", "--no-pager"], stdout=sys.stderr, check=False
        )


def answers(url: str) -> bool:
    """Whether the URL answers 2xx now."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 (http only)
            return 200 <= int(response.status) < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def healthy(
    systemd: Systemd,
    unit: str,
    url: str,
    timeout: float,
    *,
    probe: Callable[[str], bool] = answers,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> bool:
    """Wait up to `timeout` s for the URL; give up early when the unit exits or restarts."""
    end = clock() + timeout
    restarts = systemd.show(unit, "NRestarts")
    while clock() < end:
        if probe(url):
            return True
        if systemd.show(unit, "ActiveState") in ("failed", "inactive"):
            return False
        if systemd.show(unit, "NRestarts") != restarts:
            return False
        sleep(1)
    return False


def smoke_reasons(report: str) -> str:
    """The failed smoke check's reasons from its report, or why they cannot be read."""
    try:
        return "; ".join(load_report(report).reasons)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"no readable report at {report} ({exc})"


def roll_back(
    systemd: Systemd,
    ns: argparse.Namespace,
    why: str,
    *,
    healthy_again: Callable[[], bool],
    since_restart: Callable[[], float] = lambda: 0.0,
) -> str:
    """Put the last-known-good units back; the message the host fails with (with how long after
    the failed restart the old unit served again: the measure of a rollback)."""
    systemd.journal(ns.unit)
    live = os.path.join(ns.units_dir, ns.unit)
    saved = os.path.join(ns.lkg_dir, ns.unit)
    if os.path.isfile(saved) and not (os.path.isfile(live) and filecmp.cmp(saved, live, False)):
        shutil.copyfile(saved, live)
        # The smoke unit goes back too: it names the commit and model it expects.
        saved_smoke = os.path.join(ns.lkg_dir, ns.smoke_unit or "")
        if ns.smoke_unit and os.path.isfile(saved_smoke):
            shutil.copyfile(saved_smoke, os.path.join(ns.units_dir, ns.smoke_unit))
        systemd.run("daemon-reload")
        systemd.run("restart", ns.unit)
        if healthy_again():
            back = (
                "rolled back to last-known-good, serving again "
                f"{since_restart():.1f} s after the restart"
            )
        else:
            back = "rolled back to last-known-good, but it is not healthy either"
    elif os.path.isfile(saved):
        back = "the live unit is the last-known-good one"
    else:
        back = "no last-known-good to roll back to"
    return f"{ns.unit}: {why}; {back}"


def keep_as_last_known_good(ns: argparse.Namespace) -> None:
    os.makedirs(ns.lkg_dir, exist_ok=True)
    shutil.copyfile(os.path.join(ns.units_dir, ns.unit), os.path.join(ns.lkg_dir, ns.unit))
    if ns.smoke_unit:
        shutil.copyfile(
            os.path.join(ns.units_dir, ns.smoke_unit), os.path.join(ns.lkg_dir, ns.smoke_unit)
        )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--unit", required=True)
    p.add_argument("--health-url", required=True)
    p.add_argument("--timeout", type=float, required=True)
    p.add_argument("--smoke-unit", default="")
    p.add_argument("--report", default="")
    p.add_argument("--lkg-dir", required=True)
    p.add_argument("--units-dir", default=UNITS_DIR)
    return p


def main(
    argv: Sequence[str] | None = None,
    systemd: Systemd | None = None,
    probe: Callable[[str], bool] = answers,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    ns = parser().parse_args(argv)
    sd = systemd or Systemd()
    started = time.monotonic()  # the deploy runs this right after the (re)start

    def wait(timeout: float) -> bool:
        return healthy(sd, ns.unit, ns.health_url, timeout, probe=probe, sleep=sleep)

    why = None
    if not wait(ns.timeout):
        why = f"no /health 200 within {ns.timeout:g} s ({sd.show(ns.unit, 'ActiveState')})"
    elif ns.smoke_unit and not sd.run("start", ns.smoke_unit):
        why = f"smoke check failed: {smoke_reasons(ns.report)}"
    if why is not None:
        message = roll_back(
            sd,
            ns,
            why,
            healthy_again=lambda: wait(60),
            since_restart=lambda: time.monotonic() - started,
        )
        print(message, file=sys.stderr)
        return 1
    keep_as_last_known_good(ns)
    return 0


if __name__ == "__main__":
    sys.exit(main())
