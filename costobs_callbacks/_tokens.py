"""Token counting for calls whose provider reported no usage (the span is then flagged ``estimated``).

tiktoken downloads its encoding files on first use, which locked-down hosts cannot do. We never let it
reach for the network: an encoding is used only when its file is already in tiktoken's cache, or can be
seeded there from the copies llama-index-core ships (``llama_index/core/_static/tiktoken_cache``).
Failing both, a documented estimate is used: one token per 4 characters (flag ``estimate:chars``).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["count_text", "encoding_for_model", "warm"]

logger = logging.getLogger("costobs_callbacks")

_URLS = {
    "cl100k_base": "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
    "o200k_base": "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
}
_O200K_PREFIXES = ("gpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "o1", "o3", "o4", "chatgpt-4o", "gpt-oss")
_CL100K_PREFIXES = ("gpt-4", "gpt-3.5", "gpt-35", "text-embedding", "davinci", "babbage")

_lock = threading.Lock()
_encoders: dict[str, Callable[[str], int] | None] = {}


@functools.lru_cache(maxsize=1024)
def encoding_for_model(model: str | None) -> str:
    """The tiktoken encoding a model uses; o200k_base for unknown models (the newest OpenAI one). Remembered: it is
    looked up for every text counted."""
    m = (model or "").lower().rsplit("/", 1)[-1]
    if m.startswith(_O200K_PREFIXES):
        return "o200k_base"
    if m.startswith(_CL100K_PREFIXES):
        return "cl100k_base"
    return "o200k_base"


def _tiktoken_cache_dir() -> str | None:
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        return os.environ["TIKTOKEN_CACHE_DIR"] or None
    if "DATA_GYM_CACHE_DIR" in os.environ:
        return os.environ["DATA_GYM_CACHE_DIR"] or None
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def _llamaindex_static_dir() -> Path | None:
    try:
        spec = importlib.util.find_spec("llama_index.core")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "_static" / "tiktoken_cache"
        if p.is_dir():
            return p
    return None


def _ensure_cached(name: str) -> bool:
    """True if tiktoken can load ``name`` without the network (seeding its cache if we can)."""
    cache_dir = _tiktoken_cache_dir()
    if cache_dir is None:
        return False
    key = hashlib.sha1(_URLS[name].encode()).hexdigest()
    target = Path(cache_dir) / key
    if target.exists():
        return True
    static = _llamaindex_static_dir()
    if static is None or not (static / key).exists():
        return False
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        shutil.copyfile(static / key, tmp)
        os.replace(tmp, target)
    except OSError as exc:
        logger.debug("could not seed tiktoken's cache: %r", exc)
        return False
    return True


def _load(name: str) -> Callable[[str], int] | None:
    with _lock:
        if name in _encoders:
            return _encoders[name]
        fn: Callable[[str], int] | None = None
        try:
            if _ensure_cached(name):
                import tiktoken

                enc = tiktoken.get_encoding(name)
                encode = enc.encode_ordinary

                def fn(text: str, _e: Any = encode) -> int:
                    return len(_e(text))
        except Exception as exc:  # a broken cache file, an old tiktoken
            logger.warning("tiktoken encoding %s unavailable (%r); estimating 4 characters a token", name, exc)
            fn = None
        if fn is None:
            logger.info("tiktoken encoding %s not available offline; estimating 4 characters a token", name)
        _encoders[name] = fn
        return fn


MAX_EXACT_CHARS = 400_000
"""Longer texts are estimated at 4 characters a token: tokenizing megabytes on the app's thread would
cost it tens of milliseconds for a figure that is an estimate anyway."""


def count_text(text: str, model: str | None = None) -> tuple[int, bool]:
    """Tokens in ``text`` for ``model``: ``(count, exact_tokenizer_used)``."""
    if not text:
        return 0, True
    if len(text) > MAX_EXACT_CHARS:
        return (len(text) + 3) // 4, False
    name = encoding_for_model(model)
    fn = _encoders.get(name, _encoders)  # sentinel: not loaded yet
    if fn is _encoders:
        fn = _load(name)
    if fn is None:
        return (len(text) + 3) // 4, False
    return fn(text), True  # type: ignore[operator]


def warm(*names: str) -> None:
    """Load encodings ahead of time (called from the exporter's thread, off the hot path)."""
    for name in names or tuple(_URLS):
        _load(name)
