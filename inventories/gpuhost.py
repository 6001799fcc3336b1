"""The GPU test host that `python -m gemma4_fleet.testfleet.gpuhost up` booted.

G4F_GPUHOST_STATE: the host's state directory (default /tmp/g4fh/host); G4F_GPUHOST_DATA: a JSON
file of host data (llamacpp, llama_models, llama_instances, ...) written by the proof script.
"""

import json
import os
from pathlib import Path

from gemma4_fleet.testfleet.gpuhost import GpuHost

_state = Path(os.environ.get("G4F_GPUHOST_STATE", "/tmp/g4fh/host"))
_data_file = os.environ.get("G4F_GPUHOST_DATA")
_data = json.loads(Path(_data_file).read_text()) if _data_file else {}

gpu_host = [(name, {**ssh, **_data}) for name, ssh in GpuHost(_state).inventory()]
