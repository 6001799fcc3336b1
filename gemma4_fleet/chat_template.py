"""Which chat template an instance's /v1/chat/completions will use, known before deploying.

llama-server takes `--chat-template(-file)` when given, else the target GGUF's
`tokenizer.chat_template`, else ChatML. A Gemma model prompted in ChatML answers with
`<|im_end|>` garbage, so a target without a template and without a configured one is a warning
in the plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from gemma4_fleet.config import Instance
from gemma4_fleet.gguf_meta import ModelMeta


@dataclass(frozen=True)
class ChatTemplateUse:
    source: Literal["gguf", "builtin", "file", "chatml-fallback"]
    name: str | None  # the built-in name or the controller file
    engine: Literal["jinja", "legacy"]
    warning: str | None = None  # without host/field prefix

    def describe(self) -> str:
        engine = "Jinja" if self.engine == "jinja" else "legacy engine, --no-jinja"
        if self.source == "gguf":
            return f"the GGUF's own ({engine})"
        if self.source == "builtin":
            return f"llama.cpp built-in {self.name} ({engine})"
        if self.source == "file":
            return f"{self.name} ({engine})"
        return "none in the GGUF: llama-server falls back to chatml"

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "name": self.name, "engine": self.engine}


def chat_template_use(inst: Instance, target: ModelMeta) -> ChatTemplateUse:
    """What the server will use; ValueError when chat_template_file is not a readable file."""
    engine: Literal["jinja", "legacy"] = "jinja" if inst.jinja else "legacy"
    if inst.chat_template is not None:
        return ChatTemplateUse("builtin", inst.chat_template, "legacy")
    if inst.chat_template_file is not None:
        path = Path(inst.chat_template_file)
        if not path.is_file():
            raise ValueError(f"no such file on the controller: {path}")
        return ChatTemplateUse("file", str(path), engine)
    if target.has_chat_template:
        return ChatTemplateUse("gguf", None, engine)
    hint = "gemma" if target.architecture.startswith("gemma") else "the model family's name"
    return ChatTemplateUse(
        "chatml-fallback",
        None,
        engine,
        warning=(
            f"the GGUF of {inst.target} ({target.name}) carries no chat template, so "
            "llama-server would prompt it in chatml, which it was not trained on (replies "
            f"with <|im_end|> garbage); set chat_template: {hint} (a llama.cpp built-in) or "
            "chat_template_file: <Jinja file>"
        ),
    )
