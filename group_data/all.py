"""Defaults for every host: the pinned llama.cpp and the seed 003 recipe (Gemma 4 12B QAT + MTP).

Per host, the inventory lists `llama_instances` (which models, port, GPU, ctx) and may override
any key here. Every value is validated (gemma4_fleet.config) before any host is touched.
"""

# llama.cpp at a pinned commit: rebuilt only when this (or a build option) changes.
llamacpp = {
    "git_url": "https://github.com/ggml-org/llama.cpp.git",
    "commit": "0c1e57098bba43ac29e6e3b677cdceebdd22334f",
}

llamacpp_build = {
    "cuda": True,
    "cuda_architectures": None,  # None: from each host's GPUs (nvidia-smi compute_cap)
    "cmake_flags": [],
    "install_root": "/opt/llama.cpp",
    "install_cuda_toolkit": False,  # True: apt-get install nvidia-cuda-toolkit if nvcc is missing
}

# The recipe from seed 003: MTP pays off only at --parallel 1; -fit off because llama.cpp's fit
# does not count the drafter; q8_0 K/V costs nothing in speed and keeps long-context fidelity.
llama_server = {
    "host": "127.0.0.1",
    "port": 8080,
    "ctx_size": 262144,
    "spec_type": "draft-mtp",
    "draft_n_max": 3,
    "draft_n_min": 0,
    "draft_p_min": 0.0,
    "cache_type_k": "q8_0",
    "cache_type_v": "q8_0",
    "cache_type_k_draft": "q8_0",
    "cache_type_v_draft": "q8_0",
    "parallel": 1,
    "fit": False,
    "flash_attn": "on",
    "jinja": True,
    "cont_batching": True,
    "gpu_layers": "all",
    "draft_gpu_layers": "all",
    "extra_args": [],
}

llama_models_dir = "/var/lib/llama-models"
llama_service_user = "llama"
