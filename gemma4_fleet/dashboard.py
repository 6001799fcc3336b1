"""The Grafana dashboard (`monitoring/grafana-dashboard.json`), built with grafana-foundation-sdk.

Regenerate after a change: `python -m gemma4_fleet.dashboard > monitoring/grafana-dashboard.json`
(a unit test fails while the checked-in file differs). Every query reads the series of the
README's metrics table, filtered by the `$host` variable, from the `$datasource` Prometheus.
"""

from __future__ import annotations

import json
from typing import Any

from grafana_foundation_sdk.builders import (
    bargauge,
    common,
    dashboard,
    prometheus,
    statushistory,
    timeseries,
)
from grafana_foundation_sdk.builders import stat as statpanel
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as common_models
from grafana_foundation_sdk.models import dashboard as models

from gemma4_fleet.monitoring import LLAMA_JOB

UID = "gemma4-fleet"
DATASOURCE = models.DataSourceRef(type_val="prometheus", uid="${datasource}")
SEL = 'host=~"$host"'
LEGEND = "{{host}} {{instance_name}}"


def _query(expr: str, legend: str = LEGEND, *, instant: bool = False) -> prometheus.Dataquery:
    query = prometheus.Dataquery().expr(expr).legend_format(legend).datasource(DATASOURCE)
    return query.instant() if instant else query.range()


def _ok_fail(ok: str, fail: str) -> list[models.ValueMapping]:
    return [
        models.ValueMap(
            options={
                "1": models.ValueMappingResult(text=ok, color="green", index=0),
                "0": models.ValueMappingResult(text=fail, color="red", index=1),
            }
        )
    ]


