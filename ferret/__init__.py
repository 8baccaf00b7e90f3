"""Ferret: refer and ground anything anywhere at any granularity.

`import ferret` registers the model with transformers' Auto classes (so
`AutoModelForCausalLM.from_pretrained` reads a Ferret folder); the rest loads lazily:

    from ferret import FerretChat, FerretProcessor, Box
    chat = FerretChat.from_pretrained("path/to/ferret")
    answer = chat.ask("photo.jpg", "What is in <region>?", regions=[Box(10, 20, 200, 220)])
"""

from __future__ import annotations

import importlib

import ferret.model  # noqa: F401  (registers AutoConfig / AutoModelForCausalLM for model_type "ferret")

_LAZY = {
    "FerretChat": "ferret.chat",
    "Answer": "ferret.chat",
    "ChatHistory": "ferret.chat",
    "Point": "ferret.regions",
    "Box": "ferret.regions",
    "FreeForm": "ferret.regions",
    "GroundedRegion": "ferret.regions",
    "load_pretrained": "ferret.model.builder",
    "FerretProcessor": "ferret.processing",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ferret' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
