"""Configuration rendered for the host: llama-server's argv, the smoke check's argv, --help
parsing, and the one systemd escaping every value in a unit file goes through."""

from __future__ import annotations

import re

from gemma4_fleet.config import ConfigError, HostConfig, Instance

# Characters systemd passes through unquoted in ExecStart (no specifiers, variables or quotes).
_SAFE = re.compile(r"^[A-Za-z0-9_./:=,+@-]+$")


def server_argv(config: HostConfig, inst: Instance, ctx_size: int | None = None) -> list[str]:
    """argv of llama-server for one instance, flags named as the pinned commit names them.

    `ctx_size` is the planned context when the instance asks for "auto".
    """
    ctx = ctx_size if ctx_size is not None else inst.ctx_size
    if not isinstance(ctx, int):
        raise ConfigError(f"instance {inst.name}: ctx_size auto needs a VRAM plan")
    kv = (inst.cache_type_k, inst.cache_type_v, inst.cache_type_k_draft, inst.cache_type_v_draft)
    if "auto" in kv:
        raise ConfigError(f"instance {inst.name}: cache type auto needs a VRAM plan (settle it)")
    argv = [
        config.server_binary,
        "--model",
        config.model_path(inst.target),
        "--alias",
        inst.model_id,
    ]
    if inst.drafter is not None:
        argv += [
            "--model-draft",
            config.model_path(inst.drafter),
            "--spec-type",
            inst.spec_type,
            "--spec-draft-n-max",
            str(inst.draft_n_max),
            "--spec-draft-n-min",
            str(inst.draft_n_min),
            "--spec-draft-p-min",
            f"{inst.draft_p_min:g}",
            "--spec-draft-ngl",
            str(inst.draft_gpu_layers),
            "--cache-type-k-draft",
            inst.cache_type_k_draft,
            "--cache-type-v-draft",
            inst.cache_type_v_draft,
        ]
    argv += [
        "--ctx-size",
        str(ctx),
        "--n-gpu-layers",
        str(inst.gpu_layers),
        "--cache-type-k",
        inst.cache_type_k,
        "--cache-type-v",
        inst.cache_type_v,
        "--parallel",
        str(inst.parallel),
        "--fit",
        "on" if inst.fit else "off",
        "--flash-attn",
        inst.flash_attn,
    ]
    if inst.cont_batching:
        argv.append("--cont-batching")
    argv += chat_template_argv(inst)
    if inst.threads is not None:
        argv += ["--threads", str(inst.threads)]
    # --offline: the server never fetches anything itself; --metrics: Prometheus incl. drafts.
    argv += ["--host", inst.host, "--port", str(inst.port), "--offline", "--metrics", "--no-webui"]
    if inst.api_key_file is not None:
        # A path, never the key: the key is a systemd credential only this unit can read.
        argv += ["--api-key-file", credential_path(inst.unit)]
    return argv + list(inst.extra_args)


def chat_template_argv(inst: Instance) -> list[str]:
    """The template engine and template of /v1/chat/completions.

    jinja is on by default at the pinned commit, so `jinja: false` must say --no-jinja. A
    built-in name needs the legacy engine: under --jinja the name itself would be the template.
    """
    if inst.chat_template is not None:
        return ["--no-jinja", "--chat-template", inst.chat_template]
    argv = ["--jinja" if inst.jinja else "--no-jinja"]
    if inst.chat_template_path is not None:
        argv += ["--chat-template-file", inst.chat_template_path]
    return argv


HOST_SCRIPTS_DIR = "/usr/local/lib/gemma4-fleet"  # gemma4_fleet/host_scripts/*, as shipped
BUILD_SCRIPT = f"{HOST_SCRIPTS_DIR}/build.sh"
UNPACK_BUILD_SCRIPT = f"{HOST_SCRIPTS_DIR}/unpack_build.sh"
PLACE_MODEL_SCRIPT = f"{HOST_SCRIPTS_DIR}/place_model.sh"
SMOKE_SCRIPT = f"{HOST_SCRIPTS_DIR}/smoke_check.py"
VERIFY_SCRIPT = f"{HOST_SCRIPTS_DIR}/verify.py"
PRUNE_SCRIPT = f"{HOST_SCRIPTS_DIR}/prune.py"
DRAIN_SCRIPT = f"{HOST_SCRIPTS_DIR}/drain.py"
# What every deploy ships first (tune.py and nvidia-uvm.sh go where they are needed).
SHIPPED_SCRIPTS = (
    BUILD_SCRIPT,
    UNPACK_BUILD_SCRIPT,
    PLACE_MODEL_SCRIPT,
    SMOKE_SCRIPT,
    VERIFY_SCRIPT,
    PRUNE_SCRIPT,
    DRAIN_SCRIPT,
)
KEYS_DIR = "/etc/gemma4-fleet/keys"  # root only (0700); the units load keys as credentials


