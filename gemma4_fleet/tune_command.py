"""`gemma4-fleet tune`: ships host_scripts/tune.py to each host, runs it per instance, writes
the tuned profile and prints the recipe-vs-tuned table.

The connecting and running live here; the choices (specs, profiles, tables) are tuning.py's pure
functions. The CLI imports this module after loading the inventory: pyinfra_cli patches the
stdlib for gevent first (before requests, which the pipeline imports, loads ssl).
"""

from __future__ import annotations

import argparse
import io
import json
import shlex
from functools import partial
from importlib.resources import files as package_files
from pathlib import Path
from typing import Any

from pyinfra.api import Config, StringCommand
from pyinfra.api.connect import disconnect_all
from pyinfra.api.exceptions import PyinfraError
from pyinfra.api.facts import get_fact
from pyinfra.context import ctx_host, ctx_state

from gemma4_fleet import tuning
from gemma4_fleet.config import AUTO_KV_ORDER, ConfigError, HostConfig
from gemma4_fleet.facts import Gpu, NvidiaGpus
from gemma4_fleet.pipeline import host_setups, resolve_gpus
from gemma4_fleet.render import HOST_SCRIPTS_DIR
from gemma4_fleet.vram_plan import PlanConfigError, meta_for_model, plan_host


def tune(state: Any, inventory: Any, hosts: list[Any], args: argparse.Namespace) -> int:
    """Measure every instance of the chosen hosts on the host itself; write tuned/<host>.json."""
    prompts = _read_prompts(args.prompts)
    for name, value in (("--n-predict", args.n_predict), ("--reps", args.reps)):
        if value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")
    if not 0 <= args.margin < 1:
        raise ConfigError(f"--margin must be a fraction within 0..1, got {args.margin}")
    state.init(inventory, Config(), initial_limit=hosts)
    failed = False
    with ctx_state.use(state):
        try:
            read = partial(_read_gpus_connected, state)
            # The incumbent is what the profile in --tuned-dir says, as the deploy would run it.
            folder = Path(args.tuned_dir) if args.tuned_dir else None
            setups = host_setups(hosts, read, tuned_dir=folder)
            recipes = host_setups(hosts, read, tuned=False)
            for host in hosts:
                ok, table = _tune_host(
                    state, host, setups[host.name], recipes[host.name], prompts, args
                )
                failed |= not ok
                print(table, flush=True)
        finally:
            disconnect_all(state)
    return 1 if failed else 0


def _read_prompts(path: str | None) -> list[dict[str, str]]:
    try:
        return tuning.read_prompts(Path(path) if path else None)
    except OSError as exc:
        raise ConfigError(f"--prompts {path}: {exc}") from None


def _read_gpus_connected(
    state: Any, hosts: list[tuple[Any, HostConfig]]
) -> tuple[dict[str, list[Gpu]], dict[str, str]]:
    """The NvidiaGpus fact of each GPU host, on a state that is already initialised."""
    gpus: dict[str, list[Gpu]] = {}
    errors: dict[str, str] = {}
    for host, config in hosts:
        if not any(inst.gpu is not None for inst in config.instances):
            continue
        try:
            host.connect(show_errors=False, raise_exceptions=True)
            state.activate_host(host)
            with ctx_host.use(host):
                gpus[host.name] = get_fact(state, host, NvidiaGpus, apply_failed_hosts=False)
        except (PyinfraError, OSError) as exc:
            errors[host.name] = f"nvidia-smi: cannot read it: {exc}"
    return gpus, errors


def _run_on(host: Any, command: str) -> tuple[bool, str, str]:
    ok, output = host.run_shell_command(StringCommand(command), print_output=False)
    return bool(ok), output.stdout, output.stderr


