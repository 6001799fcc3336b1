"""Typed configuration of one host, read from pyinfra host data and validated before any operation.

Host data keys (group_data/*.py, the inventory, `--data`):

| key | what |
| --- | --- |
| `llamacpp` | `{"git_url": ..., "commit": <40 hex>}` |
| `llamacpp_build` | `BuildConfig` fields |
| `llama_models` | `{name: ModelFile fields}`; a host places only what its instances use |
| `llama_server` | `ServerSettings` fields: the recipe every instance starts from |
| `llama_instances` | list of `Instance` fields; each overrides any `llama_server` field |
| `llama_models_dir`, `llama_service_user` | where models live, who runs the servers |
| `gpu_services` | other GPU services (whisper, TTS) to pin to a GPU with a drop-in |
| `gpu_memory_mib` | `{gpu index or UUID: MiB}` VRAM budget per GPU when not read from nvidia-smi |
| `vram_headroom_mib` | VRAM left free on every GPU the planner fills |
| `llama_smoke` | `SmokeConfig` fields: thresholds and schedule of the smoke check |
| `llama_drain` | `DrainConfig` fields: how long a restart waits for requests in flight |
"""

from __future__ import annotations

import difflib
import hashlib
import ipaddress
import json
import posixpath
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    field_validator,
    model_validator,
)


def _lower(value: Any) -> Any:
    if isinstance(value, str) and re.fullmatch(r"[0-9A-Fa-f]{64}", value.strip()):
        return value.strip().lower()
    return value


# `sha256sum` prints lower case, other tools upper case: both mean the same bytes.
Sha256 = Annotated[str, BeforeValidator(_lower), Field(pattern=r"^[0-9a-f]{64}$")]
KvType = Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"]
# "auto": the planner picks the fastest type that fits the budget at the wanted ctx
# (gemma4_fleet.vram_plan): the measured order of a tuned profile, else AUTO_KV_ORDER.
KvChoice = Literal["auto", KvType]
# f16 decodes 16-23 % faster than q8_0 on an H200 (briefs/gpu-host.md); q8_0 halves the KV bytes.
# Beyond q8_0 the planner refuses rather than silently trade long-context fidelity for fit.
AUTO_KV_ORDER: tuple[KvType, ...] = ("f16", "q8_0")
Layers = int | Literal["all", "auto"]
Name = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{0,40}$")]

# Directories the tool owns and prunes must be its own: never these themselves, nothing under
# the kernel's and per-boot ones, nothing of the tool's own state. (Below /tmp is allowed for
# throwaway hosts such as scripts/gpu_deploy_proof.sh; it may be wiped at boot.)
SHARED_DIRS = frozenset(
    [
        "/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/libx32",
        "/media", "/mnt", "/nix", "/opt", "/proc", "/root", "/run", "/sbin", "/snap", "/srv",
        "/sys", "/tmp", "/usr", "/usr/bin", "/usr/include", "/usr/lib", "/usr/lib64",
        "/usr/libexec", "/usr/local", "/usr/local/bin", "/usr/local/etc", "/usr/local/include",
        "/usr/local/lib", "/usr/local/sbin", "/usr/local/share", "/usr/local/src", "/usr/sbin",
        "/usr/share", "/usr/src", "/var", "/var/backups", "/var/cache", "/var/lib", "/var/local",
        "/var/lock", "/var/log", "/var/mail", "/var/opt", "/var/run", "/var/spool", "/var/tmp",
        "/var/www", "/etc/systemd", "/etc/systemd/system", "/var/lib/gemma4-fleet",
        "/var/lib/gemma4-fleet-smoke", "/usr/local/lib/gemma4-fleet", "/lost+found",
    ]
)  # fmt: skip
VOLATILE_DIRS = ("/dev", "/proc", "/run", "/sys", "/var/run", "/var/lock")
# What systemd unit files and the host-side shell take unquoted (no spaces, quotes, %, $, \, ;).
_PATH_CHARS = re.compile(r"[A-Za-z0-9._/+@-]+")


