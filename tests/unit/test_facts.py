"""GPU inventory parsing and what follows from it: CUDA architectures."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from pyinfra.api import FactProcessError

from gemma4_fleet.config import parse_host_config
from gemma4_fleet.facts import NvidiaGpus, SystemdUnitStates, UnitState, parse_nvidia_smi
from gemma4_fleet.pipeline import with_gpu_architectures
from tests.unit.test_config import host_data

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
# Recorded on the H100 device (docs/gpu-proof/nvidia-smi-query-gpu.csv).
H100 = (ROOT / "docs" / "gpu-proof" / "nvidia-smi-query-gpu.csv").read_text().splitlines()
# Recorded inside the GPU test host on the two-H200 machine (docs/gpu-proof.md, issue 16).
H200X2 = (ROOT / "tests" / "unit" / "data" / "nvidia-smi-h200x2.csv").read_text().splitlines()
# Seed 003's two-GPU box (a 4090 and a 3090), in the same CSV format as the recorded line.
TWO_GPUS = [
    "0, GPU-5e1c2a7b-8f41-4c9e-9d0a-3b6f1e2d4c5a, NVIDIA GeForce RTX 4090, 24564, 12180, 8.9",
    "1, GPU-9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d, NVIDIA GeForce RTX 3090, 24576, 3021, 8.6",
]


def test_one_gpu_recorded_on_an_h100_maps_to_architecture_90() -> None:
    (gpu,) = parse_nvidia_smi(H100)
    assert gpu.index == 0
    assert gpu.uuid.startswith("GPU-") and len(gpu.uuid) == 40
    assert gpu.name == "NVIDIA H100 80GB HBM3"
    assert gpu.memory_total_mib == 81559
    assert (gpu.compute_cap, gpu.cuda_architecture) == ("9.0", 90)


def test_two_gpus() -> None:
    gpus = parse_nvidia_smi(TWO_GPUS)
    assert [(g.index, g.cuda_architecture, g.memory_used_mib) for g in gpus] == [
        (0, 89, 12180),
        (1, 86, 3021),
    ]


def test_two_h200s_recorded_on_the_gpu_host() -> None:
    gpus = parse_nvidia_smi(H200X2)
    assert [(g.index, g.name, g.memory_total_mib, g.cuda_architecture) for g in gpus] == [
        (0, "NVIDIA H200", 143771, 90),
        (1, "NVIDIA H200", 143771, 90),
    ]
    assert gpus[0].uuid != gpus[1].uuid
    assert gpus[1].uuid == "GPU-8bbe8b41-8bce-1225-4e9b-4270a6b6a73e"
    assert with_gpu_architectures(
        parse_host_config("h200x2", host_data()), gpus
    ).build.cuda_architectures == [90]


def test_no_nvidia_tools_means_no_gpus() -> None:
    assert parse_nvidia_smi([]) == []
    assert NvidiaGpus.default() == []


@pytest.mark.parametrize(
    "line",
    [
        "0, GPU-5e1c2a7b, NVIDIA GeForce RTX 4090, 24564, 12180",  # a column missing
        "0, GPU-5e1c2a7b, NVIDIA GeForce RTX 4090, [N/A], 12180, 8.9",  # not a number
        "zero, GPU-5e1c2a7b, NVIDIA GeForce RTX 4090, 24564, 12180, 8.9",
        "0, 5e1c2a7b, NVIDIA GeForce RTX 4090, 24564, 12180, 8.9",  # not a UUID
        "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.",
    ],
)
def test_malformed_output_is_a_clear_error(line: str) -> None:
    with pytest.raises(FactProcessError, match="unexpected nvidia-smi line"):
        parse_nvidia_smi([TWO_GPUS[0], line])


def test_detected_architectures_are_part_of_the_build_id() -> None:
    config = parse_host_config("box1", host_data())
    on_4090 = with_gpu_architectures(config, parse_nvidia_smi(TWO_GPUS[:1]))
    on_both = with_gpu_architectures(config, parse_nvidia_smi(TWO_GPUS))
    assert on_4090.build.cuda_architectures == [89]
    assert on_both.build.cuda_architectures == [86, 89]
    assert on_4090.build_id != on_both.build_id
    pinned = parse_host_config(
        "box1", host_data(llamacpp_build={"cuda": True, "cuda_architectures": [120]})
    )
    assert with_gpu_architectures(pinned, parse_nvidia_smi(TWO_GPUS)).build_id == pinned.build_id


def test_service_account_reads_both_lines_in_one_command_run_by_a_real_shell() -> None:
    import subprocess

    from gemma4_fleet.facts import ServiceAccount

    fact = ServiceAccount()
    # root exists on every machine; the second name nowhere. Run as the host's sh runs it.
    for user, want_passwd in (("root", True), ("g4f-no-such-user", False)):
        command = fact.command(user=user).get_raw_value()
        output = subprocess.run(
            ["sh", "-c", command], capture_output=True, text=True, check=True
        ).stdout.splitlines()
        passwd, group = fact.process(output)
        assert (passwd is not None) is want_passwd and (group is not None) is want_passwd
        if want_passwd:
            assert passwd.startswith("root:x:0:0:") and group.startswith("root:x:0:")
    with pytest.raises(FactProcessError):
        fact.process(["only one line"])


def test_server_flags_filtered_on_the_host_are_the_flags_of_the_whole_help(
    tmp_path: Path,
) -> None:
    import subprocess

    from gemma4_fleet.facts import LlamaServerFlags
    from gemma4_fleet.render import parse_help_flags

    recorded = Path(__file__).parent / "data" / "llama-server-help-0c1e570.txt"
    binary = tmp_path / "llama server"  # a stand-in binary printing the recorded --help
    binary.write_text(f"#!/bin/sh\ncat '{recorded}'\n")
    binary.chmod(0o755)
    fact = LlamaServerFlags()

    def read(path: Path) -> set[str] | None:
        command = fact.command(binary=str(path)).get_raw_value()
        out = subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=True)
        return fact.process(out.stdout.splitlines())

    assert read(binary) == parse_help_flags(recorded.read_text())
    assert "--spec-type" in (read(binary) or set())
    assert read(tmp_path / "not built") is None


def test_server_flags_come_from_the_help_the_build_kept(tmp_path: Path) -> None:
    """A build's `llama-server.help` answers without running the binary; without it, --help."""
    import subprocess

    from gemma4_fleet.facts import LlamaServerFlags

    binary = tmp_path / "llama-server"
    binary.write_text("#!/bin/sh\necho '-ran, --the-binary'\n")
    binary.chmod(0o755)
    fact = LlamaServerFlags()

    def read() -> set[str] | None:
        command = fact.command(binary=str(binary)).get_raw_value()
        out = subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=True)
        return fact.process(out.stdout.splitlines())

    assert read() == {"-ran", "--the-binary"}
    (tmp_path / "llama-server.help").write_text("usage: llama-server\n\n-m,    --model FNAME  x\n")
    assert read() == {"-m", "--model"}
    binary.unlink()  # a help file without its binary is no build
    assert read() is None