def build() -> dict[str, Any]:
    """The dashboard as the JSON object Grafana imports."""
    status = (
        statushistory.Panel()
        .title("Health and smoke status per host")
        .description(
            "llama-server scrape (up), /health and the smoke verdict of the last run, "
            "per host and instance. Skipped runs (slot busy) show as SKIP."
        )
        .datasource(DATASOURCE)
        .with_target(_query(f'up{{job="{LLAMA_JOB}",{SEL}}}', "{{host}} {{instance_name}} up"))
        .with_target(_query(f"gemma4_smoke_healthy{{{SEL}}}", "{{host}} {{instance_name}} health"))
        .with_target(
            _query(
                f"gemma4_smoke_passed{{{SEL}}} - gemma4_smoke_skipped{{{SEL}}} * 2",
                "{{host}} {{instance_name}} smoke",
            )
        )
        .mappings(
            [
                models.ValueMap(
                    options={
                        "1": models.ValueMappingResult(text="OK", color="green", index=0),
                        "0": models.ValueMappingResult(text="FAIL", color="red", index=1),
                        "-2": models.ValueMappingResult(text="SKIP", color="yellow", index=2),
                    }
                )
            ]
        )
        .height(8)
        .span(24)
    )
    tps = (
        timeseries.Panel()
        .title("Smoke tok/s (median over the prompts)")
        .datasource(DATASOURCE)
        .with_target(_query(f"gemma4_smoke_tokens_per_second{{{SEL}}}"))
        .with_target(
            _query(f"gemma4_smoke_min_tokens_per_second{{{SEL}}}", "{{host}} {{instance_name}} min")
        )
        .unit("short")
        .min(0)
        .show_points(common_models.VisibilityMode.ALWAYS)
        .height(8)
        .span(12)
    )
    acceptance = (
        timeseries.Panel()
        .title("Draft acceptance")
        .datasource(DATASOURCE)
        .with_target(_query(f"gemma4_smoke_acceptance_ratio{{{SEL}}}"))
        .with_target(
            _query(f"gemma4_smoke_min_acceptance_ratio{{{SEL}}}", "{{host}} {{instance_name}} min")
        )
        .unit("percentunit")
        .min(0)
        .max(1)
        .show_points(common_models.VisibilityMode.ALWAYS)
        .height(8)
        .span(12)
    )
    by_position = (
        bargauge.Panel()
        .title("Acceptance by draft position (last smoke run)")
        .description(
            "Share of verification steps that accepted the draft token at 0-based position i."
        )
        .datasource(DATASOURCE)
        .with_target(
            _query(
                f"gemma4_smoke_acceptance_ratio_by_position{{{SEL}}}",
                "{{host}} {{instance_name}} pos {{position}}",
                instant=True,
            )
        )
        .unit("percentunit")
        .min(0)
        .max(1)
        .orientation(common_models.VizOrientation.HORIZONTAL)
        .display_mode(common_models.BarGaugeDisplayMode.GRADIENT)
        .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]))
        .height(8)
        .span(12)
    )
    age = (
        statpanel.Panel()
        .title("Age of the last smoke run")
        .datasource(DATASOURCE)
        .with_target(
            _query(f"time() - gemma4_smoke_last_run_timestamp_seconds{{{SEL}}}", instant=True)
        )
        .unit("s")
        .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]))
        .height(4)
        .span(6)
    )
    gpu = (
        statpanel.Panel()
        .title("On the GPU (smoke residency check)")
        .datasource(DATASOURCE)
        .with_target(_query(f"gemma4_smoke_gpu_resident{{{SEL}}}", instant=True))
        .mappings(_ok_fail("GPU", "CPU fallback"))
        .no_value("no GPU instances")
        .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]))
        .height(4)
        .span(6)
    )
    chat = (
        statpanel.Panel()
        .title("Chat reply well-formed")
        .datasource(DATASOURCE)
        .with_target(_query(f"gemma4_smoke_chat_ok{{{SEL}}}", instant=True))
        .mappings(_ok_fail("OK", "BROKEN"))
        .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]))
        .height(4)
        .span(6)
    )
    live = (
        timeseries.Panel()
        .title("Live generation tok/s (llama-server /metrics, all requests)")
        .datasource(DATASOURCE)
        .with_target(
            _query(
                f"rate(llamacpp:tokens_predicted_total{{{SEL}}}[5m]) / "
                f"rate(llamacpp:tokens_predicted_seconds_total{{{SEL}}}[5m])"
            )
        )
        .unit("short")
        .min(0)
        .height(8)
        .span(12)
    )
    board = (
        dashboard.Dashboard("gemma4-fleet")
        .uid(UID)
        .tags(["gemma4-fleet", "llama.cpp"])
        .description("llama-server + Gemma 4 MTP fleet: smoke checks, speed, draft acceptance")
        .refresh("1m")
        .time("now-24h", "now")
        .tooltip(models.DashboardCursorSync.CROSSHAIR)
        .with_variable(
            dashboard.DatasourceVariable("datasource").label("Prometheus").type("prometheus")
        )
        .with_variable(
            dashboard.QueryVariable("host")
            .label("Host")
            .datasource(DATASOURCE)
            .query("label_values(gemma4_smoke_last_run_timestamp_seconds, host)")
            .refresh(models.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .multi(True)
            .include_all(True)
            .all_value(".*")
        )
        .with_panel(status)
        .with_panel(tps)
        .with_panel(acceptance)
        .with_panel(by_position)
        .with_panel(live)
        .with_panel(age)
        .with_panel(gpu)
        .with_panel(chat)
    )
    data: dict[str, Any] = _without_nulls(json.loads(json.dumps(board.build(), cls=JSONEncoder)))
    for panel_id, panel in enumerate(data["panels"], start=1):
        panel["id"] = panel_id
        for ref, target in zip("ABCDEFGH", panel["targets"], strict=False):
            target["refId"] = ref
    return data


def _without_nulls(value: Any) -> Any:
    """Drop unset (null) fields: Grafana expects them absent, not null."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def main() -> None:
    print(json.dumps(build(), indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
