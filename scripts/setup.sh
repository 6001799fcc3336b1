#!/usr/bin/env bash
# Everything this project needs on a fresh Debian/Ubuntu machine, as root. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(debootstrap systemd systemd-container openssh-client iproute2 git python3 python3-venv
          xz-utils curl ca-certificates
          prometheus chromium)  # promtool and Prometheus for the monitoring tests; screenshots
missing=()
for pkg in "${packages[@]}"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
stamp=.venv/.g4f-installed
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setup: installing the package and its dependencies into .venv"
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e '.[dev]'
    echo "$want" >"$stamp"
fi
