"""Alert rules (promtool), the scrape configuration and the Grafana dashboard."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from gemma4_fleet import dashboard
from gemma4_fleet.config import parse_host_config
from gemma4_fleet.host_scripts import smoke_check
from gemma4_fleet.monitoring import LLAMA_JOB, NODE_JOB, ScrapeHost, render, scrape_config
from tests.unit.test_config import host_data

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "monitoring"
# Metric names in PromQL: words with a colon or underscore that are not functions or labels.
METRIC_RE = re.compile(r"\b(gemma4_smoke_[a-z_]+|llamacpp:[a-z_]+|up)\b(?!\()")


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool not found: run scripts/setup.sh (Debian package prometheus)")
    return found


def readme_table() -> list[str]:
    """Rows of the README's one table of metric and alert names."""
    lines = (ROOT / "README.md").read_text().splitlines()
    start = lines.index("| Metric or alert | Source | Meaning |") + 2
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append(line)
    return rows


def readme_metrics() -> set[str]:
    return {m.group(1) for row in readme_table() if (m := re.match(r"^\| `([a-z_:0-9]+)`", row))}


def readme_alerts() -> set[str]:
    return {m.group(1) for row in readme_table() if (m := re.match(r"^\| alert `(\w+)`", row))}


def rules() -> list[dict[str, Any]]:
    data = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def test_promtool_unit_tests_of_the_alert_rules_pass() -> None:
    done = subprocess.run(
        [promtool(), "test", "rules", "alerts.test.yml", "alerts-baseline.test.yml"],
        cwd=MONITORING,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("SUCCESS") == 2


def test_every_alert_is_tested_and_documented() -> None:
    alerts = {rule["alert"] for rule in rules() if "alert" in rule}
    assert alerts == {
        "Gemma4InstanceDown",
        "Gemma4NodeExporterDown",
        "Gemma4SmokeFailing",
        "Gemma4SmokeStale",
        "Gemma4ThroughputBelowBaseline",
        "Gemma4AcceptanceBelowThreshold",
        "Gemma4CpuFallback",
    }
    tested: set[str] = set()
    for name in ("alerts.test.yml", "alerts-baseline.test.yml"):
        for test in yaml.safe_load((MONITORING / name).read_text())["tests"]:
            tested |= {
                case["alertname"] for case in test.get("alert_rule_test", []) if case["exp_alerts"]
            }
    assert tested == alerts
    assert readme_alerts() == alerts


def test_rules_and_dashboard_use_only_documented_metrics() -> None:
    documented = readme_metrics()
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    exprs = [rule["expr"] for rule in rules()]
    board = dashboard.build()
    exprs += [target["expr"] for panel in board["panels"] for target in panel["targets"]]
    exprs += [var["query"] for var in board["templating"]["list"] if var["type"] == "query"]
    used = {name for expr in exprs for name in METRIC_RE.findall(expr)}
    assert "gemma4_smoke_tokens_per_second" in used and "llamacpp:tokens_predicted_total" in used
    assert used - recorded <= documented, sorted(used - recorded - documented)


def test_checked_in_dashboard_is_the_generated_one() -> None:
    checked_in = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    assert checked_in == dashboard.build(), (
        "regenerate: python -m gemma4_fleet.dashboard > monitoring/grafana-dashboard.json"
    )


def test_dashboard_panels_read_the_datasource_variable() -> None:
    board = dashboard.build()
    variables = {var["name"]: var for var in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["host"]["datasource"]["uid"] == "${datasource}"
    titles = [panel["title"] for panel in board["panels"]]
    assert titles[0] == "Health and smoke status per host"
    assert any("tok/s" in t for t in titles) and any("by draft position" in t for t in titles)
    for panel in board["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            assert 'host=~"$host"' in target["expr"], target["expr"]
    ids = [panel["id"] for panel in board["panels"]]
    assert len(set(ids)) == len(ids)


def _host(name: str, address: str, *instances: dict[str, Any]) -> ScrapeHost:
    data = host_data(llama_instances=list(instances))
    return ScrapeHost(name, address, parse_host_config(name, data))


INST = {"target": "t", "drafter": "d", "gpu": "0"}


def test_scrape_config_targets_labels_and_loopback_warning(tmp_path: Path) -> None:
    key = tmp_path / "box2.key"
    key.write_text("sk-box2\n")
    hosts = [
        _host(
            "box1",
            "10.0.0.1",
            {**INST, "name": "a", "host": "0.0.0.0", "port": 8080, "allow_unauthenticated": True},
            {**INST, "name": "b", "gpu": "1", "port": 8081},  # default 127.0.0.1
        ),
        _host(
            "box2",
            "box2.lan",
            {**INST, "name": "c", "host": "192.168.7.2", "port": 9000, "api_key_file": str(key)},
        ),
        _host(
            "box3",
            "fd00::3",
            {**INST, "name": "d", "host": "::", "port": 8080, "allow_unauthenticated": True},
        ),
    ]
    config, warnings = scrape_config(hosts, node_exporter_port=9101)
    jobs = {job["job_name"]: job["static_configs"] for job in config["scrape_configs"]}
    assert jobs[LLAMA_JOB] == [
        {"targets": ["10.0.0.1:8080"], "labels": {"host": "box1", "instance_name": "a"}},
        {"targets": ["[fd00::3]:8080"], "labels": {"host": "box3", "instance_name": "d"}},
    ]
    # the keyed instance: its own job sends the key and is relabelled to the llama-server job
    keyed = config["scrape_configs"][1]
    assert keyed["job_name"] == f"{LLAMA_JOB}-key1"
    assert keyed["authorization"] == {"type": "Bearer", "credentials_file": str(key)}
    assert keyed["relabel_configs"] == [{"target_label": "job", "replacement": LLAMA_JOB}]
    assert keyed["static_configs"] == [
        {"targets": ["192.168.7.2:9000"], "labels": {"host": "box2", "instance_name": "c"}}
    ]
    assert jobs[NODE_JOB] == [
        {"targets": ["10.0.0.1:9101"], "labels": {"host": "box1"}},
        {"targets": ["box2.lan:9101"], "labels": {"host": "box2"}},
        {"targets": ["[fd00::3]:9101"], "labels": {"host": "box3"}},
    ]
    assert len(warnings) == 1
    assert warnings[0].startswith("host box1: llama_instances[b].host is 127.0.0.1:")


def test_rendered_config_passes_promtool_check_config(tmp_path: Path) -> None:
    key = tmp_path / "k.key"
    key.write_text("sk-k\n")
    shutil.copy(MONITORING / "alerts.yml", tmp_path / "alerts.yml")
    hosts = [
        _host(
            "box1",
            "10.0.0.1",
            {**INST, "name": "a", "host": "0.0.0.0", "allow_unauthenticated": True},
            {**INST, "name": "k", "host": "0.0.0.0", "port": 8081, "api_key_file": str(key)},
        )
    ]
    config, _ = scrape_config(hosts, rule_files=["alerts.yml"])
    assert len(config["scrape_configs"]) == 3  # the keyed instance's job is checked too
    text = render(config, "a header\n\nover lines")
    assert text.startswith("# a header\n#\n# over lines\n")
    (tmp_path / "prometheus.yml").write_text(text)
    done = subprocess.run(
        [promtool(), "check", "config", "prometheus.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 9 rules found" in done.stdout


def test_prometheus_config_command(tmp_path: Path) -> None:
    (tmp_path / "group_data").mkdir()
    (tmp_path / "group_data" / "all.py").write_text(
        "".join(f"{key} = {value!r}\n" for key, value in host_data().items())
    )
    (tmp_path / "inventory.py").write_text(
        "hosts = [\n"
        "    ('box1', {'ssh_hostname': '10.0.0.1', 'llama_instances': [\n"
        "        {'name': 'a', 'target': 't', 'drafter': 'd', 'gpu': '0', 'host': '0.0.0.0',\n"
        "         'allow_unauthenticated': True}]}),\n"
        "    ('box2', {'llama_instances': [{'name': 'b', 'target': 't', 'drafter': 'd'}]}),\n"
        "    ('box3', {'llama_instances': [{'name': 'c', 'target': 'nope'}]}),\n"
        "]\n"
    )
    code = "import sys; from gemma4_fleet.cli import main; sys.exit(main(sys.argv[1:]))"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        # In a child: pyinfra_cli monkey-patches the stdlib for gevent on import.
        return subprocess.run(
            [sys.executable, "-c", code, "prometheus-config", "inventory.py", *args],
            cwd=tmp_path,
            env=dict(os.environ),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    done = cli("--limit", "box1,box2", "--rules", "alerts.yml")
    assert done.returncode == 0, done.stderr
    config = yaml.safe_load(done.stdout)
    assert config["rule_files"] == ["alerts.yml"]
    llama, node = config["scrape_configs"]
    assert llama["static_configs"] == [
        {"targets": ["10.0.0.1:8080"], "labels": {"host": "box1", "instance_name": "a"}}
    ]
    assert [c["targets"] for c in node["static_configs"]] == [["10.0.0.1:9100"], ["box2:9100"]]
    assert "warning: host box2: llama_instances[b].host is 127.0.0.1" in done.stderr

    done = cli()
    assert done.returncode == 1
    assert "host box3: llama_instances[c]" in done.stderr and "Traceback" not in done.stderr


def test_readme_table_lists_the_smoke_checks_metrics() -> None:
    assert smoke_check.__doc__ is not None
    in_docstring = set(re.findall(r"^\| `(gemma4_smoke_\w+)`", smoke_check.__doc__, re.M))
    documented = {name for name in readme_metrics() if name.startswith("gemma4_smoke_")}
    assert in_docstring == documented