def managed_dir(value: str) -> str:
    """A directory the tool creates and prunes: absolute, normalised, dedicated, plain."""
    if not value.startswith("/"):
        raise ValueError(f"{value!r} is not an absolute path")
    bad = sorted({c for c in value if not _PATH_CHARS.fullmatch(c)})
    if bad:
        shown = " ".join(repr(c) for c in bad)
        raise ValueError(
            f"{value!r} has characters that need quoting in unit files and shells ({shown}); "
            "use letters, digits and . _ - + @ /"
        )
    parts = value.split("/")
    if "." in parts or ".." in parts:
        raise ValueError(f"{value!r} has '.' or '..' components; write the real path")
    path = posixpath.normpath(value)
    path = "/" + path.lstrip("/")  # normpath keeps a leading '//'
    if path in SHARED_DIRS:
        raise ValueError(
            f"{path} is a shared system directory; the tool prunes inside the directories it "
            "manages, so give it a dedicated one (e.g. /var/lib/llama-models, /opt/llama.cpp)"
        )
    if any(path.startswith(f"{v}/") for v in VOLATILE_DIRS):
        raise ValueError(f"{path} is under a kernel or per-boot directory ({path.split('/')[1]})")
    return path


ManagedDir = Annotated[str, AfterValidator(managed_dir)]

# A GPU index, a GPU UUID, or a MIG UUID (new "MIG-<uuid>" and old "MIG-GPU-<uuid>/<gi>/<ci>").
_UUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
GPU_PATTERN = re.compile(rf"\d{{1,3}}|GPU-{_UUID}|MIG-{_UUID}|MIG-GPU-{_UUID}/\d+/\d+")


def gpu_ref(value: str) -> str:
    if not GPU_PATTERN.fullmatch(value):
        raise ValueError(
            f"{value!r} is neither a GPU index (0, 1, ...) nor a GPU or MIG UUID as "
            "`nvidia-smi -L` prints it (GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)"
        )
    return value


GpuRef = Annotated[str, AfterValidator(gpu_ref)]

# Accounts that belong to the system or other software (a host may have more: the deploy also
# refuses any existing account the tool did not create, see gemma4_fleet.host_checks).
WELL_KNOWN_ACCOUNTS = frozenset(
    [
        "root", "daemon", "bin", "sys", "sync", "games", "man", "lp", "mail", "news", "uucp",
        "proxy", "www-data", "backup", "list", "irc", "gnats", "nobody", "nogroup", "_apt",
        "systemd-network", "systemd-resolve", "systemd-timesync", "systemd-journal",
        "systemd-coredump", "messagebus", "sshd", "syslog", "ubuntu", "debian", "admin",
        "postgres", "mysql", "redis", "nginx", "apache", "polkitd", "avahi", "dnsmasq", "ntp",
        "chrony", "tss", "uuidd", "usbmux", "rtkit", "colord",
    ]
)  # fmt: skip


def service_account(value: str) -> str:
    if value in WELL_KNOWN_ACCOUNTS or value.startswith("systemd-"):
        raise ValueError(
            f"{value!r} is an account of the system or other software; the servers run as the "
            "tool's own system account (default 'llama')"
        )
    return value


# What users and their OpenAI clients call the model (llama-server --alias; one name, no comma).
Alias = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$")]

# llama.cpp's built-in chat templates at the pinned commit (`llama-server --help`,
# --chat-template); tests check this list against the recorded help text.
BUILTIN_CHAT_TEMPLATES = frozenset(
    (
        "bailing", "bailing-think", "bailing2", "chatglm3", "chatglm4", "chatml", "command-r",
        "deepseek", "deepseek-ocr", "deepseek2", "deepseek3", "exaone-moe", "exaone3", "exaone4",
        "falcon3", "gemma", "gigachat", "glmedge", "gpt-oss", "granite", "granite-4.0",
        "granite-4.1", "grok-2", "hunyuan-dense", "hunyuan-moe", "hunyuan-vl", "kimi-k2", "llama2",
        "llama2-sys", "llama2-sys-bos", "llama2-sys-strip", "llama3", "llama4", "megrez", "minicpm",
        "mistral-v1", "mistral-v3", "mistral-v3-tekken", "mistral-v7", "mistral-v7-tekken",
        "monarch", "openchat", "orion", "pangu-embedded", "phi3", "phi4", "rwkv-world", "seed_oss",
        "smolvlm", "solar-open", "vicuna", "vicuna-orca", "yandex", "zephyr",
    )
)  # fmt: skip

HOST_DATA_KEYS = {
    "llamacpp": "llamacpp",
    "build": "llamacpp_build",
    "models": "llama_models",
    "instances": "llama_instances",
    "models_dir": "llama_models_dir",
    "service_user": "llama_service_user",
    "gpu_services": "gpu_services",
    "gpu_memory_mib": "gpu_memory_mib",
    "vram_headroom_mib": "vram_headroom_mib",
    "smoke": "llama_smoke",
    "drain": "llama_drain",
    "builder": "llama_builder",
}


def server_unit(instance_name: str) -> str:
    """The llama-server unit of an instance ("*" gives the glob of them all)."""
    return f"llama-server-{instance_name}.service"


