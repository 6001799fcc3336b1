"""Real systemd reads back exactly what render.py escaped: argv, environment, read-only paths."""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterator

import pytest

from gemma4_fleet.render import cuda_environment, exec_start, systemd_escape
from gemma4_fleet.testfleet.hosts import Fleet

pytestmark = pytest.mark.fleet
HOSTILE = "x; whoami\n$HOME ${HOME} %h %% \"q\" 'q' \\ `id` $(id)"
UNIT = "g4f-escape-test.service"
READ_ONLY = "/var/lib/g4f escape; $HOME %h"
PROBE = (
    "import json, os, sys\n"
    "try:\n"
    "    open(sys.argv[1] + '/probe', 'w')\n"
    "    writable = True\n"
    "except OSError:\n"
    "    writable = False\n"
    "print(json.dumps({'argv': sys.argv[2:], 'env': os.environ.get('CUDA_VISIBLE_DEVICES'),"
    " 'writable': writable}))\n"
)


@pytest.fixture
def probe_unit(fleet: Fleet) -> Iterator[tuple[str, str]]:
    """(host, journal output of) a oneshot unit that reports its argv, env and a read-only dir."""
    name = next(iter(fleet.hosts))
    argv = ["/usr/bin/python3", "-c", PROBE, READ_ONLY, HOSTILE, "50%", "$HOME"]
    unit = (
        "[Service]\nType=oneshot\n"
        f"ExecStart={exec_start(argv)}\n"
        f"Environment={cuda_environment(HOSTILE)}\n"
        f"ReadOnlyPaths={systemd_escape(READ_ONLY)}\n"
        "StandardOutput=journal\n"
    )
    fleet.ssh(
        name,
        f"mkdir -p {shlex.quote(READ_ONLY)} && "
        f"printf %s {shlex.quote(unit)} >/etc/systemd/system/{UNIT} && systemctl daemon-reload",
    )
    try:
        run = fleet.ssh(name, f"systemctl start {UNIT}", check=False)
        assert run.returncode == 0, run.stderr
        out = fleet.ssh(name, f"journalctl -u {UNIT} -o cat --no-pager | grep argv | tail -n1")
        yield name, out.stdout
    finally:
        fleet.ssh(
            name,
            f"rm -f /etc/systemd/system/{UNIT}; rm -rf {shlex.quote(READ_ONLY)}; "
            "systemctl daemon-reload",
        )


def test_systemd_reads_back_exactly_what_was_escaped(probe_unit: tuple[str, str]) -> None:
    _, line = probe_unit
    seen = json.loads(line)
    assert seen["argv"] == [HOSTILE, "50%", "$HOME"]
    assert seen["env"] == HOSTILE
    assert seen["writable"] is False  # ReadOnlyPaths= named exactly that directory
