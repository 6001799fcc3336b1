"""Tuned profiles: per-host settings chosen from measurements (`gemma4-fleet tune`).

A profile lives in the repository, ``tuned/<host>.json`` (``G4F_TUNED_DIR`` overrides the
folder), readable and diffable::

    {"host": "box4090", "format": 1,
     "instances": {"gemma4": {
        "settings": {"kv_order": ["f16", "q8_0"], "spec_type": "draft-mtp", "draft_n_max": 4},
        "baseline": {"tokens_per_second": 312.5, "acceptance": 0.61},
        "evidence": {...every figure the choice rests on...}}}}

The pipeline applies it to host data before validation: a setting applies to an instance unless
host data sets that field explicitly (``llama_server`` or the instance's entry win); the baseline
becomes the instance's ``baseline_tps`` / ``baseline_acceptance`` (what the scheduled smoke check
compares against). ``spec_type: none`` also drops the drafter (MTP measured slower than off).

Bad profiles are refused before any host is touched, naming the file and the field: an unknown
field, a profile for a host other than its file name, an instance the host does not have, and
settings that no longer fit the plan (the plan's error then names the profile).

This module also turns a host's plan into the measurement specs for ``host_scripts/tune.py``
and its results back into a profile and the recipe-vs-tuned table.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gemma4_fleet.config import (
    AUTO_KV_ORDER,
    ConfigError,
    HostConfig,
    Instance,
    KvType,
)
from gemma4_fleet.host_scripts import smoke_check
from gemma4_fleet.render import server_argv
from gemma4_fleet.vram_plan import HostPlan, kv_is_chosen, with_kv

PROFILE_FORMAT = 1
DRAFT_LENGTHS = (1, 2, 3, 4, 5, 6)
# The seed 003 recipe every host ran before tuning: the "recipe" column of the tune table.
RECIPE_KV = "q8_0"
RECIPE_DRAFT_N = 3
# A setting changes only when a challenger beats the incumbent by more than this (noise).
DEFAULT_MARGIN = 0.05

# The default prompt mix: code, prose and structured output (short: tuning measures decoding).
DEFAULT_PROMPTS: tuple[tuple[str, str], ...] = (
    (
        "code",
        "Write a Python function that merges two sorted lists into one sorted list, "
        "with a docstring and type hints.",
    ),
    (
        "prose",
        "Explain in a short paragraph why the sky is blue, for a curious ten-year-old.",
    ),
    (
        "structured",
        "Return a JSON object describing three fictional books, each with title, author, "
        "year and a list of genres. Reply with JSON only.",
    ),
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TunedSettings(_Strict):
    """What tuning may set on an instance (each optional; host data wins where it is set)."""

    kv_order: list[KvType] | None = Field(default=None, min_length=1)
    spec_type: Literal["draft-mtp", "draft-simple", "none"] | None = None
    draft_n_max: Annotated[int, Field(ge=1, le=64)] | None = None
    parallel: Annotated[int, Field(ge=1, le=64)] | None = None
    allow_parallel_mtp: bool | None = None


class TunedBaseline(_Strict):
    tokens_per_second: Annotated[float, Field(gt=0)] | None = None
    acceptance: Annotated[float, Field(ge=0, le=1)] | None = None


class TunedInstance(_Strict):
    settings: TunedSettings = TunedSettings()
    baseline: TunedBaseline = TunedBaseline()
    evidence: dict[str, Any] = {}


class TunedProfile(_Strict):
    host: str
    format: Literal[1] = 1
    instances: dict[str, TunedInstance] = {}


def tuned_dir() -> Path:
    """Where profiles live: ``tuned/`` under the current directory (the repository root, as for
    group_data), or ``G4F_TUNED_DIR``."""
    return Path(os.environ.get("G4F_TUNED_DIR", "tuned"))


def profile_path(host_name: str, folder: Path | None = None) -> Path:
    return (folder or tuned_dir()) / f"{host_name}.json"


def _where(path: Path, loc: Sequence[int | str]) -> str:
    return f"{path}: " + (".".join(str(p) for p in loc) or "(file)")


def load_profile(host_name: str, folder: Path | None = None) -> TunedProfile | None:
    """The host's profile, None when it has none; ConfigError naming the file and field."""
    path = profile_path(host_name, folder)
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"host {host_name}: {path}: not a readable JSON profile: {exc}") from None
    try:
        profile = TunedProfile.model_validate(raw)
    except ValidationError as exc:
        lines = [
            f"host {host_name}: {_where(path, err['loc'])}: {err['msg']}"
            + (f" (got {err['input']!r})" if not isinstance(err["input"], dict | list) else "")
            for err in exc.errors()
        ]
        raise ConfigError("\n".join(lines)) from None
    if profile.host != host_name:
        raise ConfigError(
            f"host {host_name}: {path}: host: the profile is for {profile.host!r}, not "
            f"{host_name!r} (rename the file or rerun gemma4-fleet tune)"
        )
    return profile


