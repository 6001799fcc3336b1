"""Debian packages the deploys need: installed when missing, judged from one `dpkg -l` per host
and run (the build toolchain and the smoke check's library both ask)."""

from __future__ import annotations

import weakref

from pyinfra import host, state
from pyinfra.api import State
from pyinfra.facts.deb import DebPackages
from pyinfra.operations import apt

_installed: weakref.WeakKeyDictionary[State, dict[str, set[str]]] = weakref.WeakKeyDictionary()


def install_missing(packages: list[str]) -> None:
    """apt-install those of `packages` the host lacks; no apt update when none is missing
    (hosts may be offline)."""
    known = _installed.setdefault(state, {})
    if host.name not in known:
        known[host.name] = set(host.get_fact(DebPackages))
    missing = [name for name in packages if name not in known[host.name]]
    if missing:
        apt.packages(
            name=f"Install {' '.join(missing)}", packages=missing, update=True, no_recommends=True
        )
