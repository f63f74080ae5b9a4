"""Who serves a LlamaIndex call: its span name, model and provider, from the component's class (the span handler
sees the instance) and the model dict its event carries (``to_payload()``). Provider names are ``_pricing``'s."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from ..._pricing import provider_from_name, provider_id

__all__ = ["Identity", "identify", "is_openai_compatible", "model_of", "provider_from_class_name", "provider_of"]

Identity = tuple[str, "str | None", "str | None"]
"""A call's span name, model and provider."""


def provider_of(cls: type | None) -> str | None:
    """``llama_index.llms.openai.base`` -> ``openai`` (as ``_pricing.provider_id`` names it); ``None`` for core,
    mock and ``*_like`` classes."""
    mod = getattr(cls, "__module__", "") or ""
    parts = mod.split(".")
    if len(parts) >= 3 and parts[0] == "llama_index" and parts[1] in ("llms", "embeddings"):
        p = parts[2]
        return None if p.endswith("_like") else provider_id(p)
    return None


def provider_from_class_name(name: Any) -> str | None:
    """For the stand-alone handler (it sees only ``to_payload()``): ``openai_llm`` -> ``openai``."""
    return provider_from_name(name) if isinstance(name, str) else None


@functools.lru_cache(maxsize=256)
def _class_info(cls: type) -> tuple[str, str | None]:
    return cls.__name__, provider_of(cls)


def model_of(model_dict: Mapping[str, Any], cls_name: str | None) -> str | None:
    """The model a call names: ``model`` / ``model_name`` of ``to_payload()``, else the class name
    (``MockLLM``, ``MockEmbedding``: price them under that name)."""
    v = model_dict.get("model")
    if isinstance(v, str) and v and v != "unknown":
        return v
    v = model_dict.get("model_name")
    if isinstance(v, str) and v and v != "unknown":
        return v
    if cls_name is None:
        cn = model_dict.get("class_name")
        return cn if isinstance(cn, str) and cn else None
    return cls_name


def _identity(cls: type | None, model_dict: Mapping[str, Any], default: str) -> Identity:
    cls_name: str | None
    if cls is not None:
        cls_name, provider = _class_info(cls)
    else:
        cls_name, provider = None, provider_from_class_name(model_dict.get("class_name"))
    return cls_name or str(model_dict.get("class_name") or default), model_of(model_dict, cls_name), provider


_IDENTITIES: dict[tuple[Any, ...], Identity] = {}
"""What ``identify`` read -> its answer: the same for every call of a component."""
_MAX_IDENTITIES = 1024


def identify(cls: type | None, model_dict: Mapping[str, Any], default: str) -> Identity:
    """A call's span name, model and provider, from its component's class (``None``: unknown, the stand-alone
    handler's case) and its model dict; ``default`` names a call that says nothing of itself."""
    key = (cls, default, model_dict.get("model"), model_dict.get("model_name"), model_dict.get("class_name"))
    try:
        hit = _IDENTITIES.get(key)
    except TypeError:  # an unhashable field: not remembered
        return _identity(cls, model_dict, default)
    if hit is None:
        hit = _identity(cls, model_dict, default)
        if len(_IDENTITIES) >= _MAX_IDENTITIES:
            _IDENTITIES.clear()
        _IDENTITIES[key] = hit
    return hit


@functools.lru_cache(maxsize=256)
def is_openai_compatible(cls: type) -> bool:
    return any((getattr(k, "__module__", "") or "").startswith("llama_index.llms.openai") for k in cls.__mro__)
