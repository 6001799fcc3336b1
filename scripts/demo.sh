#!/usr/bin/env bash
# The main job on the embedded default: boot two local test hosts (systemd-nspawn, real sshd) and
# run the full deploy against them (CPU build of the pinned llama.cpp from a local git mirror,
# the real Gemma 3 270M model as target and draft). Leaves the fleet up to play with;
# `.venv/bin/gemma4-fleet fleet down` removes it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/gemma4-fleet fleet up 2
# --parallel 1: both hosts share this machine's cores; one after the other the second build is
# mostly ccache hits.
.venv/bin/pyinfra -y --parallel 1 inventories/local.py deploys/gemma4_mtp.py "$@"
