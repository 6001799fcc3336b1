"""Debian packages the deploys need, installed when missing."""

from __future__ import annotations

from pyinfra import host
from pyinfra.operations import apt

from gemma4_fleet.facts import InstalledPackages


def install_missing(packages: list[str]) -> None:
    """apt-install those of `packages` the host lacks; no apt update when none is missing
    (hosts may be offline)."""
    installed = host.get_fact(InstalledPackages)
    missing = [name for name in packages if name not in installed]
    if missing:
        apt.packages(
            name=f"Install {' '.join(missing)}", packages=missing, update=True, no_recommends=True
        )
