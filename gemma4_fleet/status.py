"""`gemma4-fleet status`: the fleet table on demand, read from the hosts, changing nothing.

One row per instance: unit state, /health, model id and file, build, the last smoke report
(status, age, tok/s, acceptance) and the GPU memory its server holds now. A host that cannot be
reached is one row that says so.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gemma4_fleet.config import HostConfig, Instance
from gemma4_fleet.facts import InstanceState, LlamaInstanceState
from gemma4_fleet.render import smoke_report


@dataclass(frozen=True)
class StatusRow:
    host: str
    instance: Instance | None = None
    model_file: str | None = None  # the planned target file
    state: InstanceState | None = None
    error: str | None = None  # the host could not be read

    @property
    def ok(self) -> bool:
        """Serving and its last smoke check did not fail."""
        if self.state is None:
            return False
        smoke = (self.state.report or {}).get("status")
        return self.state.active == "active" and self.state.health == 200 and smoke != "fail"

    def cells(self) -> tuple[str, ...]:
        if self.instance is None or self.state is None:
            return (self.host, "-", self.error or "unreachable")
        s, r = self.state, self.state.report or {}
        tps = (r.get("tokens_per_second") or {}).get("median")
        acceptance = r.get("acceptance")
        health = "down" if s.health is None else str(s.health)
        model = Path(r.get("model_path") or self.model_file or "-").name
        return (
            self.host,
            self.instance.name,
            s.active,
            health,
            self.instance.model_id,
            model,
            str(r.get("build_info") or "-"),
            str(r.get("status") or "none"),
            age(s.report_age_s),
            "-" if tps is None else f"{tps:.1f}",
            "-" if acceptance is None else f"{acceptance:.2f}",
            "-" if s.server_gpu_mib is None else str(s.server_gpu_mib),
        )

    def to_json(self) -> dict[str, Any]:
        if self.instance is None or self.state is None:
            return {"host": self.host, "reachable": False, "error": self.error}
        s, r = self.state, self.state.report or {}
        return {
            "host": self.host,
            "reachable": True,
            "instance": self.instance.name,
            "unit": self.instance.unit,
            "active": s.active,
            "health": s.health,
            "model_id": self.instance.model_id,
            "model_path": r.get("model_path"),
            "build": r.get("build_info"),
            "smoke": r.get("status"),
            "smoke_reasons": r.get("reasons") or [],
            "smoke_age_seconds": s.report_age_s,
            "tokens_per_second": (r.get("tokens_per_second") or {}).get("median"),
            "acceptance": r.get("acceptance"),
            "gpu_memory_mib": s.server_gpu_mib,
            "ok": self.ok,
        }


HEADER = (
    "host",
    "instance",
    "unit",
    "health",
    "model id",
    "model",
    "build",
    "smoke",
    "age",
    "tok/s",
    "accept",
    "GPU MiB",
)


def age(seconds: int | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def status_table(rows: Sequence[StatusRow]) -> str:
    """Aligned columns; an unreachable host's reason runs across the columns after `host`."""
    table = [HEADER, *(row.cells() for row in rows)]
    full = [cells for cells in table if len(cells) == len(HEADER)]
    widths = [max(len(cells[i]) for cells in full) for i in range(len(HEADER))]
    lines = []
    for cells in table:
        if len(cells) == len(HEADER):
            lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)))
        else:
            lines.append(f"{cells[0].ljust(widths[0])}  {cells[2]}")
    return "\n".join(line.rstrip() for line in lines)


def read_host(state: Any, host: Any, config: HostConfig) -> list[StatusRow]:
    """One row per instance of a connected pyinfra host (facts only: nothing is changed)."""
    from pyinfra.api.facts import get_fact

    rows = []
    for inst in config.instances:
        found = get_fact(
            state,
            host,
            LlamaInstanceState,
            kwargs={
                "unit": inst.unit,
                "health_url": f"{inst.local_url}/health",
                "report": smoke_report(inst, "json"),
            },
            apply_failed_hosts=False,
        )
        if found is None:
            rows.append(StatusRow(host.name, error=f"{inst.name}: could not read its state"))
            continue
        rows.append(StatusRow(host.name, inst, config.models[inst.target].file, found))
    return rows


def read_fleet(
    state: Any, inventory: Any, hosts: Sequence[Any], configs: Mapping[str, HostConfig]
) -> list[StatusRow]:
    """Connect to each host in turn and read its instances; an unreachable host is one row."""
    from pyinfra.api import Config
    from pyinfra.api.connect import disconnect_all
    from pyinfra.api.exceptions import PyinfraError
    from pyinfra.context import ctx_host, ctx_state

    state.init(inventory, Config(), initial_limit=list(hosts))
    rows: list[StatusRow] = []
    with ctx_state.use(state):
        try:
            for host in hosts:  # one by one: nothing here runs under pyinfra's gevent loop
                if host.name not in configs:
                    continue
                try:
                    host.connect(show_errors=False, raise_exceptions=True)
                    state.activate_host(host)
                    with ctx_host.use(host):
                        rows += read_host(state, host, configs[host.name])
                except (PyinfraError, OSError) as exc:
                    rows.append(StatusRow(host.name, error=f"unreachable: {exc}"))
        finally:
            disconnect_all(state)
    return rows