def smoke_unit(instance_name: str, suffix: str = "service") -> str:
    """The smoke-check service (or, with suffix "timer", its timer) of an instance."""
    return f"llama-smoke-{instance_name}.{suffix}"


CHAT_TEMPLATE_DIR = "/etc/gemma4-fleet/chat-templates"


class ConfigError(ValueError):
    """Bad host data: the message names the host and the field."""


# llama-server flags that typed config or the plan owns, by the field to use instead: in
# extra_args they would undo a check (MTP --parallel guard, unique ports, the VRAM plan).
# Every spelling of a flag is listed (one help line's aliases together, from `llama-server
# --help` at the pinned commit; tests/unit/test_bad_input.py checks them against the recorded
# help). Flags not listed pass through to llama-server as given.
OWNED_FLAGS: dict[str, tuple[str, ...]] = {
    "host": ("--host",),
    "port": ("--port", "--reuse-port"),
    "ctx_size": ("-c", "--ctx-size", "--swa-full", "--kv-unified-per-slot"),
    "parallel": ("-np", "--parallel", "-kvu", "--kv-unified", "-no-kvu", "--no-kv-unified"),
    "target": (
        "-m", "--model", "-mu", "--model-url", "-dr", "--docker-repo", "-hf", "-hfr",
        "--hf-repo", "-hff", "--hf-file", "--models-dir", "--models-preset", "--models-max",
        "--models-autoload", "--no-models-autoload", "--embd-gemma-default",
        "--fim-qwen-1.5b-default", "--fim-qwen-3b-default", "--fim-qwen-7b-default",
        "--fim-qwen-7b-spec", "--fim-qwen-14b-spec", "--fim-qwen-30b-default",
        "--gpt-oss-20b-default", "--gpt-oss-120b-default", "--vision-gemma-4b-default",
        "--vision-gemma-12b-default",
    ),
    "drafter": (
        "--spec-draft-model", "-md", "--model-draft", "--spec-draft-hf", "-hfd", "-hfrd",
        "--hf-repo-draft",
    ),
    "cache_type_k": ("-ctk", "--cache-type-k"),
    "cache_type_v": ("-ctv", "--cache-type-v"),
    "cache_type_k_draft": ("--spec-draft-type-k", "-ctkd", "--cache-type-k-draft"),
    "cache_type_v_draft": ("--spec-draft-type-v", "-ctvd", "--cache-type-v-draft"),
    "spec_type": ("--spec-type", "--spec-default"),
    "draft_n_max": ("--spec-draft-n-max", "--draft", "--draft-n", "--draft-max"),
    "draft_n_min": ("--spec-draft-n-min", "--draft-min", "--draft-n-min"),
    "draft_p_min": ("--spec-draft-p-min", "--draft-p-min"),
    "draft_gpu_layers": (
        "--spec-draft-ngl", "-ngld", "--gpu-layers-draft", "--n-gpu-layers-draft",
        "--spec-draft-device", "-devd", "--device-draft", "--spec-draft-override-tensor",
        "-otd", "--override-tensor-draft", "--spec-draft-cpu-moe", "-cmoed", "--cpu-moe-draft",
        "--spec-draft-n-cpu-moe", "--spec-draft-ncmoe", "-ncmoed", "--n-cpu-moe-draft",
    ),
    "gpu_layers": (
        "-ngl", "--gpu-layers", "--n-gpu-layers", "-ot", "--override-tensor", "-cmoe",
        "--cpu-moe", "-ncmoe", "--n-cpu-moe", "-ncffn", "--n-cpu-ffn", "-kvo", "--kv-offload",
        "-nkvo", "--no-kv-offload",
    ),
    "gpu": (
        "-dev", "--device", "-sm", "--split-mode", "-ts", "--tensor-split", "-mg",
        "--main-gpu", "--rpc",
    ),
    "flash_attn": ("-fa", "--flash-attn"),
    "fit": ("-fit", "--fit", "-fitt", "--fit-target", "-fitc", "--fit-ctx"),
    "threads": ("-t", "--threads"),
    "jinja": ("--jinja", "--no-jinja"),
    "cont_batching": ("-cb", "--cont-batching", "-nocb", "--no-cont-batching"),
    # No field for these: "(why)" is the answer.
    "(the speculative recipe is typed: spec_type, drafter, draft_*, cache_type_*_draft)": (
        "--spec-draft-threads", "-td", "--threads-draft", "--spec-draft-threads-batch", "-tbd",
        "--threads-batch-draft", "--spec-draft-cpu-mask", "-Cd", "--cpu-mask-draft",
        "--spec-draft-cpu-range", "-Crd", "--cpu-range-draft", "--spec-draft-cpu-strict",
        "--cpu-strict-draft", "--spec-draft-prio", "--prio-draft", "--spec-draft-poll",
        "--poll-draft", "--spec-draft-cpu-mask-batch", "-Cbd", "--cpu-mask-batch-draft",
        "--spec-draft-cpu-strict-batch", "--cpu-strict-batch-draft", "--spec-draft-prio-batch",
        "--prio-batch-draft", "--spec-draft-poll-batch", "--poll-batch-draft",
        "--spec-synth-len", "--spec-synth-rates", "--spec-draft-p-split", "--draft-p-split",
        "--spec-draft-backend-sampling", "--no-spec-draft-backend-sampling",
        "--spec-ngram-mod-n-min", "--spec-ngram-mod-n-max", "--spec-ngram-mod-n-match",
        "--spec-ngram-simple-size-n", "--spec-ngram-simple-size-m",
        "--spec-ngram-simple-min-hits", "--spec-ngram-map-k-size-n", "--spec-ngram-map-k-size-m",
        "--spec-ngram-map-k-min-hits", "--spec-ngram-map-k4v-size-n",
        "--spec-ngram-map-k4v-size-m", "--spec-ngram-map-k4v-min-hits", "--spec-ngram-size-n",
        "--spec-ngram-size-m", "--spec-ngram-min-hits",
    ),
    "(the VRAM plan counts llama-server's default batch sizes)": (
        "-b", "--batch-size", "-ub", "--ubatch-size",
    ),
    "(a multimodal projector is not in the VRAM plan)": (
        "-mm", "--mmproj", "-mmu", "--mmproj-url",
    ),
    "(API keys never go into argv or the unit file)": ("--api-key", "--api-key-file"),
    "(the unit always sets --offline --metrics --no-webui)": (
        "--offline", "--metrics", "--ui", "--webui", "--no-ui", "--no-webui",
    ),
    "(the health and smoke checks use http://host:port/ and /slots)": (
        "--api-prefix", "--ssl-key-file", "--ssl-cert-file", "--slots", "--no-slots",
    ),
    "alias": ("-a", "--alias"),
    "chat_template or chat_template_file": ("--chat-template", "--chat-template-file"),
}  # fmt: skip
_FLAG_OWNER = {flag: field for field, flags in OWNED_FLAGS.items() for flag in flags}