def _tune_host(
    state: Any, host: Any, setup: Any, recipe: Any, prompts: list[dict[str, str]], args: Any
) -> tuple[bool, str]:
    """Tune one host's instances one after the other; (all measured, the host's table)."""
    config, plan = setup.config, setup.plan
    script = f"{HOST_SCRIPTS_DIR}/tune.py"
    rows: list[dict[str, Any]] = []
    entries: dict[str, tuning.TunedInstance] = {}
    all_ok = True
    try:
        host.connect(show_errors=False, raise_exceptions=True)
        state.activate_host(host)
        with ctx_host.use(host):
            _run_on(host, f"mkdir -p {shlex.quote(HOST_SCRIPTS_DIR)}")
            source = (package_files("gemma4_fleet") / "host_scripts" / "tune.py").read_bytes()
            host.put_file(io.BytesIO(source), script)
            for inst in config.instances:
                if args.instance and inst.name not in args.instance:
                    continue
                untuned = next(i for i in recipe.config.instances if i.name == inst.name)
                fits = _kv_fits(host.name, setup, inst)
                row = plan.instance_plan(inst.name)
                spec = tuning.instance_spec(
                    config,
                    plan,
                    inst,
                    untuned,
                    kv_types=tuning.kv_types_that_fit(fits) or ["q8_0"],
                    stop_service=_needs_stop(row),
                    gpu_uuid=setup.gpu_uuid(inst.gpu),
                    prompts=prompts,
                    n_predict=args.n_predict,
                    reps=args.reps,
                    depth=args.depth,
                    margin=args.margin,
                )
                remote_spec = f"/tmp/g4f-tune-{inst.name}.json"
                host.put_file(io.BytesIO(json.dumps(spec).encode()), remote_spec)
                print(f"--> {host.name} {inst.name}: measuring (tune.py on the host)", flush=True)
                _, out, err = _run_on(
                    host, f"python3 {shlex.quote(script)} --spec {shlex.quote(remote_spec)}"
                )
                try:
                    result = json.loads(out)
                except ValueError:
                    result = {"status": "error", "error": (err or out).strip()[-400:]}
                status = result.get("status")
                if status != "ok":
                    all_ok = False
                    rows.append(
                        {
                            "instance": inst.name,
                            "recipe": "-",
                            "tuned": "-",
                            "status": f"{status}: {result.get('error')}",
                        }
                    )
                    continue
                entries[inst.name] = tuning.tuned_instance(inst, untuned, result, spec)
                rows.append(_table_row(inst.name, spec, result))
    except (PyinfraError, OSError) as exc:
        return False, f"host {host.name}\n  cannot tune: {exc}"
    folder = Path(args.tuned_dir) if args.tuned_dir else None
    path = tuning.profile_path(host.name, folder)
    if entries:
        old = tuning.load_profile(host.name, folder)
        kept = dict(old.instances) if old is not None else {}
        new = tuning.TunedProfile(host=host.name, instances={**kept, **entries})
        if tuning.same_settings(old, new) and not args.rewrite:
            verdict = f"{path} unchanged (same settings chosen)"
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(tuning.profile_json(new))
            verdict = f"{path} written; deploy to apply it"
        for r in rows:
            r["status"] = r.get("status") or verdict
    return all_ok, tuning.host_table(host.name, rows)


def _needs_stop(row: Any) -> bool:
    """On a GPU, whether a second copy of the instance does not fit beside the running one."""
    if row.gpu is None or row.free is None:
        return False
    own = row.weights + row.kv + row.compute + row.overhead
    return bool(row.free < own)


def _kv_fits(host_name: str, setup: Any, inst: Any) -> dict[str, bool]:
    """Which of the auto KV types fit this host's plan for the instance (others unchanged)."""
    found, _, _ = resolve_gpus(host_name, setup.config, setup.gpus or None)
    fits: dict[str, bool] = {}
    for kv in AUTO_KV_ORDER:
        fixed = inst.model_copy(update={"cache_type_k": kv, "cache_type_v": kv})
        instances = [fixed if i.name == inst.name else i for i in setup.config.instances]
        config = setup.config.model_copy(update={"instances": instances})
        try:
            plan_host(host_name, config, found, meta_for_model)
            fits[kv] = True
        except PlanConfigError:
            fits[kv] = False
    return fits


def _table_row(name: str, spec: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    recipe = result.get("recipe") or {}
    chosen = result["single_chosen"]
    tuned = {"kv": (result.get("kv_order") or ["-"])[0], "single": chosen}
    par = result.get("parallel")
    if par:
        tuned["parallel"] = par["chosen"].split("-")[0].removeprefix("np")
    figures = result.get("single", {})
    notes = [
        "KV decode tok/s at depth "
        + str(spec.get("depth"))
        + ": "
        + ", ".join(f"{k} {v:.1f}" if v else f"{k} -" for k, v in (result.get("kv") or {}).items()),
        "single stream tok/s (acceptance): "
        + ", ".join(
            f"{label} {f['tps']:.1f}"
            + (f" ({f['acceptance']:.2f})" if f.get("acceptance") is not None else "")
            for label, f in figures.items()
            if f.get("tps")
        ),
    ]
    if par:
        notes.append(
            f"{par['n']} concurrent clients, aggregate tok/s: "
            + ", ".join(f"{k} {v['aggregate_tps']:.1f}" for k, v in par["runs"].items())
        )
    by_pos = figures.get(chosen, {}).get("by_position")
    if by_pos:
        notes.append("acceptance by draft position: " + " ".join(f"{v:.2f}" for v in by_pos))
    return {
        "instance": name,
        "recipe": tuning.describe(
            {"kv": spec["recipe"]["kv"], "single": spec["recipe"]["single_label"]}
        ),
        "recipe_tps": recipe.get("tps"),
        "tuned": tuning.describe(tuned),
        "tuned_tps": result.get("tuned_tps"),
        "acceptance": figures.get(chosen, {}).get("acceptance"),
        "status": "",
        "notes": notes,
    }
