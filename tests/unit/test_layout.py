"""The package never loads its test harness: every module imports without gemma4_fleet.testfleet."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

MODULES = [
    "gemma4_fleet.cli",
    "gemma4_fleet.common",
    "gemma4_fleet.config",
    "gemma4_fleet.deploys",
    "gemma4_fleet.gguf_meta",
    "gemma4_fleet.memory_model",
    "gemma4_fleet.pipeline",
    "gemma4_fleet.render",
    "gemma4_fleet.synthetic",
    "gemma4_fleet.tune_command",
    "gemma4_fleet.vram_plan",
]


def test_package_modules_do_not_import_the_test_fleet() -> None:
    code = (
        "import importlib, sys\n"
        f"for name in {MODULES!r}:\n"
        "    importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m.startswith('gemma4_fleet.testfleet')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip() == "[]"