def owned_flag_problems(extra_args: Iterable[str]) -> list[str]:
    """Why each owned flag in extra_args is refused (`--flag=value` spellings included)."""
    problems = []
    for arg in extra_args:
        if not re.match(r"^--?[A-Za-z]", arg):
            continue  # a value, or a negative number
        flag = arg.split("=", 1)[0]
        if re.search(r"\s", flag):
            problems.append(f"{arg!r}: one argument per list item, e.g. ['--flag', 'value']")
            continue
        field = _FLAG_OWNER.get(flag)
        if field is None:
            continue
        if field.startswith("("):
            problems.append(f"{flag} cannot be set in extra_args {field}")
        else:
            problems.append(f"{flag} is owned by typed config: set {field} instead")
    return problems


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LlamaCppSource(_Model):
    git_url: str = Field(min_length=1)
    commit: Annotated[str, Field(pattern=r"^[0-9a-f]{40}$")]

    @property
    def short(self) -> str:
        return self.commit[:7]


class BuildConfig(_Model):
    cuda: bool = True
    # None: the compute capabilities of this host's GPUs (nvidia-smi), e.g. 8.9 -> 89.
    cuda_architectures: list[Annotated[int, Field(ge=50, le=200)]] | None = None
    # -DNAME=value, no whitespace (each is one argument to cmake)
    cmake_flags: list[Annotated[str, Field(pattern=r"^-D[A-Za-z0-9_]+(:[A-Z]+)?=\S*$")]] = []
    install_root: ManagedDir = "/opt/llama.cpp"
    ccache_dir: ManagedDir | None = None
    install_cuda_toolkit: bool = False
    jobs: Annotated[int, Field(ge=1)] | None = None


class ModelFile(_Model):
    role: Literal["target", "drafter"]
    file: Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]+\.gguf$")]
    url: Annotated[str, Field(pattern=r"^https?://\S+$")] | None = None
    local_path: str | None = None
    sha256: Sha256
    size: Annotated[int, Field(gt=0)] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> ModelFile:
        if (self.url is None) == (self.local_path is None):
            raise ValueError("give exactly one of url (download) or local_path (upload)")
        return self