def apply_profile(
    host_name: str, data: Mapping[str, Any], folder: Path | None = None
) -> dict[str, Any]:
    """Host data with the host's tuned profile applied (see the module doc)."""
    profile = load_profile(host_name, folder)
    out = dict(data)
    if profile is None:
        return out
    path = profile_path(host_name, folder)
    server = data.get("llama_server") or {}
    instances = data.get("llama_instances") or []
    names = [i.get("name") for i in instances if isinstance(i, Mapping)]
    unknown = [name for name in profile.instances if name not in names]
    if unknown:
        raise ConfigError(
            "\n".join(
                f"host {host_name}: {path}: instances.{name}: the host has no llama_instances "
                f"entry named {name!r} (have: {', '.join(map(str, names))})"
                for name in unknown
            )
        )
    tuned_instances = []
    for inst in instances:
        tuned = profile.instances.get(str(inst.get("name"))) if isinstance(inst, Mapping) else None
        if tuned is None:
            tuned_instances.append(inst)
            continue
        explicit = {**server, **inst}
        merged = dict(inst)
        for key, value in tuned.settings.model_dump(exclude_none=True).items():
            if key not in explicit:
                merged[key] = value
        if merged.get("spec_type") == "none" and "spec_type" not in explicit:
            merged["drafter"] = None
        for key, value in (
            ("baseline_tps", tuned.baseline.tokens_per_second),
            ("baseline_acceptance", tuned.baseline.acceptance),
        ):
            if value is not None and key not in explicit:
                merged[key] = value
        tuned_instances.append(merged)
    out["llama_instances"] = tuned_instances
    return out


def annotate_plan_errors(
    host_name: str, errors: Sequence[str], folder: Path | None = None
) -> list[str]:
    """Plan errors of instances whose settings came from a profile name the profile too."""
    try:
        profile = load_profile(host_name, folder)
    except ConfigError:
        return list(errors)
    if profile is None:
        return list(errors)
    path = profile_path(host_name, folder)
    out = []
    for line in errors:
        for name, tuned in profile.instances.items():
            settings = tuned.settings.model_dump(exclude_none=True)
            if f"llama_instances[{name}]" in line and settings:
                shown = ", ".join(f"{k} {v}" for k, v in settings.items())
                line += (
                    f" (tuned settings from {path}: instances.{name}.settings: {shown}; "
                    "rerun gemma4-fleet tune, or set the field in host data)"
                )
                break
        out.append(line)
    return out


# --- measurement specs (controller -> host_scripts/tune.py) -------------------------------------


def read_prompts(path: Path | None) -> list[dict[str, str]]:
    """A prompt file: a JSON list of strings or {name, text}, else text with blank-line-separated
    prompts. None: the default mix of code, prose and structured output."""
    if path is None:
        return [{"name": n, "text": t} for n, t in DEFAULT_PROMPTS]
    text = path.read_text()
    try:
        raw = json.loads(text)
    except ValueError:
        raw = [p.strip() for p in text.split("\n\n") if p.strip()]
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"--prompts {path}: expected a non-empty list of prompts")
    prompts = []
    for i, item in enumerate(raw):
        if isinstance(item, str):
            prompts.append({"name": f"prompt{i + 1}", "text": item})
        elif isinstance(item, Mapping) and isinstance(item.get("text"), str):
            prompts.append({"name": str(item.get("name", f"prompt{i + 1}")), "text": item["text"]})
        else:
            raise ConfigError(f"--prompts {path}: item {i + 1} is neither a string nor {{text}}")
    return prompts


_KV_FLAGS = ("--cache-type-k", "--cache-type-v", "--cache-type-k-draft", "--cache-type-v-draft")


def auto_kv_flags(inst: Instance) -> tuple[str, ...]:
    """The KV flags host data left "auto" (the ones tuning may change)."""
    fields = ("cache_type_k", "cache_type_v", "cache_type_k_draft", "cache_type_v_draft")
    return tuple(
        f for f, name in zip(_KV_FLAGS, fields, strict=True) if getattr(inst, name) == "auto"
    )


def _template(config: HostConfig, inst: Instance, *, kv: Sequence[str], draft_n: bool) -> list[str]:
    """argv of a temporary server: a spare local port, and placeholders where tune.py fills in
    the KV type (the flags in `kv`: those host data left "auto") and the chosen draft length."""
    local = inst.model_copy(update={"host": "127.0.0.1", "port": 1})
    argv = server_argv(config, local)
    argv[argv.index("--port") + 1] = "{port}"
    for flag in kv:
        if flag in argv:
            argv[argv.index(flag) + 1] = "{kv}"
    if draft_n and "--spec-draft-n-max" in argv:
        argv[argv.index("--spec-draft-n-max") + 1] = "{draft_n}"
    return argv


