"""VRAM plan per host and GPU from GGUF metadata, computed before any host is touched.

For every llama-server instance of a host: the drafter pairing check, then, on its GPU,

    weights (target + drafter, honouring gpu_layers / draft_gpu_layers) + KV cache
    + compute buffers + CUDA context overhead + other tenants + headroom  <=  budget

where the budget is ``gpu_memory_mib`` from host data (it wins when given) or the GPU's
``memory.total`` from nvidia-smi (the ``NvidiaGpus`` fact), other tenants are the
``vram_reserve_mib`` of ``gpu_services`` on that GPU plus the other llama-server instances there
(each with its own CUDA context), and headroom is ``vram_headroom_mib``.  ``ctx_size: auto``
picks the largest multiple of 256 tokens per slot that fits, capped at the target's
n_ctx_train; a fixed ``ctx_size`` is checked.  Terms come from :mod:`gemma4_fleet.memory_model` (KV
exact, compute derived from llama.cpp's reserve graph, CUDA overhead calibrated); the target and
the drafter each get their own cache types (``-ctkd/-ctvd`` for the drafter), the same n_ctx and
slots; a gemma4-assistant drafter's compute buffer follows the target's KV cache, which it reads,
and a drafter adds the overhead of a second CUDA context.

Rules worth knowing:

* ``gpu_layers`` / ``draft_gpu_layers`` ``auto`` are planned as ``all`` (the upper bound);
* at most one ``auto`` instance per GPU (two would have to split the leftover arbitrarily);
* an instance without a GPU runs on the CPU (the unit hides every GPU from it): a fixed ctx is
  only checked against n_ctx_train, and ``auto`` means ``min(n_ctx_train, CPU_AUTO_CTX)`` tokens
  per slot (there is no VRAM to fill, and host RAM is not planned here);
* nvidia-smi's ``memory.used`` is ignored: on a redeploy it counts the running servers;
* ``cache_type_k/v: auto`` (the default) takes the fastest KV type that fits the GPU at the
  wanted ctx: the instance's ``kv_order`` (measured by ``gemma4-fleet tune``) or
  ``AUTO_KV_ORDER`` (f16, then q8_0); when none fits, the last one is planned and refused with
  the breakdown. Instances sharing a GPU choose in host-data order, each assuming the later ones
  take their smallest type. With ``ctx_size: auto`` the fastest type is taken and ctx sized with
  it. On the CPU (KV in host RAM, not planned) it is the first type of the order. Draft cache
  types ``auto`` follow the target's.

Every error is a :class:`~gemma4_fleet.config.ConfigError` whose lines read
``host <name>: <host-data field>: <what>``; a refused fit carries the full breakdown in MiB.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from gemma4_fleet.chat_template import ChatTemplateUse, chat_template_use
from gemma4_fleet.common import cache_dir
from gemma4_fleet.config import (
    AUTO_KV_ORDER,
    ConfigError,
    GpuService,
    HostConfig,
    Instance,
    ModelFile,
    is_quantized_kv,
)
from gemma4_fleet.facts import Gpu
from gemma4_fleet.gguf_meta import ModelMeta, ModelMetaError, read_meta, read_meta_url
from gemma4_fleet.memory_model import (
    CTX_PAD,
    MIB,
    CacheOptions,
    GpuLayers,
    GpuUsage,
    PairingError,
    PlanError,
    check_pairing,
    gpu_usage,
    kv_cache_bytes,
    kv_cells,
)

# Tokens per slot that ctx_size "auto" gets on an instance without a GPU (see the module doc).
CPU_AUTO_CTX = 8192

MetaFor = Callable[[ModelFile], ModelMeta]


class PlanConfigError(ConfigError):
    """One or more planning errors; each line starts `host <name>: <field>:`."""

    def __init__(self, errors: Sequence[str]) -> None:
        self.errors = tuple(errors)
        super().__init__("\n".join(self.errors))


@dataclass(frozen=True)
class Tenant:
    """Something else holding memory on the same GPU: a gpu_services unit or another instance."""

    name: str  # the systemd unit
    bytes: int
    kind: Literal["service", "instance"] = "service"


@dataclass(frozen=True)
class InstancePlan:
    """One llama-server instance: its chosen ctx and, on a GPU, the memory terms in bytes.

    On the CPU (``gpu`` None) ``weights`` and ``kv`` are host memory and there is no budget.
    """

    instance: str
    gpu: str | None  # as configured: an index or a UUID; None = CPU
    ctx_size: int | Literal["auto"]  # as configured
    ctx: int  # what goes into --ctx-size
    weights: int
    kv: int
    compute: int = 0
    overhead: int = 0
    tenants: tuple[Tenant, ...] = ()
    headroom: int = 0
    budget: int | None = None
    budget_source: str | None = None  # "gpu_memory_mib.<key>" or "nvidia-smi"
    gpu_index: int | None = None  # from nvidia-smi
    gpu_uuid: str | None = None
    gpu_name: str | None = None
    model_id: str | None = None  # what /v1/models lists (--alias)
    chat: ChatTemplateUse | None = None  # the template /v1/chat/completions will use
    # KV cache types as planned (auto resolved): target K, V, drafter K, V; and why.
    cache_types: tuple[str, str, str, str] = ("f16", "f16", "f16", "f16")
    kv_reason: str = ""

    @property
    def kv_label(self) -> str:
        """The target's KV type as the table shows it ("q8_0", or "q8_0/f16" for K/V)."""
        k, v = self.cache_types[:2]
        return k if k == v else f"{k}/{v}"

    @property
    def gpu_label(self) -> str:
        """The GPU as the table shows it: its index when nvidia-smi told, else as configured."""
        if self.gpu is None:
            return "cpu"
        return str(self.gpu_index) if self.gpu_index is not None else self.gpu

    @property
    def tenants_bytes(self) -> int:
        return sum(t.bytes for t in self.tenants)

    @property
    def used(self) -> int:
        """Everything on the GPU, headroom included."""
        parts = (self.weights, self.kv, self.compute, self.overhead, self.headroom)
        return sum(parts) + self.tenants_bytes

    @property
    def free(self) -> int | None:
        return None if self.budget is None else self.budget - self.used

    @property
    def fits(self) -> bool:
        return self.free is None or self.free >= 0

    def breakdown(self) -> str:
        tenants = f"other tenants {_mib(self.tenants_bytes)}"
        if self.tenants:
            tenants += " (" + ", ".join(f"{t.name} {_mib(t.bytes)}" for t in self.tenants) + ")"
        return (
            f"ctx {self.ctx}: weights {_mib(self.weights)} + KV {_mib(self.kv)} + compute "
            f"{_mib(self.compute)} + CUDA overhead {_mib(self.overhead)} + {tenants} + headroom "
            f"{_mib(self.headroom)} = {_mib(self.used)}, budget {_mib(self.budget or 0)} "
            f"({self.budget_source})"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "instance": self.instance,
            "gpu": self.gpu,
            "gpu_index": self.gpu_index,
            "gpu_uuid": self.gpu_uuid,
            "gpu_name": self.gpu_name,
            "budget_source": self.budget_source,
            "ctx_size": self.ctx_size,
            "ctx": self.ctx,
            "cache_type_k": self.cache_types[0],
            "cache_type_v": self.cache_types[1],
            "cache_type_k_draft": self.cache_types[2],
            "cache_type_v_draft": self.cache_types[3],
            "kv_reason": self.kv_reason,
            "fits": self.fits,
            "bytes": {
                "budget": self.budget,
                "weights": self.weights,
                "kv": self.kv,
                "compute": self.compute,
                "overhead": self.overhead,
                "tenants": self.tenants_bytes,
                "headroom": self.headroom,
                "free": self.free,
            },
            "tenants": [{"name": t.name, "kind": t.kind, "bytes": t.bytes} for t in self.tenants],
            "model_id": self.model_id,
            "chat_template": self.chat.to_json() if self.chat else None,
        }


