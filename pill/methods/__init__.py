"""The methods, one module each (`pill.py`, `lavin.py`, `llama_adapter_v2.py`), and their registry.

The CLI, the demo, checkpoints and the trainer look a method up here by name (`get_method`) and use its
`Method` record; nothing outside the method modules tests for a method's name.
"""
from __future__ import annotations

from . import lavin, llama_adapter_v2, pill
from .base import Method, MethodConfig
from .lavin import LavinConfig, inject_lavin
from .llama_adapter_v2 import LlamaAdapterV2Config, inject_llama_adapter_v2
from .pill import PillConfig, inject_pill

METHODS: dict[str, Method] = {m.METHOD.name: m.METHOD for m in (pill, lavin, llama_adapter_v2)}


def method_names() -> list[str]:
    return list(METHODS)


def get_method(name: str, *, where: str = "method") -> Method:
    """The registered method called `name`; an error naming `where` (the argument or file) otherwise."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"{where} must be one of {method_names()}, got {name!r}") from None


__all__ = ["METHODS", "LavinConfig", "LlamaAdapterV2Config", "Method", "MethodConfig", "PillConfig", "get_method",
           "inject_lavin", "inject_llama_adapter_v2", "inject_pill", "method_names"]
