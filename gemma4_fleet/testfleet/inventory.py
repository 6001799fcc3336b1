"""pyinfra inventory data for the local test fleet: the embedded default a fresh machine runs."""

from __future__ import annotations

from typing import Any

from gemma4_fleet.testfleet import assets
from gemma4_fleet.testfleet.hosts import HOST_CCACHE_DIR, Fleet, FleetError

MODEL = "gemma-3-270m"
DRAFT = "gemma-3-270m-draft"


def demo_data(mirror_url: str, mirror_commit: str) -> dict[str, Any]:
    """The real job on test hosts: CPU build from the git mirror, Gemma 3 270M as target and
    draft (`draft-simple`; no Gemma 4 weights can be had here), server reachable on the veth."""
    model = {
        "file": assets.GEMMA3_270M_FILE,
        "url": f"{mirror_url}/models/{assets.GEMMA3_270M_FILE}",
        "sha256": assets.GEMMA3_270M_SHA256,
    }
    return {
        "llamacpp": {"git_url": f"{mirror_url}/llama.cpp.git", "commit": mirror_commit},
        "llamacpp_build": {"cuda": False, "ccache_dir": HOST_CCACHE_DIR},
        "llama_models": {MODEL: {"role": "target", **model}, DRAFT: {"role": "drafter", **model}},
        "llama_instances": [
            {
                "name": "gemma3",
                "target": MODEL,
                "drafter": DRAFT,
                "spec_type": "draft-simple",
                "draft_n_max": 4,
                "ctx_size": 4096,
                "host": "0.0.0.0",
                "port": 8080,
                # The 270M GGUF carries no chat template (llama-server would fall back to
                # chatml): llama.cpp's built-in Gemma template makes /v1/chat/completions sane.
                "chat_template": "gemma",
                # The fleet's bridge is private to this machine; tests reach it without a key.
                "allow_unauthenticated": True,
                # Two hosts share this machine's cores: one thread each keeps them from thrashing.
                "threads": 1,
            }
        ],
    }


def _running_fleet() -> Fleet:
    fleet = Fleet()
    if not fleet.hosts:
        raise FleetError("no local test fleet is up: run `gemma4-fleet fleet up 2` first")
    return fleet


def local_fleet_hosts() -> list[tuple[str, dict[str, Any]]]:
    """Hosts of the running local fleet (see `gemma4-fleet fleet up N`) with the demo data."""
    fleet = _running_fleet()
    return [
        (name, {**ssh, **demo_data(fleet.mirror_url, fleet.mirror_commit)})
        for name, ssh in fleet.inventory()
    ]


def release_group(release: str) -> list[str]:
    """Names of the running fleet's hosts of one Debian release (a group for `--limit`)."""
    return [host.name for host in _running_fleet().hosts.values() if host.release == release]