class ServerSettings(_Model):
    """llama-server settings. The defaults are the seed 003 recipe: MTP pays off only at
    --parallel 1; --fit off because llama.cpp's fit does not count the drafter. The KV cache
    types are "auto": f16 where it fits the GPU at the wanted ctx (16-23 % faster decoding than
    q8_0 on an H200), else q8_0 (what fits 256k on 24 GB). These are the only defaults: host data
    (and a tuned profile, tuned/<host>.json) overrides them."""

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 8080
    # "auto": the largest multiple of 256 that fits the GPU budget (gemma4_fleet.vram_plan).
    ctx_size: Annotated[int, Field(ge=256)] | Literal["auto"] = 262144
    cache_type_k: KvChoice = "auto"
    cache_type_v: KvChoice = "auto"
    # "auto" follows the target's type (a gemma4 assistant reads the target's cache anyway).
    cache_type_k_draft: KvChoice = "auto"
    cache_type_v_draft: KvChoice = "auto"
    # KV types fastest first, as measured by `gemma4-fleet tune` (tuned/<host>.json); the order
    # cache_type "auto" tries. None: AUTO_KV_ORDER.
    kv_order: list[KvType] | None = Field(default=None, min_length=1)
    parallel: Annotated[int, Field(ge=1, le=64)] = 1
    spec_type: Literal["draft-mtp", "draft-simple", "none"] = "draft-mtp"
    draft_n_max: Annotated[int, Field(ge=1, le=64)] = 3
    draft_n_min: Annotated[int, Field(ge=0, le=64)] = 0
    draft_p_min: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    gpu_layers: Layers = "all"
    draft_gpu_layers: Layers = "all"
    flash_attn: Literal["on", "off", "auto"] = "on"
    fit: bool = False
    jinja: bool = True
    # None: the template in the target GGUF. A llama.cpp built-in name ("gemma") runs on the
    # legacy template engine (--no-jinja: under --jinja the name would be the template text).
    chat_template: str | None = None
    # A Jinja file on the controller, uploaded next to the unit (--chat-template-file).
    chat_template_file: str | None = None
    cont_batching: bool = True

    @field_validator("chat_template")
    @classmethod
    def _builtin_template(cls, name: str | None) -> str | None:
        if name is not None and name not in BUILTIN_CHAT_TEMPLATES:
            raise ValueError(
                "not a llama.cpp built-in template (have: "
                f"{', '.join(sorted(BUILTIN_CHAT_TEMPLATES))}); for a Jinja template use "
                "chat_template_file: <path on the controller>"
            )
        return name

    threads: Annotated[int, Field(ge=1)] | None = None
    extra_args: list[str] = []
    # Seed 003: MTP at --parallel > 1 is slower than MTP off. Refused unless this says otherwise.
    allow_parallel_mtp: bool = False
    # What the smoke check compares against (llama_smoke.regression): median tok/s and draft
    # acceptance over its prompts, as `gemma4-fleet tune` measured them (tuned/<host>.json).
    baseline_tps: Annotated[float, Field(gt=0)] | None = None
    baseline_acceptance: Annotated[float, Field(ge=0, le=1)] | None = None
    # A file on the controller holding the API key (one per line, # comments). It reaches the
    # server as a systemd credential; a non-loopback `host` needs it unless allowed otherwise.
    api_key_file: str | None = None
    allow_unauthenticated: bool = False


