"""Controller-side reporting: the smoke reports fetched in this run, as one fleet table."""

from __future__ import annotations

import os
from pathlib import Path

from gemma4_fleet.config import server_unit
from gemma4_fleet.host_scripts.smoke_check import Report, load_report


def report_dir() -> Path:
    """Where the controller collects smoke reports: ./out/smoke, or G4F_REPORT_DIR."""
    return Path(os.environ.get("G4F_REPORT_DIR", "out/smoke")).absolute()


def collected_reports(since: float) -> list[Path]:
    """Smoke reports fetched to the controller by this run (hosts whose instances restarted)."""
    return [p for p in sorted(report_dir().glob("*/*.json")) if p.stat().st_mtime >= since]


def table_row(host_name: str, report: Report) -> tuple[str, ...]:
    """One fleet-table row: host, unit, model, build, health, tok/s, acceptance, smoke status."""
    health = report.health
    if health is not None and health.ok:
        code = "200"
    else:
        code = str(health.status_code) if health and health.status_code else "down"
    return (
        host_name,
        server_unit(report.instance),
        Path(report.model_path or "-").name,
        report.build_info or "-",
        code,
        "-" if report.tokens_per_second is None else f"{report.tokens_per_second:.1f}",
        "-" if report.acceptance is None else f"{report.acceptance:.2f}",
        report.status,
    )


def fleet_table(rows: list[tuple[str, ...]]) -> str:
    """The rows under a header, in aligned columns."""
    header = ("host", "unit", "model", "build", "health", "tok/s", "acceptance", "smoke")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "    " + "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    )


def print_fleet_table(since: float) -> None:
    """One line per host/instance (re)started in this run, from the reports it collected."""
    rows = [
        table_row(path.parent.name, load_report(str(path))) for path in collected_reports(since)
    ]
    print("--> Fleet smoke table")
    print(fleet_table(rows))
