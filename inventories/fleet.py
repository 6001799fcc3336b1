"""Example GPU fleet: edit the hostnames, GPUs and model sources, then

    pyinfra inventories/fleet.py deploys/gemma4_mtp.py

The pinned llama.cpp comes from group_data/all.py, the seed 003 recipe and every other default
from gemma4_fleet/config.py; any key can be overridden per host here. Every host's data is
validated before any host is touched: fill in the sha256 of your model files (`sha256sum FILE`)
or the deploy stops and names the field.
"""

# Gemma 4 12B QAT and its MTP assistant drafter (Google's QAT release). `url` is where your hosts
# download from (a LAN mirror, say); use "local_path" instead to upload from this machine.
_MODELS = {
    "gemma-4-12b-it-qat-q4_0": {
        "role": "target",
        "file": "gemma-4-12b-it-qat-q4_0.gguf",
        "url": "http://models.lan/gemma4/gemma-4-12b-it-qat-q4_0.gguf",
        "sha256": "FILL-IN: sha256sum gemma-4-12b-it-qat-q4_0.gguf",
    },
    "gemma-4-12b-it-qat-assistant-mtp-q8_0": {
        "role": "drafter",
        "file": "gemma-4-12B-it-qat-assistant-MTP-Q8_0.gguf",
        "url": "http://models.lan/gemma4/gemma-4-12B-it-qat-assistant-MTP-Q8_0.gguf",
        "sha256": "FILL-IN: sha256sum gemma-4-12B-it-qat-assistant-MTP-Q8_0.gguf",
    },
}
_GEMMA4 = {"target": "gemma-4-12b-it-qat-q4_0", "drafter": "gemma-4-12b-it-qat-assistant-mtp-q8_0"}

gpu_hosts = [
    # Seed 003's box: a 4090 runs Gemma 4 + MTP at 256k context; whisper and TTS live on GPU 1
    # so they never eat the 4090's ~2 GB of headroom.
    (
        "box4090.lan",
        {
            "llama_models": _MODELS,
            "llama_instances": [{"name": "gemma4", "gpu": "0", "port": 8080, **_GEMMA4}],
            "gpu_services": [
                {"unit": "whisper-server.service", "gpu": "1"},
                {"unit": "tts.service", "gpu": "1"},
            ],
        },
    ),
    # Two 3090s, one llama-server on each: own unit, port and GPU.
    (
        "dual3090.lan",
        {
            "llama_models": _MODELS,
            "llama_instances": [
                {"name": "gemma4-a", "gpu": "0", "port": 8080, "ctx_size": 131072, **_GEMMA4},
                {"name": "gemma4-b", "gpu": "1", "port": 8081, "ctx_size": 131072, **_GEMMA4},
            ],
        },
    ),
    # A 5090 (32 GB): 256k context at parallel 1 fits; parallel 2 would not (seed 003).
    (
        "box5090.lan",
        {
            "llama_models": _MODELS,
            "llama_instances": [{"name": "gemma4", "gpu": "0", "port": 8080, **_GEMMA4}],
        },
    ),
]
