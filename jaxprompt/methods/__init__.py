"""Prompt-learning methods, one paper per module, and their registry.

``get(name, **kwargs)`` builds a method by name (what configs and the CLI use);
``names()`` lists them. Every method is a :class:`PromptMethod` of pure functions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from jaxprompt.methods.base import Batch, Metrics, Prompt, PromptMethod
from jaxprompt.methods.bayes import bayes
from jaxprompt.methods.cocoop import cocoop
from jaxprompt.methods.coop import coop
from jaxprompt.methods.ivlp import ivlp
from jaxprompt.methods.kgcoop import kgcoop
from jaxprompt.methods.maple import maple
from jaxprompt.methods.pouf import pouf
from jaxprompt.methods.promptsrc import promptsrc
from jaxprompt.methods.selfreg import cocoop_src, coop_src, maple_src, self_regulated
from jaxprompt.methods.tpt import make_optimizer as tpt_optimizer
from jaxprompt.methods.tpt import tpt
from jaxprompt.methods.zeroshot import zeroshot

__all__ = [
    "Batch",
    "Metrics",
    "Prompt",
    "PromptMethod",
    "bayes",
    "cocoop",
    "cocoop_src",
    "coop",
    "coop_src",
    "get",
    "ivlp",
    "kgcoop",
    "maple",
    "maple_src",
    "names",
    "pouf",
    "promptsrc",
    "register",
    "self_regulated",
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
    # Self-regulation (PromptSRC's agreement with the frozen CLIP) on any base, and its presets.
    "selfreg": self_regulated,
    "coop+src": coop_src,
    "cocoop+src": cocoop_src,
    "maple+src": maple_src,
    "kgcoop": kgcoop,
}


def names() -> list[str]:
    """The registered method names, sorted."""
    return sorted(_REGISTRY)


def register(name: str, constructor: Callable[..., PromptMethod]) -> None:
    """Adds a method constructor under ``name`` (for research code's own methods)."""
    if name in _REGISTRY and _REGISTRY[name] is not constructor:
        raise ValueError(f"a method named {name!r} is already registered")
    _REGISTRY[name] = constructor


def _resolve_base(base: Any, base_kwargs: Mapping[str, Any] | None, wrapper: str) -> Any:
    """A wrapper's base from the forms configs and checkpoint meta give: a method, a name
    (with ``base_kwargs``), ``{"method": NAME, "method_config": {...}}``, or None."""
    if isinstance(base, Mapping) and "method" in base:
        base_kwargs = {**dict(base.get("method_config") or {}), **dict(base_kwargs or {})}
        base = base["method"]
    if isinstance(base, str):
        if base == wrapper:
            raise ValueError(f"{wrapper} cannot wrap itself")
        return get(base, **dict(base_kwargs or {}))
    if base_kwargs:
        raise ValueError(f"{wrapper}: base_kwargs needs a base given by name (base='coop')")
    return base


# JSON descriptions that become objects before a constructor sees them: {method: {kwarg: decode}}.
_DECODERS: dict[str, dict[str, Callable[[Any], Any]]] = {"tpt": {"optimizer": tpt_optimizer}}


def get(name: str, **kwargs: Any) -> PromptMethod:
    """Builds the method ``name`` with keyword hyperparameters.

    This is where names and JSON forms become objects, once: a wrapper's ``base`` may be a
    registry name with ``base_kwargs``, or the ``{"method", "method_config"}`` form checkpoint
    meta stores; TPT's ``optimizer`` may be a JSON description
    (:func:`jaxprompt.methods.tpt.make_optimizer`), recorded as given in ``method.config``.
    So ``get(meta["method"], **meta["method_config"])`` rebuilds a saved method.

    Raises:
      ValueError: for an unknown name (listing the options) or an unknown keyword.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(names())}")
    if "base" in kwargs or "base_kwargs" in kwargs:
        kwargs["base"] = _resolve_base(kwargs.get("base"), kwargs.pop("base_kwargs", None), name)
    described = {}
    for key, decode in _DECODERS.get(name, {}).items():
        if isinstance(kwargs.get(key), Mapping):
            described[key] = dict(kwargs[key])
            kwargs[key] = decode(kwargs[key])
        elif isinstance(kwargs.get(key), str) and kwargs[key] == "custom":
            # The meta of a method built with an optax object: it cannot be rebuilt from JSON,
            # so the default is used (the meta says which).
            kwargs.pop(key)
    try:
        method = _REGISTRY[name](**kwargs)
    except TypeError as e:
        raise ValueError(f"bad arguments for method {name!r}: {e}") from e
    if described:
        method = method._replace(config={**dict(method.config), **described})
    return method
