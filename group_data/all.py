"""Host data for every host: the llama.cpp pin. The seed 003 recipe and every other default live
in gemma4_fleet.config (`ServerSettings`, `BuildConfig`, `HostConfig`); set a key here, in the
inventory or with `--data` only to change it.

Per host, the inventory lists `llama_instances` (which models, port, GPU, ctx). Every value is
validated (gemma4_fleet.config) before any host is touched.
"""

# llama.cpp at a pinned commit: rebuilt only when this (or a build option) changes. A deployment
# choice, not a code default: a package upgrade never moves it.
llamacpp = {
    "git_url": "https://github.com/ggml-org/llama.cpp.git",
    "commit": "0c1e57098bba43ac29e6e3b677cdceebdd22334f",
}
