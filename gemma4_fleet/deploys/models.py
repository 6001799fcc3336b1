"""Model files: every GGUF this host's instances use, placed under its sha256 and verified."""

from __future__ import annotations

from pyinfra.api import deploy
from pyinfra.api.operation import OperationMeta
from pyinfra.operations import files

from gemma4_fleet import operations as g4f
from gemma4_fleet.config import HostConfig


@deploy("Models")
def models(config: HostConfig) -> list[OperationMeta]:
    """Place every model this host's instances use, sha256-verified."""
    files.directory(name="Models directory", path=config.models_dir, mode="755")
    by_path = {config.model_path(name): model for name, model in config.used_models().items()}
    return [
        g4f.model_file(name=f"Model {model.file}", dest=path, model=model)
        for path, model in by_path.items()
    ]
