"""Model files: every GGUF this host's instances use, placed under its sha256 and verified."""

from __future__ import annotations

from collections.abc import Mapping

from pyinfra.api import deploy
from pyinfra.api.operation import OperationMeta
from pyinfra.operations import files

from gemma4_fleet import operations as g4f
from gemma4_fleet.config import HostConfig
from gemma4_fleet.fleet_share import ShareRole, model_artifact_path


@deploy("Models")
def models(config: HostConfig, roles: Mapping[str, ShareRole]) -> list[OperationMeta]:
    """Place every model this host's instances use, sha256-verified, downloaded once per fleet.

    `roles` (by sha256, from gemma4_fleet.deploys.model_roles) says which host downloads a model
    and copies it into the controller cache, and which hosts get it from there. Every host calls
    every operation, so the download and the copy run before the placing on the other hosts.
    """
    files.directory(name="Models directory", path=config.models_dir, mode="755")
    placed = []
    shared = [
        (path, model, roles.get(model.sha256), str(model_artifact_path(model.sha256, model.file)))
        for path, model in config.placed_models().items()
    ]
    for path, model, role, artifact in shared:
        placed.append(g4f.model_file(name=f"Model {model.file}", dest=path, model=model, role=role))
        g4f.publish_model(
            name=f"Copy {model.file} into the controller cache",
            dest=path,
            model=model,
            role=role,
            artifact=artifact,
        )
    for path, model, role, artifact in shared:
        placed.append(
            g4f.install_model(
                name=f"{model.file} from the controller cache",
                dest=path,
                model=model,
                role=role,
                artifact=artifact,
            )
        )
    return placed