@dataclass(frozen=True)
class HostPlan:
    """The plan of one host: one row per instance, GPU instances grouped by GPU, CPU ones last."""

    host: str
    instances: tuple[InstancePlan, ...]
    _by_name: dict[str, InstancePlan] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {row.instance: row for row in self.instances})

    def _row(self, instance_name: str) -> InstancePlan:
        try:
            return self.instance_plan(instance_name)
        except KeyError:
            raise ConfigError(
                f"host {self.host}: no planned instance named {instance_name!r} "
                f"(have: {', '.join(self._by_name)})"
            ) from None

    def ctx_for(self, instance_name: str) -> int:
        """The --ctx-size of an instance (the configured one, or what "auto" chose)."""
        return self._row(instance_name).ctx

    def instance_plan(self, instance_name: str) -> InstancePlan:
        return self._by_name[instance_name]

    def settle(self, inst: Instance) -> Instance:
        """The instance as it will run: planned ctx and KV cache types instead of "auto"."""
        row = self._row(inst.name)
        k, v, kd, vd = row.cache_types
        return inst.model_copy(
            update={
                "ctx_size": row.ctx,
                "cache_type_k": k,
                "cache_type_v": v,
                "cache_type_k_draft": kd,
                "cache_type_v_draft": vd,
            }
        )

    @property
    def fits(self) -> bool:
        return all(row.fits for row in self.instances)

    @property
    def warnings(self) -> list[str]:
        """Things that deploy but will not work as users expect (a chat template missing)."""
        return [
            f"host {self.host}: llama_instances[{r.instance}].chat_template: {r.chat.warning}"
            for r in self.instances
            if r.chat is not None and r.chat.warning
        ]

    def to_json(self) -> dict[str, Any]:
        return {
            "fits": self.fits,
            "instances": [row.to_json() for row in self.instances],
            "warnings": self.warnings,
        }

    def table(self) -> str:
        """A compact table in MiB, then one line per GPU: what it is, budget source, tenants."""
        head: tuple[str, ...] = ("instance", "GPU", "budget", "weights", "KV", "compute")
        head += ("overhead", "tenants", "headroom", "free", "ctx", "cache", "fits")
        rows: list[tuple[str, ...]] = [head]
        notes: dict[str, str] = {}
        for r in self.instances:
            gpu = r.gpu is not None
            ctx = f"{r.ctx} auto" if r.ctx_size == "auto" else str(r.ctx)
            rows.append(
                (
                    r.instance,
                    r.gpu_label,
                    _num(r.budget),
                    _num(r.weights),
                    _num(r.kv),
                    _num(r.compute if gpu else None),
                    _num(r.overhead if gpu else None),
                    _num(r.tenants_bytes if gpu else None),
                    _num(r.headroom if gpu else None),
                    _num(r.free),
                    ctx,
                    r.kv_label,
                    ("yes" if r.fits else "NO") if gpu else "-",
                )
            )
            if r.gpu is not None and r.gpu_label not in notes:
                what = ", ".join(x for x in (r.gpu_name, r.gpu_uuid) if x and x != r.gpu_label)
                note = f"GPU {r.gpu_label}{f' ({what})' if what else ''}: budget from "
                note += str(r.budget_source)
                services = [t for t in r.tenants if t.kind == "service"]
                if services:
                    note += "; reserved: " + ", ".join(
                        f"{t.name} {_num(t.bytes)}" for t in services
                    )
                notes[r.gpu_label] = note
        for r in self.instances:
            if r.chat is not None:
                notes[f"chat {r.instance}"] = (
                    f"{r.instance}: model id {r.model_id!r}; chat template: {r.chat.describe()}"
                )
        if any(r.gpu is None for r in self.instances):
            notes["cpu"] = f"cpu: weights and KV in host RAM; auto ctx = {CPU_AUTO_CTX} per slot"
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        lines = [f"host {self.host} (MiB)"]
        for row in rows:
            cells = [
                cell.ljust(width) if i in (0, 1, 11, 12) else cell.rjust(width)
                for i, (cell, width) in enumerate(zip(row, widths, strict=True))
            ]
            lines.append("  " + "  ".join(cells).rstrip())
        lines += [f"  {note}" for note in notes.values()]
        lines += [f"  KV {r.instance}: {r.kv_label}: {r.kv_reason}" for r in self.instances]
        return "\n".join(lines)


