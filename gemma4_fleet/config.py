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
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
KvType = Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"]
Layers = int | Literal["all", "auto"]
Name = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{0,40}$")]
AbsPath = Annotated[str, Field(pattern=r"^/[^\x00\n]*$")]
# A path that becomes the executable of an ExecStart=: systemd refuses quotes, \ and control
# characters in it (string_is_safe).
ExecutableRoot = Annotated[str, Field(pattern=r"^/[^\x00-\x1f\x7f\"'\\]*$")]

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
}


def server_unit(instance_name: str) -> str:
    """The llama-server unit of an instance ("*" gives the glob of them all)."""
    return f"llama-server-{instance_name}.service"


def smoke_unit(instance_name: str, suffix: str = "service") -> str:
    """The smoke-check service (or, with suffix "timer", its timer) of an instance."""
    return f"llama-smoke-{instance_name}.{suffix}"


class ConfigError(ValueError):
    """Bad host data: the message names the host and the field."""


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
    install_root: ExecutableRoot = "/opt/llama.cpp"
    ccache_dir: AbsPath | None = None
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
    --parallel 1; --fit off because llama.cpp's fit does not count the drafter; q8_0 K/V costs
    nothing in speed and keeps long-context fidelity. These are the only defaults: host data
    overrides them."""

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 8080
    # "auto": the largest multiple of 256 that fits the GPU budget (gemma4_fleet.vram_plan).
    ctx_size: Annotated[int, Field(ge=256)] | Literal["auto"] = 262144
    cache_type_k: KvType = "q8_0"
    cache_type_v: KvType = "q8_0"
    cache_type_k_draft: KvType = "q8_0"
    cache_type_v_draft: KvType = "q8_0"
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
    cont_batching: bool = True
    threads: Annotated[int, Field(ge=1)] | None = None
    extra_args: list[str] = []
    # Seed 003: MTP at --parallel > 1 is slower than MTP off. Refused unless this says otherwise.
    allow_parallel_mtp: bool = False


class Instance(ServerSettings):
    name: Name
    target: str
    drafter: str | None = None
    # A GPU index ("0") or UUID ("GPU-..."); rendered as the UUID, which survives reboots.
    gpu: str | None = None

    @property
    def unit(self) -> str:
        return server_unit(self.name)

    @property
    def local_url(self) -> str:
        """Where checks on the host itself reach the server (a wildcard bind via loopback)."""
        address = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{address}:{self.port}"

    @property
    def smoke_unit(self) -> str:
        return smoke_unit(self.name)

    @property
    def smoke_timer(self) -> str:
        return smoke_unit(self.name, "timer")

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
        if self.draft_n_min > self.draft_n_max:
            raise ValueError("draft_n_min is larger than draft_n_max")
        quantized_v = [
            t for t in (self.cache_type_v, self.cache_type_v_draft) if t.startswith(("q", "iq"))
        ]
        if quantized_v and self.flash_attn == "off":
            raise ValueError(f"quantized V cache ({quantized_v[0]}) needs flash_attn on")
        return self


class GpuService(_Model):
    """A GPU service this tool does not own (whisper, TTS): pinned to a GPU with a drop-in."""

    unit: Annotated[str, Field(pattern=r"^[A-Za-z0-9:_.@-]+\.service$")]
    gpu: str
    vram_reserve_mib: Annotated[int, Field(ge=0)] = 0
    # Sharing a GPU with llama-server eats its headroom (seed 003); only on explicit request.
    share_gpu_with_llama: bool = False


class SmokeConfig(_Model):
    """Thresholds and schedule of the throughput smoke check (after deploys and on a timer)."""

    enabled: bool = True
    min_tps: Annotated[float, Field(ge=0)] | None = None
    min_acceptance: Annotated[float, Field(ge=0, le=1)] | None = None
    n_predict: Annotated[int, Field(ge=8, le=4096)] = 128
    on_calendar: Annotated[str, Field(pattern=r"^[A-Za-z0-9 :*,./~-]+$")] = "hourly"
    randomized_delay_sec: Annotated[int, Field(ge=0)] = 600


class HostConfig(_Model):
    llamacpp: LlamaCppSource
    build: BuildConfig = BuildConfig()
    models: dict[str, ModelFile] = {}
    instances: list[Instance] = Field(min_length=1)
    models_dir: AbsPath = "/var/lib/llama-models"
    service_user: Annotated[str, Field(pattern=r"^[a-z_][a-z0-9_-]{0,30}$")] = "llama"
    gpu_services: list[GpuService] = []
    gpu_memory_mib: dict[str, Annotated[int, Field(gt=0)]] = {}
    vram_headroom_mib: Annotated[int, Field(ge=0)] = 512
    smoke: SmokeConfig = SmokeConfig()

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
            if inst.gpu is not None and not self.build.cuda:
                problems.append(
                    (f"{field}.gpu", f"gpu {inst.gpu} set but llamacpp_build.cuda is off")
                )
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
        if part in ("function-after", "int", "literal['all','auto']") or str(part).startswith(
            ("literal[", "function-")
        ):
            continue
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def host_data_of(data_get: Callable[[str], Any]) -> dict[str, Any]:
    """Every host-data key `parse_host_config` reads, from a getter such as `host.data.get`."""
    return {key: data_get(key) for key in ("llama_server", *HOST_DATA_KEYS.values())}


def parse_host_config(host_name: str, data: Mapping[str, Any]) -> HostConfig:
    """Validate one host's data; errors name the host and each bad field."""
    server = data.get("llama_server") or {}
    raw_instances = data.get("llama_instances") or []
    if not isinstance(server, Mapping) or not isinstance(raw_instances, list):
        raise ConfigError(
            f"host {host_name}: llama_server must be a dict and llama_instances a list"
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
        raise ConfigError("\n".join(lines)) from None
    problems = config.cross_field_problems()
    if problems:
        lines = [f"host {host_name}: {field}: {problem}" for field, problem in problems]
        raise ConfigError("\n".join(lines))
    return config
