"""No-op converge against an Ansible playbook that checks the same things, side by side.

Boots N fresh test hosts (a named fleet, `g4b` on 10.213.3.0/24 unless told otherwise),
converges them with the demo job, then writes an Ansible playbook whose tasks check what the
deploy's no-op checks, host by host: GPUs, service account and group, release, build, model
file, packages, managed units, systemd version, directories, absent UVM files, host scripts,
API key, server flags, the three unit files (their content as deployed) and the timer and
service running and enabled. It alternates, `--runs` times, the deploy's no-op
(`pyinfra -y`) and `ansible-playbook` (no fact gathering; default settings, then with SSH
pipelining), checks that none changed anything, and prints the medians and their ratios.

    bench/ansible_noop.py --hosts 3 --runs 5

Needs `ansible-playbook` (Debian: `apt install ansible-core`); not part of the test suite.
Run as root from the repository root, with no other fleet on the same name.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.converge import pyinfra, write_inventory  # noqa: E402
from gemma4_fleet.deploys.build import BUILD_PACKAGES  # noqa: E402
from gemma4_fleet.deploys.units import SMOKE_PACKAGES  # noqa: E402
from gemma4_fleet.render import HOST_SCRIPTS_DIR, SHIPPED_SCRIPTS  # noqa: E402
from gemma4_fleet.testfleet.hosts import Fleet  # noqa: E402

ENV = {"G4F_PROGRESS_INTERVAL": "600"}
SYSTEMD = "/etc/systemd/system"
UNITS = ["llama-server-gemma3.service", "llama-smoke-gemma3.service", "llama-smoke-gemma3.timer"]
SCRIPTS = [Path(script).name for script in SHIPPED_SCRIPTS]
PACKAGES = [*BUILD_PACKAGES, *SMOKE_PACKAGES]


def playbook(build_dir: str, model: str) -> list[dict[str, object]]:
    """The checks of the deploy's no-op, as Ansible tasks (the same facts, the same files)."""
    server = f"{build_dir}/bin/llama-server"
    read_only = {"changed_when": False}
    tasks: list[dict[str, object]] = [
        {"name": "GPUs", "ansible.builtin.shell": "nvidia-smi -L || true", **read_only},
        {"name": "release", "ansible.builtin.command": "cat /etc/os-release", **read_only},
        {"name": "build", "ansible.builtin.stat": {"path": f"{build_dir}/BUILD-INFO"}},
        {"name": "model", "ansible.builtin.stat": {"path": model, "get_checksum": False}},
        {  # the apt module needs python3-apt, which the hosts lack: dpkg-query, as the deploy
            "name": "packages",
            "ansible.builtin.command": f"dpkg-query -W {' '.join(PACKAGES)}",
            **read_only,
        },
        {
            "name": "managed units",
            "ansible.builtin.find": {"paths": SYSTEMD, "patterns": "llama-*"},
        },
        {"name": "systemd version", "ansible.builtin.command": "systemctl --version", **read_only},
        {
            "name": "install root",
            "ansible.builtin.file": {"path": "/opt/llama.cpp", "state": "directory"},
        },
        {
            "name": "models directory",
            "ansible.builtin.file": {"path": "/var/lib/llama-models", "state": "directory"},
        },
        {
            "name": "no UVM unit",
            "ansible.builtin.file": {
                "path": f"{SYSTEMD}/gemma4-fleet-nvidia-uvm.service",
                "state": "absent",
            },
        },
        {
            "name": "no UVM script",
            "ansible.builtin.file": {
                "path": f"{HOST_SCRIPTS_DIR}/nvidia-uvm.sh",
                "state": "absent",
            },
        },
        {"name": "service group", "ansible.builtin.group": {"name": "llama", "system": True}},
        {
            "name": "service user",
            "ansible.builtin.user": {
                "name": "llama",
                "group": "llama",
                "system": True,
                "home": "/nonexistent",
                "create_home": False,
                "shell": "/usr/sbin/nologin",
                "comment": "gemma4-fleet service account",
            },
        },
        {
            "name": "host scripts",
            "ansible.builtin.copy": {
                "src": f"{ROOT}/gemma4_fleet/host_scripts/{{{{ item }}}}",
                "dest": f"{HOST_SCRIPTS_DIR}/{{{{ item }}}}",
                "mode": "0755",
            },
            "loop": SCRIPTS,
        },
        {
            "name": "no API key",
            "ansible.builtin.file": {
                "path": "/etc/gemma4-fleet/keys/gemma3.key",
                "state": "absent",
            },
        },
        {"name": "server flags", "ansible.builtin.command": f"{server} --help", **read_only},
        {
            "name": "unit files",
            "ansible.builtin.copy": {
                "src": "files/{{ inventory_hostname }}/{{ item }}",
                "dest": f"{SYSTEMD}/{{{{ item }}}}",
                "mode": "0644",
            },
            "loop": UNITS,
        },
        {
            "name": "timer running and enabled",
            "ansible.builtin.systemd": {"name": UNITS[2], "state": "started", "enabled": True},
        },
        {
            "name": "server running and enabled",
            "ansible.builtin.systemd": {"name": UNITS[0], "state": "started", "enabled": True},
        },
    ]
    return [{"hosts": "all", "gather_facts": False, "tasks": tasks}]


