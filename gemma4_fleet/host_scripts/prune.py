#!/usr/bin/env python3
"""Delete the builds and model versions this tool made that no unit refers to (stdlib only).

Shipped to the hosts and run with the host's python3 by the deploy after something changed.
Only directories that hold the marker file `.gemma4-fleet-owned` (written when the deploy
created them) are candidates: anything else under those folders is never touched. A candidate
stays while a live `--unit-glob` unit or a unit saved in `--lkg-dir` names a path inside it,
as written in the unit file (systemd's escaping is taken into account).

    prune.py --units-dir /etc/systemd/system --unit-glob 'llama-server-*.service' \
        --lkg-dir /var/lib/gemma4-fleet/last-known-good /opt/llama.cpp/builds /var/lib/llama-models

Prints one `removed <dir>` line per deletion.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import sys
from collections.abc import Iterable, Sequence

MARKER = ".gemma4-fleet-owned"


def unit_file_spellings(path: str) -> set[str]:
    """How a path can appear in a unit file: as is, or inside a quoted, escaped word."""
    quoted = path.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    return {path, path.replace("%", "%%"), quoted, quoted.replace("$", "$$")}


def referenced(directory: str, units_text: str) -> bool:
    """Whether a unit names something inside `directory`."""
    return any(f"{spelling}/" in units_text for spelling in unit_file_spellings(directory))


def units_text(units_dir: str, unit_glob: str, lkg_dir: str) -> str:
    """The live units of this tool and every saved last-known-good unit, concatenated."""
    paths = glob.glob(os.path.join(glob.escape(units_dir), unit_glob))
    paths += glob.glob(os.path.join(glob.escape(lkg_dir), "*.service"))
    texts = []
    for path in sorted(paths):
        with open(path, encoding="utf-8", errors="replace") as fh:
            texts.append(fh.read())
    return "\n".join(texts)


def prune(roots: Iterable[str], text: str) -> list[str]:
    """Remove every marked, unreferenced directory directly under `roots`; what was removed."""
    removed = []
    for root in roots:
        if not os.path.isdir(root):
            continue
        for name in sorted(os.listdir(root)):
            path = os.path.join(root, name)
            if os.path.islink(path) or not os.path.isdir(path):
                continue
            if os.path.isfile(os.path.join(path, MARKER)) and not referenced(path, text):
                shutil.rmtree(path)
                removed.append(path)
    return removed


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--units-dir", default="/etc/systemd/system")
    p.add_argument("--unit-glob", required=True)
    p.add_argument("--lkg-dir", required=True)
    p.add_argument("roots", nargs="+", help="folders whose subfolders are builds/model versions")
    ns = p.parse_args(argv)
    text = units_text(ns.units_dir, ns.unit_glob, ns.lkg_dir)
    for path in prune(ns.roots, text):
        print(f"removed {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
