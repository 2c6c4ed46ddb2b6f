"""Prompt-learning methods, one paper per module, and their registry.

``get(name, **kwargs)`` builds a method by name (what configs and the CLI use);
``names()`` lists them. Every method is a :class:`PromptMethod` of pure functions.
"""

from __future__ import annotations

from collections.abc import Callable

from jaxprompt.methods.base import Batch, Metrics, Prompt, PromptMethod
from jaxprompt.methods.bayes import bayes
from jaxprompt.methods.cocoop import cocoop
from jaxprompt.methods.coop import coop
from jaxprompt.methods.ivlp import ivlp
from jaxprompt.methods.maple import maple
from jaxprompt.methods.pouf import pouf
from jaxprompt.methods.promptsrc import promptsrc
from jaxprompt.methods.tpt import tpt
from jaxprompt.methods.zeroshot import zeroshot

__all__ = [
    "Batch",
    "Metrics",
    "Prompt",
    "PromptMethod",
    "bayes",
    "cocoop",
    "coop",
    "get",
    "ivlp",
    "maple",
    "names",
    "pouf",
    "promptsrc",
    "register",
    "tpt",
    "zeroshot",
]

_REGISTRY: dict[str, Callable[..., PromptMethod]] = {
    "zeroshot": zeroshot,
    "coop": coop,
    "cocoop": cocoop,
    "ivlp": ivlp,
    "maple": maple,
    "promptsrc": promptsrc,
    "tpt": tpt,
    "bayes": bayes,
    "pouf": pouf,
}


def names() -> list[str]:
    """The registered method names, sorted."""
    return sorted(_REGISTRY)


def register(name: str, constructor: Callable[..., PromptMethod]) -> None:
    """Adds a method constructor under ``name`` (for research code's own methods)."""
    if name in _REGISTRY and _REGISTRY[name] is not constructor:
        raise ValueError(f"a method named {name!r} is already registered")
    _REGISTRY[name] = constructor


def get(name: str, **kwargs) -> PromptMethod:
    """Builds the method ``name`` with keyword hyperparameters.

    Raises:
      ValueError: for an unknown name (listing the options) or an unknown keyword.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(names())}")
    try:
        return _REGISTRY[name](**kwargs)
    except TypeError as e:
        raise ValueError(f"bad arguments for method {name!r}: {e}") from e