class Instance(ServerSettings):
    name: Name
    target: str
    drafter: str | None = None
    # A GPU index ("0") or UUID ("GPU-..."); rendered as the UUID, which survives reboots.
    gpu: GpuRef | None = None
    # The model id clients see in /v1/models and send as "model"; default: the target's name.
    alias: Alias | None = None

    @property
    def model_id(self) -> str:
        return self.alias or self.target

    @property
    def chat_template_path(self) -> str | None:
        """Where chat_template_file goes on the host (readable by the hardened unit)."""
        if self.chat_template_file is None:
            return None
        return f"{CHAT_TEMPLATE_DIR}/{self.name}.jinja"

    @property
    def unit(self) -> str:
        return server_unit(self.name)

    @property
    def local_url(self) -> str:
        """Where checks on the host itself reach the server (a wildcard bind via loopback)."""
        address = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{address}:{self.port}"

    @property
    def loopback(self) -> bool:
        """Whether only this host can reach the server (127.0.0.0/8, ::1, localhost)."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @property
    def smoke_unit(self) -> str:
        return smoke_unit(self.name)

    @property
    def smoke_timer(self) -> str:
        return smoke_unit(self.name, "timer")

    @field_validator("extra_args")
    @classmethod
    def _no_owned_flags(cls, value: list[str]) -> list[str]:
        problems = owned_flag_problems(value)
        if problems:
            raise ValueError("; ".join(problems))
        return value

    @model_validator(mode="after")
    def _recipe_rules(self) -> Instance:
        if self.spec_type != "none" and self.drafter is None:
            raise ValueError(f"spec_type {self.spec_type} needs a drafter model")
        if self.spec_type == "none" and self.drafter is not None:
            raise ValueError("a drafter is set but spec_type is none")
        if self.spec_type == "draft-mtp" and self.parallel > 1 and not self.allow_parallel_mtp:
            raise ValueError(
                f"parallel {self.parallel} with draft-mtp is slower than MTP off (seed 003); "
                "use parallel 1, or set allow_parallel_mtp: true to insist"
            )
        if self.chat_template is not None and self.chat_template_file is not None:
            raise ValueError("give chat_template (a built-in name) or chat_template_file, not both")
        if self.draft_n_min > self.draft_n_max:
            raise ValueError("draft_n_min is larger than draft_n_max")
        quantized_v = [
            t for t in (self.cache_type_v, self.cache_type_v_draft) if is_quantized_kv(t)
        ]
        if quantized_v and self.flash_attn == "off":
            raise ValueError(f"quantized V cache ({quantized_v[0]}) needs flash_attn on")
        return self


def is_quantized_kv(cache_type: str) -> bool:
    """Quantized K/V types (a quantized V cache needs flash attention)."""
    return cache_type.startswith(("q", "iq"))


class GpuService(_Model):
    """A GPU service this tool does not own (whisper, TTS): pinned to a GPU with a drop-in."""

    unit: Annotated[str, Field(pattern=r"^[A-Za-z0-9:_.@-]+\.service$")]
    gpu: GpuRef
    vram_reserve_mib: Annotated[int, Field(ge=0)] = 0
    # Sharing a GPU with llama-server eats its headroom (seed 003); only on explicit request.
    share_gpu_with_llama: bool = False


class SmokeConfig(_Model):
    """Thresholds and schedule of the throughput smoke check (after deploys and on a timer)."""

    enabled: bool = True
    min_tps: Annotated[float, Field(ge=0)] | None = None
    min_acceptance: Annotated[float, Field(ge=0, le=1)] | None = None
    # A run below this fraction of the instance's tuned baseline (tok/s or acceptance) fails.
    regression: Annotated[float, Field(gt=0, le=1)] | None = 0.8
    n_predict: Annotated[int, Field(ge=8, le=4096)] = 128
    on_calendar: Annotated[str, Field(pattern=r"^[A-Za-z0-9 :*,./~-]+$")] = "hourly"
    randomized_delay_sec: Annotated[int, Field(ge=0)] = 600


class DrainConfig(_Model):
    """How long a restart or stop waits for requests in flight (then it goes ahead anyway)."""

    timeout_s: Annotated[int, Field(ge=0, le=86400)] = 300


class HostConfig(_Model):
    llamacpp: LlamaCppSource
    build: BuildConfig = BuildConfig()
    models: dict[str, ModelFile] = {}
    instances: list[Instance] = Field(min_length=1)
    models_dir: ManagedDir = "/var/lib/llama-models"
    service_user: Annotated[
        str, Field(pattern=r"^[a-z_][a-z0-9_-]{0,30}$"), AfterValidator(service_account)
    ] = "llama"
    gpu_services: list[GpuService] = []
    gpu_memory_mib: dict[GpuRef, Annotated[int, Field(gt=0)]] = {}
    vram_headroom_mib: Annotated[int, Field(ge=0)] = 512
    smoke: SmokeConfig = SmokeConfig()
    drain: DrainConfig = DrainConfig()
    # This host compiles its build id for the fleet (the others get the artifact); at most one
    # host per build id. Default: the first host of that id in the inventory.
    builder: StrictBool = False

    def cross_field_problems(self) -> list[tuple[str, str]]:
        """(host-data field, problem) for rules that span fields: references, clashes."""
        problems, names, ports = [], set(), set()
        for inst in self.instances:
            field = f"llama_instances[{inst.name}]"
            if inst.name in names:
                problems.append((f"{field}.name", f"instance name {inst.name!r} is used twice"))
            if inst.port in ports:
                problems.append((f"{field}.port", f"port {inst.port} is used twice"))
            names.add(inst.name)
            ports.add(inst.port)
            for role, ref in (("target", inst.target), ("drafter", inst.drafter)):
                model = self.models.get(ref) if ref else None
                if ref and model is None:
                    problems.append((f"{field}.{role}", f"{ref!r} is not in llama_models"))
                elif model is not None and model.role != role:
                    problems.append(
                        (f"{field}.{role}", f"{ref!r} has role {model.role}, used as {role}")
                    )
            problems += _key_problems(inst, field)
            if inst.gpu is not None and not self.build.cuda:
                problems.append(
                    (f"{field}.gpu", f"gpu {inst.gpu} set but llamacpp_build.cuda is off")
                )
        dirs = {
            "llama_models_dir": self.models_dir,
            "llamacpp_build.install_root": self.build.install_root,
            "llamacpp_build.ccache_dir": self.build.ccache_dir,
        }
        named = [(key, path) for key, path in dirs.items() if path is not None]
        for i, (key, path) in enumerate(named):
            for other, other_path in named[:i]:
                if path == other_path:
                    problems.append((key, f"{path} is also {other}; each needs its own directory"))
                elif path.startswith(f"{other_path}/"):
                    why = f"{path} is inside {other} ({other_path}); each needs its own directory"
                    problems.append((key, why))
                elif other_path.startswith(f"{path}/"):
                    why = f"{path} contains {other} ({other_path}); each needs its own directory"
                    problems.append((key, why))
        llama_gpus = {inst.gpu for inst in self.instances if inst.gpu is not None}
        units: set[str] = set()
        for svc in self.gpu_services:
            field = f"gpu_services[{svc.unit}]"
            if svc.unit in units or svc.unit in {inst.unit for inst in self.instances}:
                problems.append((field, "listed twice, or it is a llama-server unit"))
            units.add(svc.unit)
            if svc.gpu in llama_gpus and not svc.share_gpu_with_llama:
                why = (
                    f"GPU {svc.gpu} is one llama-server uses; move {svc.unit} to another GPU or"
                    " set share_gpu_with_llama: true (its vram_reserve_mib then counts in that"
                    " GPU's budget)"
                )
                problems.append((f"{field}.gpu", why))
        return problems

    def model_path(self, name: str) -> str:
        """Models live under their checksum: a new version never overwrites the file a running
        (or last-known-good) unit uses, and a changed path restarts the unit."""
        model = self.models[name]
        return f"{self.models_dir}/{model.sha256[:16]}/{model.file}"

    def used_models(self) -> dict[str, ModelFile]:
        used = {ref for inst in self.instances for ref in (inst.target, inst.drafter) if ref}
        return {name: model for name, model in self.models.items() if name in used}

    def placed_models(self) -> dict[str, ModelFile]:
        """Each file the instances use, by its path on the host (a target used as its own
        drafter is one file)."""
        return {self.model_path(name): model for name, model in self.used_models().items()}

    @property
    def build_id(self) -> str:
        """Commit + the options that change the binary: a new id means a new install directory."""
        options = json.dumps(
            [self.build.cuda, self.build.cuda_architectures, self.build.cmake_flags],
            sort_keys=True,
        )
        return f"{self.llamacpp.commit[:12]}-{hashlib.sha256(options.encode()).hexdigest()[:8]}"

    @property
    def build_dir(self) -> str:
        return f"{self.build.install_root}/builds/{self.build_id}"

    @property
    def server_binary(self) -> str:
        return f"{self.build_dir}/bin/llama-server"


def api_key_lines(text: str) -> list[str]:
    """The keys in an API key file: non-empty lines that are not # comments (as llama-server)."""
    return [line.strip() for line in text.splitlines() if line.strip() and line[0] != "#"]


