"""What the server does with request fields it does not implement.

Three kinds (the README's table of OpenAI parameters lists them):
- ``NEUTRAL``: fields that change the result and are not supported. Sent with the value that
  asks for nothing (``response_format: {"type": "text"}``, ``tools: []``...) they are accepted;
  any other value is a 400 naming the field.
- ``HARMLESS``: fields that never change the generated text here (bookkeeping, hints):
  accepted silently.
- Anything else: ignored, with a logged warning, as vLLM does.
"""

from __future__ import annotations

import logging

from pydantic import BaseModel

from deployments.errors import APIError

log = logging.getLogger("ray.serve")


def _absent(value) -> bool:
    return value is None or value == [] or value == {} or value == ""


def _text_format(value) -> bool:
    return value is None or (isinstance(value, dict) and value.get("type") == "text")


def _no_tool_choice(value) -> bool:
    return value is None or value in ("none", "auto")


# name -> the test that a value asks for nothing (so it may be ignored)
NEUTRAL = {
    "logit_bias": _absent,
    "tools": _absent,
    "tool_choice": _no_tool_choice,
    "functions": _absent,
    "function_call": _no_tool_choice,
    "response_format": _text_format,
    "suffix": _absent,
    "modalities": lambda v: v is None or v == ["text"],
    "audio": _absent,
    "guided_json": _absent,
    "guided_regex": _absent,
    "guided_choice": _absent,
    "min_p": lambda v: v is None or v == 0,
    "repetition_penalty": lambda v: v is None or v == 1,
    "min_tokens": lambda v: v is None or v == 0,
    "ignore_eos": lambda v: v is None or v is False,
    "stop_token_ids": _absent,
    "prompt_logprobs": _absent,
}
HARMLESS = frozenset(
    {"store", "metadata", "service_tier", "parallel_tool_calls", "prediction", "prompt_cache_key", "safety_identifier"}
)


def check(body: BaseModel, best_of_ok: int | None = None) -> list[str]:
    """Refuse (APIError 400) a field that asks for something unsupported; return the names of
    ignored unknown fields (dotted for nested ones) after logging a warning about them.

    best_of_ok: the one ``best_of`` value that asks for nothing (completions: n).
    """
    extra = body.model_extra or {}
    if "best_of" in extra and extra["best_of"] not in (None, best_of_ok):
        _refuse("best_of", extra["best_of"], f"best_of is not supported (only best_of = n = {best_of_ok})")
    for name, neutral in NEUTRAL.items():
        if name in extra and not neutral(extra[name]):
            _refuse(name, extra[name], f"{name} is not supported by this server")
    ignored = [n for n in _unknown(body) if n.split(".")[-1] not in HARMLESS]
    if ignored:
        log.warning("ignoring unknown request fields: %s", ", ".join(ignored))
    return ignored


def _refuse(name: str, value, message: str) -> None:
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    raise APIError(400, f"{message} (got {name}={shown}); leave it out", name, "unsupported_parameter")


def _unknown(model: BaseModel, prefix: str = "") -> list[str]:
    """Dotted names of fields no model declares, at any depth, except the known ones above."""
    names = [
        f"{prefix}{name}" for name in (model.model_extra or {})
        if not (prefix == "" and (name in NEUTRAL or name == "best_of"))
    ]
    for field in type(model).model_fields:
        value = getattr(model, field)
        values = value if isinstance(value, list) else [value]
        for i, item in enumerate(values):
            if isinstance(item, BaseModel):
                where = f"{field}.{i}." if isinstance(value, list) else f"{field}."
                names += _unknown(item, prefix + where)
    return names
