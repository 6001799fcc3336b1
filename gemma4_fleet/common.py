"""Small helpers the package and the test fleet share: the cache directory and sha256 of a file."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_dir() -> Path:
    """Root of everything large the project caches; G4F_CACHE overrides the default
    (/var/cache/gemma4-fleet as root, ~/.cache/gemma4-fleet otherwise)."""
    default = "/var/cache/gemma4-fleet" if os.geteuid() == 0 else "~/.cache/gemma4-fleet"
    path = Path(os.environ.get("G4F_CACHE", default)).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (model files are gigabytes)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