def _mtp_off(inst: Instance) -> Instance:
    return inst.model_copy(update={"spec_type": "none", "drafter": None})


def single_label(inst: Instance) -> str:
    return "none" if inst.drafter is None or inst.spec_type == "none" else f"mtp-{inst.draft_n_max}"


def instance_spec(
    config: HostConfig,
    plan: HostPlan,
    inst: Instance,
    untuned: Instance,
    *,
    kv_types: Sequence[str],
    stop_service: bool,
    gpu_uuid: str | None,
    prompts: list[dict[str, str]],
    n_predict: int,
    reps: int,
    depth: int | None,
    margin: float,
) -> dict[str, Any]:
    """The JSON spec tune.py measures one instance with (see its module doc).

    `inst` is the instance as the host runs it now (profile applied), `untuned` as host data
    alone says (for the recipe).
    """
    settled = plan.settle(inst)
    auto_kv = auto_kv_flags(inst) if kv_is_chosen(inst) else ()
    base = settled
    if auto_kv:
        base = with_kv(inst, kv_types[0]).model_copy(update={"ctx_size": settled.ctx_size})
    single = [
        {"label": "none", "argv": _template(config, _mtp_off(base), kv=auto_kv, draft_n=False)}
    ]
    drafter = untuned.drafter
    if drafter is not None and untuned.spec_type != "none":
        with_drafter = base.model_copy(update={"drafter": drafter, "spec_type": untuned.spec_type})
        for n in DRAFT_LENGTHS:
            cand = with_drafter.model_copy(update={"draft_n_max": n})
            single.append(
                {"label": f"mtp-{n}", "argv": _template(config, cand, kv=auto_kv, draft_n=False)}
            )
    recipe_inst = untuned.model_copy(update={"ctx_size": settled.ctx_size})
    if auto_kv:
        recipe_inst = with_kv(recipe_inst, RECIPE_KV)
    recipe_label = single_label(recipe_inst)
    if recipe_label != "none" and "draft_n_max" not in untuned.model_fields_set:
        recipe_inst = recipe_inst.model_copy(update={"draft_n_max": RECIPE_DRAFT_N})
        recipe_label = single_label(recipe_inst)
    recipe_inst = plan_ready(recipe_inst, settled)
    n_slots = untuned.parallel
    parallel = None
    if n_slots > 1:
        cands = [(f"np{n_slots}-none", _mtp_off(base).model_copy(update={"parallel": n_slots}))]
        if drafter is not None and untuned.spec_type != "none":
            mtp = base.model_copy(update={"drafter": drafter, "spec_type": untuned.spec_type})
            cands += [
                (f"np{n_slots}-mtp", mtp.model_copy(update={"parallel": n_slots})),
                ("np1-mtp", mtp.model_copy(update={"parallel": 1})),
            ]
        parallel = {
            "n": n_slots,
            "candidates": [
                {"label": label, "argv": _template(config, c, kv=auto_kv, draft_n=True)}
                for label, c in cands
            ],
        }
    ngl = "0" if inst.gpu is None else "99"
    depth = depth if depth is not None else min(settled_ctx(settled) // 2, 32768)
    bench_argv = [
        f"{config.build_dir}/bin/llama-bench",
        "-m",
        config.model_path(inst.target),
        "-p",
        "0",
        "-n",
        str(max(16, n_predict)),
        "-d",
        str(depth),
        "-ctk",
        "{kv}",
        "-ctv",
        "{kv}",
        "-fa",
        "0" if inst.flash_attn == "off" else "1",
        "-ngl",
        ngl,
        "-r",
        str(reps),
        "-o",
        "json",
    ]
    if inst.threads is not None:
        bench_argv += ["-t", str(inst.threads)]
    incumbent: dict[str, Any] = {"single": single_label(settled)}
    if auto_kv:
        incumbent["kv"] = settled.cache_type_k
    if n_slots > 1:
        mtp_now = settled.spec_type != "none" and settled.drafter is not None
        incumbent["parallel"] = f"np{settled.parallel}-{'mtp' if mtp_now else 'none'}"
    return {
        "instance": inst.name,
        "unit": inst.unit,
        "service_url": inst.local_url,
        "user": config.service_user,
        "env": {"CUDA_VISIBLE_DEVICES": gpu_uuid or ""},
        "stop_service": stop_service,
        "kv_types": list(kv_types) if auto_kv else [settled.cache_type_k],
        "bench_argv": bench_argv,
        "depth": depth,
        "single": single,
        "recipe": {
            "label": "recipe",
            "single_label": recipe_label,
            "kv": recipe_inst.cache_type_k,
            "argv": _template(config, recipe_inst, kv=(), draft_n=False),
        },
        "parallel": parallel,
        "prompts": prompts,
        "n_predict": n_predict,
        "reps": reps,
        "baseline_prompts": [{"name": n, "text": t} for n, t in smoke_check.PROMPTS],
        "baseline_n_predict": config.smoke.n_predict,
        "incumbent": incumbent,
        "margin": margin,
        "drain_timeout": 120,
        "health_timeout": 900,
    }


def settled_ctx(inst: Instance) -> int:
    return inst.ctx_size if isinstance(inst.ctx_size, int) else 0


def plan_ready(inst: Instance, settled: Instance) -> Instance:
    """Any "auto" left (explicit types stay) resolved as the plan settled them."""
    return with_kv(inst, settled.cache_type_k) if kv_is_chosen(inst) else inst


def kv_types_that_fit(fits: Mapping[str, bool]) -> list[str]:
    """The KV types tune measures: AUTO_KV_ORDER's that fit the plan (f16 first)."""
    return [t for t in AUTO_KV_ORDER if fits.get(t)]


# --- results -> profile ------------------------------------------------------------------------


def tuned_instance(
    inst: Instance, untuned: Instance, result: Mapping[str, Any], spec: Mapping[str, Any]
) -> TunedInstance:
    """The profile entry for one instance from tune.py's result."""
    settings: dict[str, Any] = {}
    if kv_is_chosen(untuned) and result.get("kv_order"):
        settings["kv_order"] = list(result["kv_order"])
    chosen = str(result["single_chosen"])
    if chosen == "none":
        if untuned.drafter is not None and untuned.spec_type != "none":
            settings["spec_type"] = "none"
    else:
        settings["draft_n_max"] = int(chosen.removeprefix("mtp-"))
    par = result.get("parallel")
    if par:
        label = str(par["chosen"])
        slots = int(label.split("-")[0].removeprefix("np"))
        settings["parallel"] = slots
        if label.endswith("-none"):
            settings["spec_type"] = "none"
        elif slots > 1:
            settings["allow_parallel_mtp"] = True
    evidence = {
        "ctx": settled_ctx(inst) or None,
        "bench_depth": spec.get("depth"),
        "n_predict": spec.get("n_predict"),
        "reps": spec.get("reps"),
        "prompts": [p["name"] for p in spec.get("prompts", [])],
        "kv_decode_tps": result.get("kv"),
        "single_stream": result.get("single"),
        "single_chosen": chosen,
        "recipe": result.get("recipe"),
        "tuned_tps": result.get("tuned_tps"),
        "parallel": par,
        "service": result.get("service"),
    }
    baseline = result.get("baseline") or {}
    return TunedInstance(
        settings=TunedSettings(**settings),
        baseline=TunedBaseline(
            tokens_per_second=baseline.get("tokens_per_second") or None,
            acceptance=baseline.get("acceptance"),
        ),
        evidence=evidence,
    )


def profile_json(profile: TunedProfile) -> str:
    return json.dumps(profile.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"


def same_settings(old: TunedProfile | None, new: TunedProfile) -> bool:
    """Whether a rerun chose what the profile already says (then the file is left as it is)."""
    if old is None or set(old.instances) != set(new.instances):
        return False
    return all(old.instances[n].settings == new.instances[n].settings for n in new.instances)


def describe(settings: Mapping[str, Any]) -> str:
    parts = []
    if "kv" in settings:
        parts.append(f"KV {settings['kv']}")
    spec = settings.get("single", "none")
    parts.append("MTP off" if spec == "none" else f"draft-n {spec.removeprefix('mtp-')}")
    if settings.get("parallel"):
        parts.append(f"np {settings['parallel']}")
    return ", ".join(parts)


def host_table(host_name: str, rows: Sequence[Mapping[str, Any]]) -> str:
    """One table per host: recipe vs tuned settings and single-stream tok/s, with the ratio."""
    head = ("instance", "recipe", "tok/s", "tuned", "tok/s", "ratio", "acceptance", "profile")
    table: list[tuple[str, ...]] = [head]
    for r in rows:
        recipe_tps, tuned_tps = r.get("recipe_tps"), r.get("tuned_tps")
        ratio = f"{tuned_tps / recipe_tps:.2f}x" if recipe_tps and tuned_tps else "-"
        acc = r.get("acceptance")
        table.append(
            (
                r["instance"],
                r["recipe"],
                "-" if recipe_tps is None else f"{recipe_tps:.1f}",
                r["tuned"],
                "-" if tuned_tps is None else f"{tuned_tps:.1f}",
                ratio,
                "-" if acc is None else f"{acc:.2f}",
                r["status"],
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = [f"host {host_name}"]
    lines += [
        "  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in table
    ]
    for r in rows:
        lines += [f"  {r['instance']}: {note}" for note in r.get("notes", [])]
    return "\n".join(line.rstrip() for line in lines)
