"""What a LangChain call's request holds, for the ledger's estimates and counts: its prompt (chat messages or
plain strings) as a signature, a token count and a token upper bound, and the ``max_tokens`` and tool schemas
beside it. The ledger calls these only when a budget or a missing usage report needs them (``prompt_ops``)."""

from __future__ import annotations

import json
from typing import Any

from ..._tokens import chat_token_bound, chat_tokens, texts_token_bound, texts_tokens

__all__ = ["MESSAGES", "STRINGS", "message_text"]

_EMPTY: dict[str, Any] = {}  # read-only


class _RequestOps:
    """What a LangChain call's request says beside its prompt, read only when needed (a budget's estimate, a
    count of the tokens of a call that reported none): ``extra`` is ``(invocation params, metadata)``."""

    @staticmethod
    def max_tokens(extra: Any) -> int | None:
        ip, meta = extra
        n = ip.get("max_tokens") or ip.get("max_completion_tokens") or meta.get("ls_max_tokens")
        return n if type(n) is int and n > 0 else None

    @staticmethod
    def tools(extra: Any) -> Any:
        """The tool (or function) schemas the request sends, counted as prompt tokens."""
        return extra[0].get("tools") or extra[0].get("functions") if extra else None


class _MessagesOps(_RequestOps):
    """Prompt operations on LangChain message lists (``on_chat_model_start``'s payload)."""

    @staticmethod
    def signature(model: str | None, prompt: Any) -> int:
        msgs = prompt[0] if prompt else ()
        parts: list[Any] = [model]
        append = parts.append
        for m in msgs:
            # Fields are read from __dict__: getattr of a field a pydantic message lacks (a HumanMessage's
            # tool_calls) raises and catches an exception inside pydantic, message by message, call by call.
            d = getattr(m, "__dict__", None) or {}
            mid = d.get("id")
            if mid:
                # A message with an id (LangGraph gives every state message one) is the same message
                # wherever it appears: an agent's history costs one lookup per message, not a repr.
                append(mid)
                continue
            c = d.get("content", m)
            if not isinstance(c, str):
                c = repr(c)
            tc = d.get("tool_calls")
            if tc:
                append((d.get("type"), c, repr([(t.get("name"), t.get("args")) for t in tc])))
            else:
                append((d.get("type"), c))
        return hash(tuple(parts))

    @staticmethod
    def count_tokens(model: str | None, prompt: Any, extra: Any) -> tuple[int, bool]:
        """The request's tokens (``chat_tokens``' accounting), its messages read by ``_message_parts``; a message
        with an id is counted once wherever it appears (fields are read from ``__dict__``: see ``signature``)."""
        tools = _RequestOps.tools(extra)
        return chat_tokens(model, prompt[0] if prompt and len(prompt) == 1 else _messages(prompt), _message_parts,
                           json.dumps(tools, default=str) if tools else "", "id")

    @staticmethod
    def token_upper_bound(model: str | None, prompt: Any, extra: Any) -> tuple[int, bool]:
        """An upper bound of ``count_tokens`` without running a tokenizer, and whether it is that count
        (``chat_token_bound``: texts not counted before count one token per UTF-8 byte)."""
        tools = _RequestOps.tools(extra)
        return chat_token_bound(model, prompt[0] if prompt and len(prompt) == 1 else _messages(prompt),
                                _message_parts, json.dumps(tools, default=str) if tools else "", "id")


def _messages(prompt: Any) -> Any:
    """The messages of ``on_chat_model_start``'s payload (a list of message lists), in one pass."""
    if not prompt:
        return ()
    if len(prompt) == 1:
        return prompt[0]
    return [m for msgs in prompt for m in msgs]


def _message_parts(m: Any) -> tuple[str, str]:
    """A message's text and its tool calls as ``[{"name", "args"}]`` JSON ("" without)."""
    d = getattr(m, "__dict__", None) or _EMPTY
    tc = d.get("tool_calls")
    calls = json.dumps([{"name": t.get("name"), "args": t.get("args")} for t in tc], default=str) if tc else ""
    c = d.get("content")
    return (c if type(c) is str else message_text(m)), calls


class _StringsOps(_RequestOps):
    """Prompt operations on plain prompt strings (``on_llm_start``'s payload)."""

    @staticmethod
    def signature(model: str | None, prompt: Any) -> int:
        return hash((model, tuple(prompt or ())))

    @staticmethod
    def count_tokens(model: str | None, prompt: Any, extra: Any) -> tuple[int, bool]:
        return texts_tokens(model, [p if isinstance(p, str) else str(p) for p in prompt or ()])

    @staticmethod
    def token_upper_bound(model: str | None, prompt: Any, extra: Any) -> tuple[int, bool]:
        """See ``_MessagesOps.token_upper_bound``: one token per UTF-8 byte for a text not counted before."""
        return texts_token_bound(model, [p if isinstance(p, str) else str(p) for p in prompt or ()])


MESSAGES = _MessagesOps()
STRINGS = _StringsOps()


def message_text(m: Any) -> str:
    """A message's text: its string content, or the text parts of a list of content blocks."""
    c = getattr(m, "content", m)
    if isinstance(c, str):
        return c
    if isinstance(c, list):
        out = []
        for part in c:
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                out.append(part["text"])
        return "".join(out)
    return str(c)