def api_key_path(inst: Instance) -> str:
    """Where the instance's key file lives on the host (root 0600)."""
    return f"{KEYS_DIR}/{inst.name}.key"


def credential_path(unit: str) -> str:
    """The key as `LoadCredential=api-key:...` shows it to `unit` (systemd's %d/api-key)."""
    return f"/run/credentials/{unit}/api-key"


SMOKE_STATE_DIR = "gemma4-fleet-smoke"  # under /var/lib: JSON reports and .prom textfiles


def smoke_report(inst: Instance, suffix: str) -> str:
    return f"/var/lib/{SMOKE_STATE_DIR}/{inst.name}.{suffix}"


def smoke_argv(config: HostConfig, inst: Instance) -> list[str]:
    """The smoke check of one instance: the same command after a deploy and from its timer."""
    argv = [
        "/usr/bin/python3",
        SMOKE_SCRIPT,
        "--url",
        inst.local_url,
        "--instance",
        inst.name,
        "--unit",
        inst.unit,
        "--expect-commit",
        config.llamacpp.commit,
        "--expect-model",
        config.model_path(inst.target),
        "--n-predict",
        str(config.smoke.n_predict),
        "--json",
        smoke_report(inst, "json"),
        "--prom",
        smoke_report(inst, "prom"),
    ]
    if inst.gpu is not None:
        argv.append("--gpu")
    if inst.api_key_file is not None:
        argv += ["--api-key-file", credential_path(inst.smoke_unit)]
    if config.smoke.min_tps is not None:
        argv += ["--min-tps", f"{config.smoke.min_tps:g}"]
    if config.smoke.min_acceptance is not None:
        argv += ["--min-acceptance", f"{config.smoke.min_acceptance:g}"]
    baselines = (
        ("--baseline-tps", inst.baseline_tps),
        ("--baseline-acceptance", inst.baseline_acceptance),
    )
    if config.smoke.regression is not None and any(v is not None for _, v in baselines):
        for flag, value in baselines:
            if value is not None:
                argv += [flag, f"{value:g}"]
        argv += ["--regression", f"{config.smoke.regression:g}"]
    return argv


def flag_names(argv: list[str]) -> list[str]:
    """The option names in an argv (what the built binary's --help must know)."""
    return [arg.split("=", 1)[0] for arg in argv[1:] if re.match(r"^--?[A-Za-z]", arg)]


def parse_help_flags(help_text: str) -> set[str]:
    """Every option name llama-server --help lists (lines like `-fa,   --flash-attn [on|off]`).

    Options whose help says "the argument has been removed" (`--draft-max` at this pin) are
    left out: the server aborts on them.
    """
    flags: set[str] = set()
    for line in help_text.splitlines():
        if line.startswith("-") and "the argument has been removed" not in line:
            names = re.split(r"(?<![,\s])\s{2,}", line, maxsplit=1)[0]
            flags.update(re.findall(r"(?:^|(?<=[\s,]))(--?[A-Za-z][A-Za-z0-9-]*)", names))
    return flags


def systemd_escape(value: str, *, command_line: bool = False) -> str:
    """One value escaped as one word of a unit file setting (systemd.syntax(7), systemd.service(5)).

    Specifiers (``%``) are doubled everywhere; ``$`` only where systemd expands variables, in
    command lines (ExecStart=); anything beyond plain characters is double-quoted with C escapes,
    which ExecStart=, Environment= and path lists such as ReadOnlyPaths= all unquote.
    """
    escaped = value.replace("%", "%%")
    if command_line:
        escaped = escaped.replace("$", "$$")
    if _SAFE.match(value):
        return escaped
    escaped = escaped.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def exec_start(argv: list[str]) -> str:
    """The value of ExecStart= that runs exactly `argv`.

    systemd expands ``$VAR`` in the arguments but not in the executable's path: a ``$`` there is
    taken as is (``$$`` would stay two).
    """
    executable, *args = argv
    words = [systemd_escape(executable)] + [systemd_escape(a, command_line=True) for a in args]
    return " ".join(words)


def cuda_environment(gpu_uuid: str) -> str:
    """The value of Environment= that pins a process to one GPU, by UUID."""
    return systemd_escape(f"CUDA_VISIBLE_DEVICES={gpu_uuid}")