def _mib(n: int) -> str:
    return f"{n / MIB:.2f} MiB"


def _num(n: int | None) -> str:
    return "-" if n is None else str(round(n / MIB))


# --- metadata ---------------------------------------------------------------------------------


def meta_for_model(model: ModelFile, *, cache: bool = True) -> ModelMeta:
    """Header metadata of a model: the local file, or by range requests (cached by sha256, URL
    and size, see gguf_meta.read_meta_url; unless `cache` is off: a stand-in for a checksum not
    filled in yet)."""
    if model.local_path is not None:
        path = Path(model.local_path)
        if model.size is not None and path.is_file() and path.stat().st_size != model.size:
            raise ModelMetaError(f"{path}: has {path.stat().st_size} bytes, size says {model.size}")
        return read_meta(path)
    if model.url is None:  # ModelFile guarantees one of the two
        raise ModelMetaError("the model has neither url nor local_path")
    return read_meta_url(
        model.url,
        sha256=model.sha256 if cache else None,
        size=model.size,
        cache_dir=cache_dir() / "gguf-meta",
    )


def memoized(meta_for: MetaFor) -> MetaFor:
    """meta_for reading each model once per fleet (errors included: a dead URL times out once)."""
    seen: dict[tuple[str | None, str | None, str, int | None], ModelMeta | ModelMetaError] = {}

    def cached(model: ModelFile) -> ModelMeta:
        key = (model.url, model.local_path, model.sha256, model.size)
        if key not in seen:
            try:
                seen[key] = meta_for(model)
            except ModelMetaError as exc:
                seen[key] = exc
        found = seen[key]
        if isinstance(found, ModelMetaError):
            raise found
        return found

    return cached