def _key_problems(inst: Instance, field: str) -> list[tuple[str, str]]:
    """An API key file must hold a key; a server others can reach must have one (or say so)."""
    if inst.api_key_file is None:
        if inst.loopback or inst.allow_unauthenticated:
            return []
        return [
            (
                f"{field}.host",
                f"{inst.host} is reachable from other machines and no api_key_file is set; set "
                "api_key_file, bind to 127.0.0.1, or set allow_unauthenticated: true",
            )
        ]
    try:
        text = Path(inst.api_key_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        return [(f"{field}.api_key_file", f"cannot read {inst.api_key_file}: {why}")]
    keys = api_key_lines(text)
    if not keys:
        return [(f"{field}.api_key_file", f"{inst.api_key_file} holds no key")]
    if any(any(c.isspace() or not c.isprintable() for c in key) for key in keys):
        # The key itself is never echoed: errors end up in logs.
        return [(f"{field}.api_key_file", f"a key in {inst.api_key_file} has blanks or controls")]
    return []


def _field_path(loc: tuple[int | str, ...], raw: Mapping[str, Any]) -> str:
    """Turn a pydantic error location into the host-data key a user edits."""
    if not loc:
        return "(host data)"
    head, *rest = loc
    path = HOST_DATA_KEYS.get(str(head), str(head))
    if head == "instances" and rest and isinstance(rest[0], int):
        index = int(rest.pop(0))
        instances = raw.get("instances", [])
        label = instances[index].get("name") if index < len(instances) else None
        path += f"[{label or index}]"
    for part in rest:
        if part in ("function-after", "int", "literal['all','auto']", "[key]") or str(
            part
        ).startswith(("literal[", "function-")):
            continue
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


KNOWN_KEYS = ("llama_server", *HOST_DATA_KEYS.values())
_OUR_PREFIXES = ("llama", "gpu_", "vram_")


def host_data_of(data_get: Callable[[str], Any]) -> dict[str, Any]:
    """Every host-data key `parse_host_config` reads, from a getter such as `host.data.get`."""
    return {key: data_get(key) for key in KNOWN_KEYS}


def unknown_key_problems(keys: Iterable[str]) -> list[tuple[str, str]]:
    """Host-data keys that look like ours but are not (a typo would be silently ignored).

    Host data also carries pyinfra's and the user's own keys: only keys close to one of ours
    (difflib) or with our prefixes are reported.
    """
    problems = []
    for key in sorted(set(keys) - set(KNOWN_KEYS)):
        near = difflib.get_close_matches(key, KNOWN_KEYS, n=1, cutoff=0.75)
        if near:
            problems.append((key, f"not a gemma4-fleet key; did you mean {near[0]}?"))
        elif key.startswith(_OUR_PREFIXES):
            problems.append((key, f"not a gemma4-fleet key (known: {', '.join(KNOWN_KEYS)})"))
    return problems


def stand_in_checksums(
    host_name: str, data: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, str]]:
    """For planning only: host data whose sha256 values that are not filled in yet (the
    example inventory's `FILL-IN: ...`) get a stand-in, and {stand-in: warning} for each.

    The deploy never calls this: it refuses such hosts.
    """
    models = data.get("llama_models")
    if not isinstance(models, Mapping):
        return dict(data), {}
    patched: dict[str, Any] = {}
    warnings: dict[str, str] = {}
    for name, model in models.items():
        sha = model.get("sha256") if isinstance(model, Mapping) else None
        if not isinstance(sha, str) or re.fullmatch(r"[0-9a-f]{64}", sha):
            patched[name] = model
            continue
        source = model.get("url") or model.get("local_path")
        stand_in = hashlib.sha256(f"g4f-placeholder\0{name}\0{source}".encode()).hexdigest()
        patched[name] = {**model, "sha256": stand_in}
        warnings[stand_in] = (
            f"host {host_name}: llama_models.{name}.sha256: not a sha256 yet (got {sha!r}); "
            f"planned from the file's header, but the deploy refuses this host until it is "
            f"filled in (sha256sum {model.get('file', name)})"
        )
    return {**data, "llama_models": patched}, warnings


