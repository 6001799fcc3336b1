"""The host scripts, shipped before any step that runs them.

Build, build and model placement, verify, smoke check, prune and drain are real files in
gemma4_fleet/host_scripts, tested on their own, placed in one operation that checks them all in
one read and sends only those that differ.
"""

from __future__ import annotations

from importlib.resources import files as package_files
from pathlib import Path

from pyinfra.api import deploy

from gemma4_fleet import operations as g4f
from gemma4_fleet.render import HOST_SCRIPTS_DIR, SHIPPED_SCRIPTS


@deploy("Host scripts")
def host_scripts() -> None:
    """Place gemma4_fleet/host_scripts/* in HOST_SCRIPTS_DIR, only those that differ."""
    scripts = package_files("gemma4_fleet") / "host_scripts"
    g4f.shipped_files(
        name=f"Host scripts in {HOST_SCRIPTS_DIR}",
        files={dest: str(scripts / Path(dest).name) for dest in SHIPPED_SCRIPTS},
    )
