"""A real Prometheus (Debian package) on the controller scrapes the deployed test fleet: every
llama-server's /metrics and node_exporter's textfile collector on each host (the smoke check's
metrics), with the shipped alert rules; a stopped server fires Gemma4InstanceDown."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import requests
import yaml

from gemma4_fleet.monitoring import LLAMA_JOB, NODE_JOB, TEXTFILE_DIR
from gemma4_fleet.testfleet.hosts import Fleet
from tests.fleet.conftest import ROOT, PyinfraRun, http
from tests.fleet.test_deploy import UNIT

pytestmark = pytest.mark.fleet
T = TypeVar("T")
SHOTS = ROOT / "out" / "monitoring"  # git-ignored; docs/img/ holds copies for the README
INTERVAL = "2s"  # scrape and rule evaluation
ALERT_FOR = "4s"  # every rule's `for:` shortened; the expressions are the shipped ones
GEMMA4_FLEET = str(Path(sys.executable).with_name("gemma4-fleet"))
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
CHROMIUM_FLAGS += ["--window-size=1400,900", "--virtual-time-budget=8000"]
# The instance this module's fleet deploy runs (inventories/local.py). Other fleet tests of the
# same session may leave smoke reports of their own instances (test_mtp_pair: `gemma4`) in the
# hosts' textfile directory, and node_exporter serves them too: every query names ours.
OURS = 'instance_name="gemma3"'


def wait_for(what: str, check: Callable[[], T | None], timeout: float = 90.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(1)


@pytest.fixture(scope="module")
def node_exporters(fleet: Fleet, deployed: PyinfraRun) -> None:
    """Debian's node_exporter on each host, pointed at the smoke check's textfile directory."""
    for name, host in fleet.hosts.items():
        fleet.ssh(
            name,
            f"echo 'ARGS=\"--collector.textfile.directory={TEXTFILE_DIR}\"' "
            "> /etc/default/prometheus-node-exporter "
            "&& systemctl restart prometheus-node-exporter",
        )

        def serves_smoke(address: str = host.address) -> bool:
            try:
                text = requests.get(f"http://{address}:9100/metrics", timeout=5).text
            except requests.RequestException:
                return False
            return "gemma4_smoke_passed{" in text

        wait_for(f"node_exporter on {name} serving the smoke metrics", serves_smoke, 30)


@pytest.fixture(scope="module")
def prometheus(
    tmp_path_factory: pytest.TempPathFactory, fleet: Fleet, node_exporters: None
) -> Iterator[str]:
    """Prometheus with the config `gemma4-fleet prometheus-config` prints for the fleet."""
    binary = shutil.which("prometheus")
    assert binary, "prometheus not found: run scripts/setup.sh (Debian package prometheus)"
    work = tmp_path_factory.mktemp("prometheus")
    printed = subprocess.run(
        [GEMMA4_FLEET, "prometheus-config", "inventories/local.py", "--rules", "alerts.yml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    config = yaml.safe_load(printed.stdout)
    config["global"] = {"scrape_interval": INTERVAL, "evaluation_interval": INTERVAL}
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    rules = yaml.safe_load((ROOT / "monitoring" / "alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = ALERT_FOR
    (work / "alerts.yml").write_text(yaml.safe_dump(rules))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (work / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={work / 'prometheus.yml'}",
            f"--storage.tsdb.path={work / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return requests.get(f"{url}/-/ready", timeout=2).status_code == 200
        except requests.RequestException:
            return proc.poll() is not None  # exited: fail below with its log

    try:
        wait_for("Prometheus ready", ready, 60)
        assert proc.poll() is None, (work / "prometheus.log").read_text()[-3000:]
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def query(url: str, expr: str) -> list[dict[str, Any]]:
    body = requests.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def by_host(results: list[dict[str, Any]]) -> dict[str, float]:
    return {r["metric"]["host"]: float(r["value"][1]) for r in results}


def firing(url: str, alertname: str) -> list[dict[str, str]]:
    alerts = requests.get(f"{url}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
    return [
        a["labels"]
        for a in alerts
        if a["labels"]["alertname"] == alertname and a["state"] == "firing"
    ]


def screenshot(url: str, name: str) -> Path:
    """Headless Chromium (Debian package) screenshot of a Prometheus page."""
    chromium = shutil.which("chromium")
    assert chromium, "chromium not found: run scripts/setup.sh (Debian package chromium)"
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / name
    path.unlink(missing_ok=True)
    subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--screenshot={path}", url],
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000
    return path


def test_metrics_of_every_instance_and_smoke_check_arrive(fleet: Fleet, prometheus: str) -> None:
    hosts = set(fleet.hosts)
    passed = wait_for(
        "smoke metrics of every host",
        lambda: (
            (r := query(prometheus, f"gemma4_smoke_passed{{{OURS}}}"))
            and len(r) == len(hosts)
            and r
        ),
    )
    for series in passed:
        labels = series["metric"]
        assert labels["job"] == NODE_JOB and labels["instance_name"] == "gemma3"
        assert labels["instance"] == f"{fleet.hosts[labels['host']].address}:9100"
    assert by_host(passed) == dict.fromkeys(hosts, 1.0)
    assert by_host(query(prometheus, f"gemma4_smoke_chat_ok{{{OURS}}}")) == dict.fromkeys(
        hosts, 1.0
    )
    speeds = by_host(query(prometheus, f"gemma4_smoke_tokens_per_second{{{OURS}}}"))
    assert speeds.keys() == hosts and all(v > 0 for v in speeds.values()), speeds
    positions = query(
        prometheus, f'gemma4_smoke_acceptance_ratio_by_position{{{OURS},position="0"}}'
    )
    assert {r["metric"]["host"] for r in positions} == hosts
    up = wait_for(
        "llama-server scraped on every host",
        lambda: (r := query(prometheus, f'up{{job="{LLAMA_JOB}"}}')) and len(r) == len(hosts) and r,
    )
    assert by_host(up) == dict.fromkeys(hosts, 1.0)
    # the scrape configuration printed from the inventory labels each target with its instance
    assert {r["metric"]["instance_name"] for r in up} == {"gemma3"}
    # Tokens generated here show in llama-server's own counters. (Not the deploy's smoke
    # check's: an earlier test may have restarted a server, which starts them at 0 again.)
    for name in hosts:
        assert http(fleet, name, "/completion", json={"prompt": "One", "n_predict": 4}).ok
    wait_for(
        "generated tokens counted on every host",
        lambda: (
            (p := by_host(query(prometheus, "llamacpp:tokens_predicted_total"))).keys() == hosts
            and all(v > 0 for v in p.values())
            and p
        ),
    )
    rules = requests.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
    loaded = [rule for group in rules for rule in group["rules"]]
    assert len(loaded) == 9 and all(rule["health"] == "ok" for rule in loaded), loaded
    for alert in ("Gemma4InstanceDown", "Gemma4SmokeFailing"):
        ours = [a for a in firing(prometheus, alert) if a.get("instance_name") == "gemma3"]
        assert ours == [], (alert, ours)


def test_a_stopped_server_fires_instance_down_and_resolves(fleet: Fleet, prometheus: str) -> None:
    name = "g4f-node2"
    wait_for("node2 scraped", lambda: by_host(query(prometheus, f'up{{job="{LLAMA_JOB}"}}')))
    fleet.ssh(name, f"systemctl stop {UNIT}")
    try:
        alerts = wait_for(
            "Gemma4InstanceDown firing", lambda: firing(prometheus, "Gemma4InstanceDown"), 60
        )
        assert [(a["host"], a["instance_name"], a["severity"]) for a in alerts] == [
            (name, "gemma3", "critical")
        ]
        screenshot(f"{prometheus}/classic/alerts", "prometheus-alerts.png")
    finally:
        fleet.ssh(name, f"systemctl start {UNIT}")

    def healthy() -> bool:
        try:
            return http(fleet, name, "/health").status_code == 200
        except requests.RequestException:
            return False

    wait_for(f"{name} healthy again", healthy, 120)
    wait_for("the alert resolved", lambda: not firing(prometheus, "Gemma4InstanceDown"), 60)
    expr = requests.utils.quote(f'up{{job="{LLAMA_JOB}"}}')
    screenshot(
        f"{prometheus}/classic/graph?g0.expr={expr}&g0.tab=0&g0.range_input=5m",
        "prometheus-graph.png",
    )