# --- planning ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Models:
    target: ModelMeta
    drafter: ModelMeta | None


_KV_FIELDS = ("cache_type_k", "cache_type_v", "cache_type_k_draft", "cache_type_v_draft")


def kv_is_chosen(inst: Instance) -> bool:
    """Whether the planner picks the target's KV type (cache_type_k or _v is "auto")."""
    return "auto" in (inst.cache_type_k, inst.cache_type_v)


def kv_candidates(inst: Instance) -> list[str]:
    """The KV types "auto" tries, fastest first (a quantized V cache needs flash attention)."""
    order: list[str] = list(inst.kv_order or AUTO_KV_ORDER)
    if inst.flash_attn == "off":
        order = [t for t in order if not is_quantized_kv(t)] or ["f16"]
    return order


def with_kv(inst: Instance, kv: str) -> Instance:
    """The instance with its "auto" target types set to ``kv``; "auto" draft types follow the
    target's."""
    k = kv if inst.cache_type_k == "auto" else inst.cache_type_k
    v = kv if inst.cache_type_v == "auto" else inst.cache_type_v
    kd = k if inst.cache_type_k_draft == "auto" else inst.cache_type_k_draft
    vd = v if inst.cache_type_v_draft == "auto" else inst.cache_type_v_draft
    return inst.model_copy(update=dict(zip(_KV_FIELDS, (k, v, kd, vd), strict=True)))


def _cache_types(inst: Instance) -> tuple[str, str, str, str]:
    return (inst.cache_type_k, inst.cache_type_v, inst.cache_type_k_draft, inst.cache_type_v_draft)


def _order_text(inst: Instance) -> str:
    source = "measured order, tuned profile" if inst.kv_order else "default order"
    return f"{' > '.join(kv_candidates(inst))}, {source}"