def ansible(folder: Path, pipelining: bool) -> tuple[float, str]:
    """One timed `ansible-playbook` run (default settings, or with SSH pipelining)."""
    began = time.monotonic()
    result = subprocess.run(
        ["ansible-playbook", "-i", "hosts.ini", "noop.yml"],
        cwd=folder,
        capture_output=True,
        text=True,
        env={**os.environ, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_PIPELINING": str(pipelining)},
        check=False,
    )
    seconds = time.monotonic() - began
    output = result.stdout + result.stderr
    recap = re.findall(r"changed=(\d+).*failed=(\d+)", output)
    if result.returncode or not recap or any(c != "0" or f != "0" for c, f in recap):
        raise SystemExit(f"ansible-playbook failed or changed something:\n{output[-3000:]}")
    return seconds, output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, default=3)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--fleet", default="g4b")
    parser.add_argument("--network", type=int, default=3)
    args = parser.parse_args()
    fleet = Fleet(name=args.fleet, network=args.network)
    ours: list[float] = []
    theirs: dict[bool, list[float]] = {False: [], True: []}  # by SSH pipelining
    try:
        fleet.up(args.hosts)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            inventory = folder / "inventory.py"
            write_inventory(fleet, inventory, "shared")
            first = pyinfra(str(inventory), "deploys/gemma4_mtp.py", env=ENV)
            if first.returncode:
                raise SystemExit(f"first converge failed:\n{first.tail}")
            lines = ["[all]"]
            for name, ssh in fleet.inventory():
                lines.append(
                    f"{name} ansible_host={ssh['ssh_hostname']} ansible_user=root "
                    f"ansible_ssh_private_key_file={ssh['ssh_key']} "
                    f"ansible_ssh_common_args='-o UserKnownHostsFile={ssh['ssh_known_hosts_file']}'"
                )
                for unit in UNITS:
                    copy = folder / "files" / name / unit
                    copy.parent.mkdir(parents=True, exist_ok=True)
                    copy.write_text(fleet.ssh(name, f"cat {SYSTEMD}/{unit}").stdout)
            (folder / "hosts.ini").write_text("\n".join(lines) + "\n")
            first_host = next(iter(fleet.hosts))
            build_dir = fleet.ssh(first_host, "ls -d /opt/llama.cpp/builds/*/").stdout.strip()
            model = fleet.ssh(first_host, "ls /var/lib/llama-models/*/*.gguf").stdout.split()[0]
            # JSON is YAML: the playbook needs no YAML writer
            (folder / "noop.yml").write_text(json.dumps(playbook(build_dir.rstrip("/"), model)))
            pyinfra(str(inventory), "deploys/gemma4_mtp.py", env=ENV)  # the batch's record
            ansible(folder, False)  # warm-up: ssh control sockets, module cache
            for _ in range(args.runs):
                run = pyinfra(str(inventory), "deploys/gemma4_mtp.py", env=ENV)
                if run.returncode or run.changed:
                    raise SystemExit(f"the no-op changed {run.changed}:\n{run.tail}")
                ours.append(run.seconds)
                for pipelining, taken in theirs.items():
                    taken.append(ansible(folder, pipelining)[0])
    finally:
        fleet.down()
    mine = statistics.median(ours)
    print(f"\nno-op of {args.hosts} hosts, medians of {args.runs} alternating runs:")
    print("| | seconds | gemma4-fleet / it |\n|---|---|---|")
    print(f"| gemma4-fleet (pyinfra) | {mine:.2f} | |")
    for pipelining, taken in theirs.items():
        other = statistics.median(taken)
        label = "with SSH pipelining" if pipelining else "default settings"
        print(f"| Ansible playbook, same checks, {label} | {other:.2f} | {mine / other:.2f} |")
    print(f"runs: ours {[round(s, 2) for s in ours]}")
    for pipelining, taken in theirs.items():
        print(f"Ansible, pipelining {pipelining}: {[round(s, 2) for s in taken]}")


if __name__ == "__main__":
    main()
