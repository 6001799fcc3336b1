"""pyinfra's end-of-run Results table, read back from its output.

The fleet tests, the converge benchmark and the GPU host proof all judge a run by what each
operation changed (a no-op converge changes nothing; a compile is the "Build llama.cpp"
operation changing); pyinfra 3 prints that only as this table, so one reader serves them all.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import NamedTuple

# An operation row: name, then the Hosts, Success, Error and No Change columns ("-" for none).
_ROW = re.compile(r"^\s+(.*?)\s{2,}(\d+)\s+(\d+|-)\s+(\d+|-)\s+(\d+|-)\s*$")


class OpCounts(NamedTuple):
    """Hosts per outcome of one operation."""

    success: int
    error: int
    no_change: int


def results_table(output: str) -> dict[str, OpCounts]:
    """Operation name -> host counts, from the table after "--> Results:" (no Grand total).

    Empty when the output has no table (pyinfra stopped before running operations).
    """
    table: dict[str, OpCounts] = {}
    in_table = False
    for line in output.splitlines():
        if line.strip().startswith("Operation") and "No Change" in line:
            in_table = True
            continue
        if in_table:
            match = _ROW.match(line)
            if not match:
                break
            success, error, no_change = (0 if v == "-" else int(v) for v in match.groups()[2:])
            if match.group(1) != "Grand total":
                table[match.group(1)] = OpCounts(success, error, no_change)
    return table


def changed_ops(table: Mapping[str, OpCounts]) -> dict[str, int]:
    """Operation name -> hosts it changed, for the operations that changed any."""
    return {name: counts.success for name, counts in table.items() if counts.success}