def _planned_layers(value: int | str) -> GpuLayers:
    return value if isinstance(value, int) else "all"  # "auto" planned as "all"


def _cache_options(inst: Instance) -> tuple[CacheOptions, CacheOptions]:
    """(target, drafter) cache options: explicit --parallel slots, never unified."""
    flash = inst.flash_attn != "off"
    return (
        CacheOptions(inst.parallel, False, inst.cache_type_k, inst.cache_type_v, flash),
        CacheOptions(inst.parallel, False, inst.cache_type_k_draft, inst.cache_type_v_draft, flash),
    )


def _usage(inst: Instance, models: _Models, n_ctx: int) -> GpuUsage:
    """GPU bytes of target + drafter at n_ctx (each model with its own cache types and layers)."""
    target_cache, draft_cache = _cache_options(inst)
    return gpu_usage(
        models.target,
        n_ctx=n_ctx,
        cache=target_cache,
        gpu_layers=_planned_layers(inst.gpu_layers),
        drafter=models.drafter,
        drafter_gpu_layers=_planned_layers(inst.draft_gpu_layers),
        draft_cache=draft_cache,
    )


def largest_ctx(step: int, n_ctx_train: int, fits: Callable[[int], bool]) -> int | None:
    """The largest multiple of `step` with at most n_ctx_train tokens per slot (a slot is
    step / CTX_PAD * 256 tokens) for which `fits`, by bisection; None if not even `step` fits."""
    lo, hi = 1, n_ctx_train // CTX_PAD
    if hi < 1 or not fits(step):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid * step):
            lo = mid
        else:
            hi = mid - 1
    return lo * step


def _largest_fit(inst: Instance, models: _Models, available: int) -> GpuUsage | None:
    """The largest ctx (a multiple of 256 per slot, at most n_ctx_train per slot) whose usage
    is within `available` bytes; None when not even 256 per slot fits."""
    best = largest_ctx(
        CTX_PAD * inst.parallel,
        models.target.context_length,
        lambda n_ctx: _usage(inst, models, n_ctx).total <= available,
    )
    return None if best is None else _usage(inst, models, best)