def parse_host_config(host_name: str, data: Mapping[str, Any]) -> HostConfig:
    """Validate one host's data; errors name the host and each bad field.

    `data` may be all of the host's data (`host.data.dict()`): keys that look like a typo of
    ours are errors, other keys (pyinfra's, the user's) are ignored.
    """
    typos = [f"host {host_name}: {key}: {why}" for key, why in unknown_key_problems(data)]
    server = data.get("llama_server") or {}
    raw_instances = data.get("llama_instances") or []
    if not isinstance(server, Mapping) or not isinstance(raw_instances, list):
        raise ConfigError(
            "\n".join(
                [
                    *typos,
                    f"host {host_name}: llama_server must be a dict and llama_instances a list",
                ]
            )
        )
    raw: dict[str, Any] = {
        "instances": [
            {**server, **inst} if isinstance(inst, Mapping) else inst for inst in raw_instances
        ],
    }
    for field, key in HOST_DATA_KEYS.items():
        if field != "instances" and data.get(key) is not None:
            raw[field] = data[key]
    try:
        config = HostConfig.model_validate(raw)
    except ValidationError as exc:
        lines = [
            f"host {host_name}: {_field_path(tuple(err['loc']), raw)}: {err['msg']}"
            + (f" (got {err['input']!r})" if not isinstance(err["input"], dict | list) else "")
            for err in exc.errors()
        ]
        raise ConfigError("\n".join(typos + lines)) from None
    lines = [f"host {host_name}: {field}: {why}" for field, why in config.cross_field_problems()]
    if typos or lines:
        raise ConfigError("\n".join(typos + lines))
    return config
