"""testfleet/results.py: pyinfra 3's Results table read back from recorded runs.

data/pyinfra/: `first-converge.txt` is docs/gpu-proof/deploy/pyinfra-run1.txt (a first deploy
on a GPU machine); `ignored-error.txt` and `stopped.txt` are pyinfra 3.10 on @local running
four operations (`server.shell` of `true`, `files.directory` of an existing directory,
`server.shell` of `false`, `server.shell` of `true`), with `_ignore_errors=True` on the failing
one, then without it (pyinfra stops there and prints no table).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gemma4_fleet.testfleet.results import OpCounts, changed_ops, results_table

pytestmark = pytest.mark.unit
DATA = Path(__file__).parent / "data" / "pyinfra"


def test_a_first_converge() -> None:
    table = results_table((DATA / "first-converge.txt").read_text())
    assert table == {
        "llama.cpp build | llama.cpp install root": (1, 0, 0),
        "llama.cpp build | llama.cpp source at e0f2586": (1, 0, 0),
        "llama.cpp build | Build llama.cpp e0f2586f81ff-4d5348b6": (1, 0, 0),
        "Models | Models directory": (1, 0, 0),
        "Models | Model gemma4-synthetic-tiny-target.gguf": (1, 0, 0),
        "Models | Model gemma4-synthetic-tiny-assistant.gguf": (1, 0, 0),
        "llama-server-gemma4.service: flags known to the build": (0, 0, 1),
    }
    assert changed_ops(table) == {
        "llama.cpp build | llama.cpp install root": 1,
        "llama.cpp build | llama.cpp source at e0f2586": 1,
        "llama.cpp build | Build llama.cpp e0f2586f81ff-4d5348b6": 1,
        "Models | Models directory": 1,
        "Models | Model gemma4-synthetic-tiny-target.gguf": 1,
        "Models | Model gemma4-synthetic-tiny-assistant.gguf": 1,
    }


def test_errors_no_changes_and_the_grand_total() -> None:
    table = results_table((DATA / "ignored-error.txt").read_text())
    assert table == {
        "Say hello": OpCounts(success=1, error=0, no_change=0),
        "Scratch directory": OpCounts(success=0, error=0, no_change=1),
        "A command that fails": OpCounts(success=0, error=1, no_change=0),
        "Another command": OpCounts(success=1, error=0, no_change=0),
    }
    assert changed_ops(table) == {"Say hello": 1, "Another command": 1}


def test_a_run_that_stopped_has_no_table() -> None:
    assert results_table((DATA / "stopped.txt").read_text()) == {}
    assert results_table("") == {}


def test_host_counts_of_a_fleet_run() -> None:
    # The table as pyinfra 3 prints it for three hosts (columns padded to the widest cell).
    output = (
        "--> Results:\n"
        "    Operation                    Hosts   Success   Error   No Change   \n"
        "    Unit llama-server.service    3       2         -       1           \n"
        "    Build llama.cpp 9b4f760      3       -         1       2           \n"
        "    Grand total                  6       2         1       3           \n"
        "\n"
        "--> Disconnecting from hosts...\n"
    )
    assert results_table(output) == {
        "Unit llama-server.service": (2, 0, 1),
        "Build llama.cpp 9b4f760": (0, 1, 2),
    }
    assert changed_ops(results_table(output)) == {"Unit llama-server.service": 2}