class _Host:
    """Planning state of one host: errors are collected, not raised one by one."""

    def __init__(self, name: str, config: HostConfig, gpus: Mapping[str, Gpu]) -> None:
        self.name = name
        self.config = config
        self.gpus = gpus  # configured GPU reference -> the host's GPU, where nvidia-smi told
        self.errors: list[str] = []
        self.kv_reasons: dict[str, str] = {}

    def error(self, field_path: str, message: str) -> None:
        self.errors.append(f"host {self.name}: {field_path}: {message}")

    def gpu_key(self, ref: str) -> str:
        """One key per physical GPU when nvidia-smi is known ("0" and its UUID are the same)."""
        gpu = self.gpus.get(ref)
        return gpu.uuid if gpu is not None else ref

    def model_metas(self, meta_for: MetaFor) -> dict[str, ModelMeta]:
        metas = {}
        for name, model in self.config.used_models().items():
            source = "url" if model.local_path is None else "local_path"
            try:
                metas[name] = meta_for(model)
            except ModelMetaError as exc:
                self.error(f"llama_models.{name}.{source}", str(exc))
        return metas

    def with_chat(self, row: InstancePlan, models: _Models) -> InstancePlan:
        """The row with the model id and chat template its server will use."""
        inst = next(i for i in self.config.instances if i.name == row.instance)
        chat: ChatTemplateUse | None = None
        try:
            chat = chat_template_use(inst, models.target)
        except ValueError as exc:
            self.error(f"llama_instances[{inst.name}].chat_template_file", str(exc))
        return replace(row, model_id=inst.model_id, chat=chat)

    def check_pairing(self, inst: Instance, models: _Models) -> None:
        if models.drafter is None or inst.drafter is None:
            return
        try:
            check_pairing(models.target, models.drafter, inst.spec_type)
        except PairingError as exc:
            self.error(
                f"llama_instances[{inst.name}].drafter",
                f"{inst.drafter} cannot draft for {inst.target}: {exc}",
            )

    def check_train_ctx(self, inst: Instance, models: _Models) -> bool:
        if inst.ctx_size == "auto":
            if models.target.context_length < CTX_PAD:
                self.error(
                    f"llama_instances[{inst.name}].ctx_size",
                    f"auto: n_ctx_train {models.target.context_length} of {inst.target} is "
                    f"below {CTX_PAD}",
                )
                return False
            return True
        per_slot = kv_cells(inst.ctx_size, parallel=inst.parallel, unified=False)[1]
        if per_slot > models.target.context_length:
            self.error(
                f"llama_instances[{inst.name}].ctx_size",
                f"ctx {inst.ctx_size} gives {per_slot} tokens per slot (parallel "
                f"{inst.parallel}), above n_ctx_train {models.target.context_length} of "
                f"{inst.target} ({models.target.name})",
            )
            return False
        return True

    def cpu_row(self, inst: Instance, models: _Models) -> InstancePlan:
        if kv_is_chosen(inst):
            first = kv_candidates(inst)[0]
            reason = f"auto: the first of {_order_text(inst)} (CPU: KV in host RAM, not planned)"
        else:
            first, reason = "f16", "set in host data"
        inst = with_kv(inst, first)
        if inst.ctx_size == "auto":
            per_slot = min(models.target.context_length, CPU_AUTO_CTX) // CTX_PAD * CTX_PAD
            ctx = per_slot * inst.parallel
        else:
            ctx = inst.ctx_size
        target_cache, draft_cache = _cache_options(inst)
        weights = kv = 0
        for meta, cache in ((models.target, target_cache), (models.drafter, draft_cache)):
            if meta is None:
                continue
            weights += meta.total_tensor_bytes
            kv += kv_cache_bytes(
                meta,
                n_ctx=ctx,
                parallel=cache.parallel,
                unified=False,
                type_k=cache.type_k,
                type_v=cache.type_v,
                flash_attn=cache.flash_attn,
            ).total
        return InstancePlan(
            inst.name,
            None,
            inst.ctx_size,
            ctx,
            weights,
            kv,
            cache_types=_cache_types(inst),
            kv_reason=reason,
        )

    def budget_of(self, inst: Instance, ref: str) -> tuple[int, str] | None:
        gpu = self.gpus.get(ref)
        keys = [ref] + ([str(gpu.index), gpu.uuid] if gpu is not None else [])
        for key in keys:
            if key in self.config.gpu_memory_mib:
                return self.config.gpu_memory_mib[key], f"gpu_memory_mib.{key}"
        if gpu is not None:
            return gpu.memory_total_mib, "nvidia-smi"
        self.error(
            "gpu_memory_mib",
            f"no VRAM budget for GPU {ref!r} (llama_instances[{inst.name}].gpu): set "
            f'gpu_memory_mib: {{"{ref}": <MiB>}} or read it from the host\'s nvidia-smi '
            "(gemma4-fleet plan --from-hosts)",
        )
        return None

    def plan_gpu_group(
        self, key: str, insts: list[Instance], models: Mapping[str, _Models]
    ) -> list[InstancePlan]:
        """Rows of every instance on one GPU; at most one error for the GPU's fit."""
        ref = insts[0].gpu or key
        found = self.budget_of(insts[0], ref)
        if found is None:
            return []
        budget_mib, source = found
        headroom = self.config.vram_headroom_mib * MIB
        named = {inst.gpu for inst in insts}
        for svc in self._services_on(key):
            # The same spelling is refused by the config; this catches index vs UUID.
            if not svc.share_gpu_with_llama and svc.gpu not in named:
                self.error(
                    f"gpu_services[{svc.unit}].gpu",
                    f"GPU {svc.gpu} is GPU {ref} that llama_instances[{insts[0].name}] uses; "
                    "move the service to another GPU or set share_gpu_with_llama: true",
                )
        services = [
            Tenant(svc.unit, svc.vram_reserve_mib * MIB)
            for svc in self._services_on(key)
            if svc.vram_reserve_mib
        ]
        autos = [inst for inst in insts if inst.ctx_size == "auto"]
        for extra in autos[1:]:
            self.error(
                f"llama_instances[{extra.name}].ctx_size",
                f"auto on GPU {ref}, which llama_instances[{autos[0].name}] also sizes with "
                "auto; give all but one of them a fixed ctx_size",
            )
        if len(autos) > 1:
            return []

        usage: dict[str, GpuUsage] = {}
        for inst in insts:
            if isinstance(inst.ctx_size, int):
                usage[inst.name] = _usage(inst, models[inst.name], inst.ctx_size)
        fixed_total = sum(u.total for u in usage.values())
        available = budget_mib * MIB - headroom - sum(t.bytes for t in services) - fixed_total
        auto_failed = False
        for inst in autos:
            best = _largest_fit(inst, models[inst.name], available)
            auto_failed = best is None
            usage[inst.name] = best or _usage(inst, models[inst.name], CTX_PAD * inst.parallel)

        gpu = self.gpus.get(ref)
        rows = []
        for inst in insts:
            own = usage[inst.name]
            others = [
                Tenant(o.unit, usage[o.name].total, "instance") for o in insts if o is not inst
            ]
            rows.append(
                InstancePlan(
                    instance=inst.name,
                    gpu=inst.gpu,
                    ctx_size=inst.ctx_size,
                    ctx=own.n_ctx if inst.ctx_size == "auto" else inst.ctx_size,
                    weights=own.weights,
                    kv=own.kv,
                    compute=own.compute,
                    overhead=own.overhead,
                    tenants=(*services, *others),
                    headroom=headroom,
                    budget=budget_mib * MIB,
                    budget_source=source,
                    gpu_index=gpu.index if gpu else None,
                    gpu_uuid=gpu.uuid if gpu else None,
                    gpu_name=gpu.name if gpu else None,
                    cache_types=_cache_types(inst),
                    kv_reason=self.kv_reasons.get(inst.name, "set in host data"),
                )
            )
        failing = next((r for r in rows if not r.fits), None)
        if failing is not None:
            if auto_failed:
                failing = next(r for r in rows if r.ctx_size == "auto")
            self.refuse(failing, insts, models, source)
        return rows

    def choose_kv(
        self, key: str, insts: list[Instance], models: Mapping[str, _Models]
    ) -> list[Instance]:
        """The instances of one GPU with their "auto" KV types chosen (see the module doc)."""
        chosen = {i.name: with_kv(i, "f16") for i in insts if not kv_is_chosen(i)}
        pending = [i for i in insts if kv_is_chosen(i)]
        for n, inst in enumerate(pending):
            later = {o.name: with_kv(o, kv_candidates(o)[-1]) for o in pending[n + 1 :]}
            candidates = kv_candidates(inst)
            short: list[str] = []
            for kv in candidates:
                trial = with_kv(inst, kv)
                group = [
                    trial if i.name == inst.name else chosen.get(i.name) or later[i.name]
                    for i in insts
                ]
                missing = self._shortfall(key, group, models)
                if missing is None:
                    break
                short.append(f"{kv} needs {_mib(missing)} more")
            chosen[inst.name] = trial
            if not short:
                why = f"auto: the fastest of {_order_text(inst)}, fits"
            elif len(short) < len(candidates):
                why = f"auto: {'; '.join(short)}; {kv} fits ({_order_text(inst)})"
            else:
                why = f"auto: none of {_order_text(inst)} fits ({'; '.join(short)})"
            self.kv_reasons[inst.name] = why
        return [chosen[i.name] for i in insts]

    def _shortfall(
        self, key: str, insts: list[Instance], models: Mapping[str, _Models]
    ) -> int | None:
        """Bytes the GPU lacks for these instances; None when they fit (or fail for reasons
        other than the fit, which the real pass reports)."""
        probe = _Host(self.name, self.config, self.gpus)
        rows = probe.plan_gpu_group(key, insts, models)
        failing = [r.free for r in rows if r.free is not None and r.free < 0]
        return -min(failing) if failing else None

    def _services_on(self, key: str) -> list[GpuService]:
        return [svc for svc in self.config.gpu_services if self.gpu_key(svc.gpu) == key]

    def refuse(
        self,
        row: InstancePlan,
        insts: list[Instance],
        models: Mapping[str, _Models],
        source: str,
    ) -> None:
        inst = next(i for i in insts if i.name == row.instance)
        if row.kv_reason.startswith("auto"):
            row = replace(row, budget_source=f"{source}; KV {row.kv_label}: {row.kv_reason}")
        budget = row.budget or 0
        left = budget - row.headroom - row.tenants_bytes - row.overhead
        if row.weights > left:
            where = source if source != "nvidia-smi" else f"llama_instances[{inst.name}].gpu"
            models_used = inst.target + (f" + {inst.drafter}" if inst.drafter else "")
            self.error(
                where,
                f"GPU {row.gpu} budget {_mib(budget)} leaves {_mib(left)} for the weights of "
                f"llama_instances[{inst.name}] after headroom, other tenants and CUDA overhead; "
                f"the weights ({models_used}) need {_mib(row.weights)}: {row.breakdown()}",
            )
            return
        if row.ctx_size == "auto":
            self.error(
                f"llama_instances[{inst.name}].ctx_size",
                f"auto: not even ctx {row.ctx} fits GPU {row.gpu}: {row.breakdown()}",
            )
            return
        available = budget - row.headroom - row.tenants_bytes
        best = _largest_fit(inst, models[inst.name], available)
        hint = f"; the largest ctx that fits is {best.n_ctx}" if best is not None else ""
        self.error(
            f"llama_instances[{inst.name}].ctx_size",
            f"ctx {row.ctx} does not fit GPU {row.gpu}: {row.breakdown()}{hint}",
        )


