"""GPU deploy proof (docs/gpu-deploy-proof.md): the packaged build and model deploys on one host.

Runs the project's real pyinfra code against `@local` on a GPU machine without systemd and
without network: the validated host configuration with its GPU fact, detected CUDA
architectures and VRAM plan (`host_setup`), the llama.cpp build (`llama_cpp`), the models
(`models`) and the flag check of the instance's command line (`flags_known`). Not `toolchain`
(it would apt-get install) and not `servers` (systemd units).

    pyinfra -y @local scripts/gpu_deploy_proof_deploy.py --data llamacpp='{...}' ...

With G4F_PROOF_DUMP=FILE, what the unit would run (argv, GPU UUID, build id, plan) is also
written to FILE as JSON, so the server can be started by hand exactly as the unit would.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pyinfra import host

from gemma4_fleet import operations as g4f
from gemma4_fleet.deploys import build_role, host_setup, model_roles
from gemma4_fleet.deploys.build import llama_cpp
from gemma4_fleet.deploys.models import models
from gemma4_fleet.render import flag_names, server_argv

setup = host_setup()
config, plan = setup.config, setup.plan
llama_cpp(config, *build_role())
models(config, model_roles())

dump: dict[str, object] = {
    "host": host.name,
    "commit": config.llamacpp.commit,
    "cuda_architectures": config.build.cuda_architectures,
    "build_id": config.build_id,
    "build_dir": config.build_dir,
    "server_binary": config.server_binary,
    "gpus": [gpu.__dict__ for gpu in setup.gpus],
    "plan": plan.to_json(),
    "plan_table": plan.table(),
    "instances": [],
}
for inst in config.instances:
    argv = server_argv(config, plan.settle(inst))
    g4f.flags_known(
        name=f"{inst.unit}: flags known to the build",
        binary=config.server_binary,
        flags=flag_names(argv),
    )
    dump["instances"].append(  # type: ignore[attr-defined]
        {
            "name": inst.name,
            "unit": inst.unit,
            "argv": argv,
            "gpu_uuid": setup.gpu_uuid(inst.gpu),
            "model_path": config.model_path(inst.target),
            "port": inst.port,
        }
    )

if os.environ.get("G4F_PROOF_DUMP"):
    Path(os.environ["G4F_PROOF_DUMP"]).write_text(json.dumps(dump, indent=2) + "\n")