def test_installed_packages_are_those_dpkg_marks_ii() -> None:
    from gemma4_fleet.facts import InstalledPackages

    recorded = ["ii  cmake", "un  ccache", "rc  old-thing", "ii  python3-prometheus-client"]
    assert InstalledPackages().process(recorded) == {"cmake", "python3-prometheus-client"}
    assert InstalledPackages().process([]) == set()


def test_installed_packages_on_this_machine() -> None:
    """The real command here (a Debian controller): dpkg itself is installed."""
    import subprocess

    from gemma4_fleet.facts import InstalledPackages

    command = InstalledPackages().command()
    out = subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=True)
    installed = InstalledPackages().process(out.stdout.splitlines())
    assert "dpkg" in installed and "g4f-no-such-package" not in installed


def test_os_release_is_read_as_key_values() -> None:
    from gemma4_fleet.facts import OsRelease

    recorded = ['PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"', "ID=debian", 'VERSION_ID="12"', ""]
    assert OsRelease().process(recorded) == {
        "PRETTY_NAME": "Debian GNU/Linux 12 (bookworm)",
        "ID": "debian",
        "VERSION_ID": "12",
    }
    assert OsRelease().process([]) == {}


# Recorded on a test host after a deploy (systemd 252): two of the deploy's units, a static
# service, a unit that does not exist, and one of systemd's own.
SYSTEMCTL_SHOW = """\
Id=llama-server-gemma3.service
SubState=running
UnitFileState=enabled

Id=llama-smoke-gemma3.timer
SubState=waiting
UnitFileState=enabled

Id=llama-smoke-gemma3.service
SubState=dead
UnitFileState=static

Id=nope.service
SubState=dead
UnitFileState=

Id=systemd-journald.service
SubState=running
UnitFileState=static
""".splitlines()


def test_unit_states_of_several_units_come_from_one_systemctl_show() -> None:
    fact = SystemdUnitStates()
    units = ["llama-server-gemma3.service", "x; whoami.timer"]
    assert shlex.split(fact.command(units=units).get_raw_value()) == [
        "systemctl", "show", "--property", "Id,SubState,UnitFileState", "--", *units
    ]  # fmt: skip
    assert fact.process(SYSTEMCTL_SHOW) == {
        "llama-server-gemma3.service": UnitState(running=True, enabled=True),
        "llama-smoke-gemma3.timer": UnitState(running=True, enabled=True),
        "llama-smoke-gemma3.service": UnitState(running=False, enabled=True),
        "nope.service": UnitState(running=False, enabled=False),
        "systemd-journald.service": UnitState(running=True, enabled=True),
    }
    with pytest.raises(FactProcessError):
        fact.process(["Failed to connect to bus: No such file or directory"])
    # a read that failed (the host went away) gives no states, not None
    assert SystemdUnitStates.default() == {}