def plan_host(
    host_name: str, config: HostConfig, gpus: Mapping[str, Gpu], meta_for: MetaFor
) -> HostPlan:
    """Pairing and VRAM plan of one host; raises PlanConfigError with every problem found.

    `gpus`: each configured GPU reference (index or UUID) resolved to the host's GPU
    (gemma4_fleet.pipeline); a reference not in it takes its budget from `gpu_memory_mib`.
    """
    host = _Host(host_name, config, gpus)
    metas = host.model_metas(meta_for)
    models: dict[str, _Models] = {}
    for inst in config.instances:
        if inst.target not in metas or (inst.drafter is not None and inst.drafter not in metas):
            continue  # its model's error is already reported
        pair = _Models(metas[inst.target], metas[inst.drafter] if inst.drafter else None)
        host.check_pairing(inst, pair)
        if host.check_train_ctx(inst, pair):
            models[inst.name] = pair

    rows: list[InstancePlan] = []
    by_gpu: dict[str, list[Instance]] = {}
    for inst in config.instances:
        if inst.name not in models:
            continue
        if inst.gpu is None:
            continue
        by_gpu.setdefault(host.gpu_key(inst.gpu), []).append(inst)
    for key, insts in by_gpu.items():
        try:
            rows += host.plan_gpu_group(key, host.choose_kv(key, insts, models), models)
        except PlanError as exc:
            names = ", ".join(f"llama_instances[{i.name}]" for i in insts)
            host.error(names, str(exc))
    for inst in config.instances:
        if inst.name in models and inst.gpu is None:
            try:
                rows.append(host.cpu_row(inst, models[inst.name]))
            except PlanError as exc:
                host.error(f"llama_instances[{inst.name}]", str(exc))
    rows = [host.with_chat(row, models[row.instance]) for row in rows]
    if host.errors:
        raise PlanConfigError(host.errors)
    return HostPlan(host_name, tuple(rows))
