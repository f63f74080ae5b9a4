"""Token counting for calls whose provider reported no usage (the span is then flagged ``estimated``), and for a
budget's estimate of a call before it is sent. Every adapter counts through here: one tokenizer, one count cache,
one accounting of a chat request.

A chat request counts as OpenAI's cookbook does: ``3`` (the reply's priming) + for each message ``4`` + its text +
its tool calls (``[{"name", "args"}]`` JSON), + the JSON of the tools it offers; each text with the model's own
tiktoken encoding. ``chat_token_bound`` gives an upper bound of that count without running a tokenizer.

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
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

__all__ = [
    "ESTIMATED", "ESTIMATED_CHARS",
    "PER_MESSAGE", "REPLY_PRIMING", "chat_token_bound", "chat_tokens", "count", "count_text", "encoding_for_model",
    "known_or_bytes", "texts_token_bound", "texts_tokens", "utf8_len", "warm",
]

logger = logging.getLogger("costobs_callbacks")

_URLS = {
    "cl100k_base": "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
    "o200k_base": "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
}
_O200K_PREFIXES = ("gpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "o1", "o3", "o4", "chatgpt-4o", "gpt-oss")
_CL100K_PREFIXES = ("gpt-4", "gpt-3.5", "gpt-35", "text-embedding", "davinci", "babbage")

ESTIMATED = ("estimated",)
"""The flags of a call whose tokens were counted by us (the provider reported none)."""
ESTIMATED_CHARS = ("estimated", "estimate:chars")
"""The same, counted at 4 characters a token (no tokenizer for its model offline)."""

_lock = threading.Lock()
_encoders: dict[str, Callable[[str], list[int]] | None] = {}
"""Encoding name -> its ``encode_ordinary`` (``None``: not available offline)."""


def _reset_lock_in_child() -> None:
    # A fork while another thread (the exporter's, warming the tokenizers) holds the lock would leave it held in
    # the child for ever, and the child's first count would wait on it.
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_lock_in_child)


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


def _load(name: str) -> Callable[[str], list[int]] | None:
    with _lock:
        if name in _encoders:
            return _encoders[name]
        fn: Callable[[str], list[int]] | None = None
        try:
            if _ensure_cached(name):
                import tiktoken

                enc = tiktoken.get_encoding(name)
                # tiktoken's Encoding.encode_ordinary is a Python frame around its native CoreBPE.encode_ordinary:
                # the native one is called directly (see count_text), the public one if its layout differs
                core = getattr(enc, "_core_bpe", None)
                fn = getattr(core, "encode_ordinary", None) or enc.encode_ordinary
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
    try:
        return len(fn(text)), True  # type: ignore[operator]
    except UnicodeEncodeError:  # lone surrogates, which the native encoder refuses: replaced, as tiktoken does
        return len(fn(text.encode("utf-16", "surrogatepass").decode("utf-16", "replace"))), True  # type: ignore[operator]


def warm(*names: str) -> None:
    """Load encodings ahead of time (called from the exporter's thread, off the hot path)."""
    for name in names or tuple(_URLS):
        _load(name)


# -- the count cache -----------------------------------------------------------------------------------

_COUNTS: dict[Any, Any] = {}
"""A text's ``hash((text, len(text), model))`` -> its ``count_text`` as ``2 * count + exact``; also ``(message key, 0,
model)`` -> a whole message's ``(count, exact)`` for adapters whose messages carry an id (see ``chat_tokens``). A
text's entry is two integers, which the garbage collector does not track (a tuple would be one more object for it to
visit, per text counted, bringing its next collection nearer). No text is kept; a hash collision could only misstate
an estimate."""
_MAX_COUNTS = 16_384


def count(text: str, model: str | None) -> tuple[int, bool]:
    """``count_text``, remembered: an agent sends its whole history with every call, and a call's prompt is counted
    for a budget's estimate before it is sent and again at its end when the provider reports no usage."""
    if not text:
        return 0, True
    key = hash((text, len(text), model))
    hit = _COUNTS.get(key)
    if hit is None:
        # count_text(text, model), its common case (an encoder loaded, a text of ordinary length) inline: a prompt
        # seen for the first time is counted on the app's thread, and a Python call costs about as much as the rest
        fn = _encoders.get(encoding_for_model(model)) if len(text) <= MAX_EXACT_CHARS else None
        if fn is not None:
            try:
                n, exact = len(fn(text)), True
            except UnicodeEncodeError:
                n, exact = count_text(text, model)
        else:
            n, exact = count_text(text, model)
        if len(_COUNTS) >= _MAX_COUNTS:
            _COUNTS.clear()
        _COUNTS[key] = 2 * n + exact
        return n, exact
    return hit >> 1, bool(hit & 1)


def utf8_len(text: str) -> int:
    """The UTF-8 length of ``text``: an upper bound of its token count under any byte-level BPE (every token is at
    least one byte) and of the 4-characters-a-token fallback."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def known_or_bytes(text: str, model: str | None) -> tuple[int, bool]:
    """A text's remembered token count, else its UTF-8 length (an upper bound): ``(n, n_is_the_count)``."""
    if not text:
        return 0, True
    hit = _COUNTS.get(hash((text, len(text), model)))
    return (hit >> 1, True) if hit is not None else (utf8_len(text), False)


# -- a chat request ------------------------------------------------------------------------------------

REPLY_PRIMING = 3
"""Tokens of a chat request beside its messages (the reply's priming)."""
PER_MESSAGE = 4
"""Tokens of a message beside its text and tool calls (role and separators)."""


def chat_tokens(model: str | None, messages: Iterable[Any], parts: Callable[[Any], tuple[str, str]],
                tools_json: str = "", id_field: str | None = None) -> tuple[int, bool]:
    """Tokens of a chat request: ``(count, exact_tokenizer_used)``. ``parts(msg)`` gives a message's text and its
    tool calls' JSON ("" without). ``id_field``: the field (in the message's ``__dict__``) of an id that names the
    message wherever it appears (a LangGraph state message's): its whole count is remembered by it, so that ``parts``
    is not even called again."""
    total, exact = REPLY_PRIMING, True
    counts = _COUNTS
    for m in messages:
        k = None
        if id_field is not None:
            d = getattr(m, "__dict__", None)
            if d:
                k = d.get(id_field)
        hit = counts.get((k, 0, model)) if k else None
        if hit is None:
            text, calls = parts(m)
            n, ok = count(text, model) if text else _ZERO
            if calls:
                n2, ok2 = count(calls, model)
                n, ok = n + n2, ok and ok2
            hit = (n, ok)
            if k:
                if len(counts) >= _MAX_COUNTS:
                    counts.clear()
                counts[(k, 0, model)] = hit
        total += PER_MESSAGE + hit[0]
        if not hit[1]:
            exact = False
    if tools_json:
        n, ok = count(tools_json, model)
        total += n
        exact = exact and ok
    return total, exact


_ZERO = (0, True)


def chat_token_bound(model: str | None, messages: Iterable[Any], parts: Callable[[Any], tuple[str, str]],
                     tools_json: str = "", id_field: str | None = None) -> tuple[int, bool]:
    """An upper bound of ``chat_tokens`` without running a tokenizer, and whether it is that count: texts counted
    before count as counted, others one token per UTF-8 byte (``utf8_len``)."""
    total, exact = REPLY_PRIMING, True
    counts = _COUNTS
    for m in messages:
        if id_field is not None:
            d = getattr(m, "__dict__", None)
            k = d.get(id_field) if d else None
            if k:
                hit = counts.get((k, 0, model))
                if hit is not None:
                    total += PER_MESSAGE + hit[0]
                    continue
        text, calls = parts(m)
        total += PER_MESSAGE
        if text:  # known_or_bytes(text, model), inline
            hit = counts.get(hash((text, len(text), model)))
            if hit is None:
                total += len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
                exact = False
            else:
                total += hit >> 1
        if calls:
            n, ok = known_or_bytes(calls, model)
            total += n
            exact = exact and ok
    if tools_json:
        n, ok = known_or_bytes(tools_json, model)
        total += n
        exact = exact and ok
    return total, exact


def texts_tokens(model: str | None, texts: Iterable[str]) -> tuple[int, bool]:
    """Tokens of plain prompt strings (a completion request), summed."""
    total, exact = 0, True
    for t in texts:
        n, ok = count(t, model)
        total += n
        exact = exact and ok
    return total, exact


def texts_token_bound(model: str | None, texts: Iterable[str]) -> tuple[int, bool]:
    """An upper bound of ``texts_tokens`` (see ``chat_token_bound``)."""
    total, exact = 0, True
    for t in texts:
        n, ok = known_or_bytes(t, model)
        total += n
        exact = exact and ok
    return total, exact
