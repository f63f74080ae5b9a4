"""LangChain / LangGraph adapter: a thin translator from langchain-core callback events to the ledger.

One ``CostCallbackHandler`` serves every thread and task of the app. It sets ``raise_error=True`` so
that a deliberate ``RunAborted`` reaches the app (LangChain logs and drops a handler's exceptions
otherwise), and guards every hook so that nothing else of ours ever does. It sets ``run_inline=True``:
its hooks do no I/O, so async runs call them inline instead of hopping to a thread pool, and an abort
raised in them propagates from ``ainvoke`` / ``astream`` just as from ``invoke``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.outputs import LLMResult

from ... import _usage
from ..._errors import Faults
from ..._events import COST_EVENT, TokenUsage, UsageDetail, usd_to_nanos
from ..._exceptions import RunAborted
from ..._ledger import Tokens, tokens_of
from ..._tokens import count_text
from .prompts import _EMPTY, MESSAGES, STRINGS

if TYPE_CHECKING:
    from ..._ledger import Ledger

__all__ = ["COST_EVENT", "CostCallbackHandler"]

logger = logging.getLogger("costobs_callbacks")

_BUBBLE_UP = frozenset({"GraphInterrupt", "NodeInterrupt", "ParentCommand", "GraphBubbleUp"})


# Usage is read by _usage (one parser for every adapter); by these names so that a profiler can wrap them.
usage_from_metadata = _usage.from_langchain
"""``AIMessage.usage_metadata`` (and ``response_metadata``) -> ``_usage.Parsed`` (``None``: no report)."""


def usage_from_openai(tu: Any, service_tier: Any = None) -> _usage.Parsed | None:
    """An OpenAI-style ``token_usage`` dict (``llm_output``) -> ``_usage.Parsed`` (``None``: no report)."""
    if not isinstance(tu, dict):
        raise ValueError(f"token_usage is {type(tu).__name__}")
    if not any(k in tu for k in ("prompt_tokens", "completion_tokens", "input_tokens", "output_tokens")):
        raise ValueError("no token counts")  # a token_usage without counts is a malformed report, not none
    return _usage.from_mapping(tu, service_tier)


_PLAUSIBLE = _usage.PLAUSIBLE_TOKENS
_common_usage = _usage.common_langchain


class CostCallbackHandler(BaseCallbackHandler):
    """Attributes, prices and guards every LangChain run it sees. Get it from
    ``CostTracker.langchain_handler()``; one instance is shared by all threads and tasks."""

    raise_error = True
    run_inline = True

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger
        self._faults = Faults(ledger, "LangChain")

    def __repr__(self) -> str:
        return f"<CostCallbackHandler open_spans={len(self._ledger.spans)}>"

    def __deepcopy__(self, memo: dict[int, Any]) -> CostCallbackHandler:
        return self  # configs get deep-copied; the handler is shared state by design

    def __copy__(self) -> CostCallbackHandler:
        return self

    @property
    def internal_errors(self) -> int:
        """Exceptions of our own this handler caught (see ``_errors.Faults``)."""
        return self._faults.count

    def _fault(self, hook: str, exc: BaseException) -> None:
        """Our own bug or a payload we could not read: count, log (rate-limited), carry on."""
        self._faults(hook, exc)

    # -- chains / graph nodes ----------------------------------------------------------------------

    def on_chain_start(
        self,
        serialized: dict[str, Any] | None,
        inputs: Any,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        try:
            name = kwargs.get("name") or _name(serialized) or "chain"
            hidden = bool(tags) and "langsmith:hidden" in tags  # type: ignore[operator]
            self._ledger.start_span(run_id, parent_run_id, "chain", name, metadata, exported=not hidden)
        except RunAborted:
            raise
        except Exception as exc:
            self._fault("on_chain_start", exc)

    def on_chain_end(self, outputs: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self._end_span("on_chain_end", run_id)

    def on_chain_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        if type(error).__name__ in _BUBBLE_UP:  # LangGraph control flow (interrupts), not a failure
            self._end_span("on_chain_error", run_id)
        else:
            self._fail_span("on_chain_error", run_id, error)

    def _end_span(self, hook: str, run_id: UUID) -> None:
        """A chain's, tool's or retriever's end: a deliberate abort goes up, anything else of ours is logged."""
        try:
            self._ledger.end(run_id)
        except RunAborted:
            raise
        except Exception as exc:
            self._fault(hook, exc)

    def _fail_span(self, hook: str, run_id: UUID, error: BaseException) -> None:
        """A chain's, tool's or retriever's error: the span ends failed; an abort already on its way up (``error``
        is one) is not raised a second time."""
        try:
            self._ledger.end(run_id, status="error", error=error)
        except RunAborted:
            if isinstance(error, RunAborted):
                return
            raise
        except Exception as exc:
            self._fault(hook, exc)

    # -- models ------------------------------------------------------------------------------------

    def on_chat_model_start(
        self,
        serialized: dict[str, Any] | None,
        messages: list[list[Any]],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        try:
            # _model_start(serialized, messages, MESSAGES, ...), inlined: this is the hottest hook.
            ip = kwargs.get("invocation_params") or _EMPTY
            meta = metadata or _EMPTY
            model = ip.get("model") or ip.get("model_name") or meta.get("ls_model_name")
            if type(model) is not str and model is not None:
                model = str(model)
            provider = meta.get("ls_provider") or ip.get("_type")
            if type(provider) is not str and provider is not None:
                provider = str(provider)
            name = kwargs.get("name") or (serialized.get("name") if serialized else None)
            if type(name) is not str:
                name = _name(serialized) or "llm"
            # The request (extra) is read only if needed: its max_tokens and tools, see _RequestOps.
            self._ledger.start_llm(run_id, parent_run_id, name, metadata, model, provider, messages, MESSAGES,
                                   (ip, meta))
        except RunAborted:
            raise
        except Exception as exc:
            self._fault("on_chat_model_start", exc)

    def on_llm_start(
        self,
        serialized: dict[str, Any] | None,
        prompts: list[str],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        try:
            self._model_start(serialized, prompts, STRINGS, run_id, parent_run_id, metadata, kwargs)
        except RunAborted:
            raise
        except Exception as exc:
            self._fault("on_llm_start", exc)

    def _model_start(
        self, serialized: dict[str, Any] | None, prompt: Any, ops: Any, run_id: UUID, parent_run_id: UUID | None,
        metadata: dict[str, Any] | None, kwargs: dict[str, Any],
    ) -> None:
        # on_chat_model_start inlines this (the hottest hook); tests/test_fast_paths.py feeds both the same events.
        ip = kwargs.get("invocation_params") or _EMPTY
        meta = metadata or _EMPTY
        model = ip.get("model") or ip.get("model_name") or meta.get("ls_model_name")
        if type(model) is not str and model is not None:
            model = str(model)
        provider = meta.get("ls_provider") or ip.get("_type")
        if type(provider) is not str and provider is not None:
            provider = str(provider)
        name = kwargs.get("name") or (serialized.get("name") if serialized else None)
        if type(name) is not str:
            name = _name(serialized) or "llm"
        self._ledger.start_llm(run_id, parent_run_id, name, metadata, model, provider, prompt, ops, (ip, meta))

    def on_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any) -> None:
        try:
            # The commonest reply first: one generation, a message with its usage and the model that served it.
            try:
                gens: Any = response.generations
                [[gen]] = gens
                msg = gen.message
                um = msg.usage_metadata
                rm = msg.response_metadata
                m = rm.get("model_name") or rm.get("model")
                i = um["input_tokens"]
                o = um["output_tokens"]
            except Exception:  # another shape (several generations, no message, no usage): the full path
                pass
            else:
                if (type(i) is int and type(o) is int and 0 < i <= _PLAUSIBLE and 0 <= o <= _PLAUSIBLE
                        and type(m) is str and m and type(um) is dict
                        and "total_cost" not in um):  # total_cost: an LLM-cache hit
                    key = run_id.int if type(run_id) is UUID else run_id
                    if not (um.get("input_token_details") or um.get("output_token_details")):
                        self._ledger.end_llm(key, (i, o, 0, 0, 0), m)
                        return
                    t = _common_usage(um, rm)  # None: tiers, cache lifetimes, web searches, oddities: the full path
                    if t is not None:
                        self._ledger.end_llm(key, t, m)
                        return
            self._model_end(response, run_id, "ok", None)
        except RunAborted:
            raise
        except Exception as exc:
            self._fault("on_llm_end", exc)
            self._end_quietly(run_id, "ok", None)

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        try:
            resp = kwargs.get("response")
            self._model_end(resp if isinstance(resp, LLMResult) else None, run_id, "error", error)
        except RunAborted:
            raise
        except Exception as exc:
            self._fault("on_llm_error", exc)
            self._end_quietly(run_id, "error", error)

    def _end_quietly(self, run_id: UUID, status: str, error: BaseException | None) -> None:
        try:
            self._ledger.end(run_id, status=status, error=error, flags=("internal_error",))
        except RunAborted:
            raise
        except Exception as exc:  # pragma: no cover - belt and braces
            self._fault("end", exc)

    def _model_end(self, response: LLMResult | None, run_id: UUID, status: str, error: BaseException | None) -> None:
        key = run_id.int if type(run_id) is UUID else run_id
        span = self._ledger.spans.get(key)
        if span is None:
            return
        parsed: _usage.Parsed | None = None
        reported = False  # a usage report was seen (the first one counts, as read)
        model: str | None = None
        cache_hit = False
        flags: list[str] = []
        if response is not None:
            for gens in response.generations or ():
                for gen in gens:
                    msg = getattr(gen, "message", None)
                    if msg is not None:
                        rm = getattr(msg, "response_metadata", None)
                        if model is None and rm and isinstance(rm, dict):
                            m = rm.get("model_name") or rm.get("model")
                            model = m if isinstance(m, str) else None
                        if not reported:
                            um = getattr(msg, "usage_metadata", None)
                            if um:
                                reported = True
                                try:
                                    parsed = usage_from_metadata(um, rm)
                                    if "total_cost" in um:  # set by langchain-core on LLM-cache hits only
                                        cache_hit = True
                                except (ValueError, TypeError):
                                    flags.append("malformed_usage")
                    if model is None:
                        gi = getattr(gen, "generation_info", None)
                        if gi and isinstance(gi, dict) and isinstance(gi.get("model_name"), str):
                            model = gi["model_name"]
            lo = response.llm_output
            if isinstance(lo, dict):
                if model is None and isinstance(lo.get("model_name"), str):
                    model = lo["model_name"]
                if not reported and lo.get("token_usage"):
                    reported = True
                    try:
                        parsed = usage_from_openai(lo["token_usage"], lo.get("service_tier"))
                    except (ValueError, TypeError):
                        if "malformed_usage" not in flags:
                            flags.append("malformed_usage")
        tokens: Tokens | None = None
        detail: UsageDetail | None = None
        estimated = False
        if parsed is not None:
            for f in parsed.flags:
                if f not in flags:
                    flags.append(f)
            detail = parsed.detail
            tokens = parsed.tokens
            if parsed.missing:  # a count the provider left out: estimated, never a silent 0
                out_text = _output_text(response) if response is not None else []
                tokens = _usage.complete(parsed, tokens_of(self._estimate(span, model, out_text)))
                estimated = True
                flags.append("estimated")
            if detail is not None and detail.service_tier is not None:
                flags.extend(self._tier_flag(key, model or span.model, detail))
        elif cache_hit:
            tokens = (0, 0, 0, 0, 0)  # a cached reply that reported nothing: nothing saved, nothing spent
        if tokens is None:
            out_text = _output_text(response) if response is not None else []  # only needed to estimate
            if status == "ok" or out_text:
                tokens = tokens_of(self._estimate(span, model, out_text))
                estimated = True
                flags.append("estimated")
        usage = None if tokens is None else TokenUsage(*tokens)
        # end(span_id, status, error, usage, model, estimated, cache_hit, flags, detail), by position: cheaper.
        self._ledger.end(key, status, error, usage, model, estimated, cache_hit, flags, detail)

    def _tier_flag(self, key: Any, model: str | None, detail: UsageDetail) -> tuple[str, ...]:
        """``("tier_unpriced",)`` for a call in a service tier the catalog has no price for (priced at the
        standard rates), else ``()``."""
        span = self._ledger.spans.get(key)
        provider = span.provider if span is not None else None
        if model is None and span is not None:
            model = span.model
        return () if self._ledger.prices.has_tier(model, provider, detail.service_tier) else ("tier_unpriced",)

    @staticmethod
    def _estimate(span: Any, model: str | None, out_text: Sequence[str]) -> TokenUsage:
        m = model or span.model
        inp, ok_in = (0, True)
        if span.prompt is not None and span.prompt_ops is not None:
            inp, ok_in = span.prompt_ops.count_tokens(m, span.prompt, span.extra)
        out, ok_out = count_text("".join(out_text), m)
        if not (ok_in and ok_out):
            span.flag("estimate:chars")
        return TokenUsage(input=inp, output=out)

    # -- tools and retrievers ----------------------------------------------------------------------

    def on_tool_start(
        self,
        serialized: dict[str, Any] | None,
        input_str: str,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        inputs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        try:
            name = kwargs.get("name") or _name(serialized) or "tool"
            self._ledger.start_span(run_id, parent_run_id, "tool", name, metadata,
                                    tool_args=inputs if inputs is not None else input_str)
        except RunAborted:
            raise
        except Exception as exc:
            self._fault("on_tool_start", exc)

    def on_tool_end(self, output: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self._end_span("on_tool_end", run_id)

    def on_tool_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._fail_span("on_tool_error", run_id, error)

    def on_retriever_start(
        self,
        serialized: dict[str, Any] | None,
        query: str,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        try:
            name = kwargs.get("name") or _name(serialized) or "retriever"
            self._ledger.start_span(run_id, parent_run_id, "retriever", name, metadata)
        except RunAborted:
            raise
        except Exception as exc:
            self._fault("on_retriever_start", exc)

    def on_retriever_end(self, documents: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self._end_span("on_retriever_end", run_id)

    def on_retriever_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._fail_span("on_retriever_error", run_id, error)

    # -- costs reported at run time ----------------------------------------------------------------

    def on_custom_event(
        self, name: str, data: Any, *, run_id: UUID, tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None, **kwargs: Any,
    ) -> None:
        if name != COST_EVENT:
            return
        try:
            usd = data.get("usd") if isinstance(data, dict) else data
            nanos = usd_to_nanos(usd)
            if nanos < 0:
                raise ValueError(f"negative cost {usd!r}")
            if not self._ledger.add_cost(run_id, nanos):
                logger.warning("costobs: %s event outside any open span (run %s) ignored", COST_EVENT, run_id)
        except Exception as exc:
            self._fault("on_custom_event", exc)


def _output_text(response: LLMResult) -> list[str]:
    """The reply's text and tool calls, what the output-token estimate counts."""
    out: list[str] = []
    for gens in response.generations or ():
        for gen in gens:
            text = getattr(gen, "text", None)
            if isinstance(text, str) and text:
                out.append(text)
            msg = getattr(gen, "message", None)
            if msg is not None:
                tc = getattr(msg, "tool_calls", None)
                if tc:
                    out.append(json.dumps([{"name": t.get("name"), "args": t.get("args")} for t in tc], default=str))
    return out


def _name(serialized: dict[str, Any] | None) -> str | None:
    if not serialized:
        return None
    n = serialized.get("name")
    if isinstance(n, str):
        return n
    ident = serialized.get("id")
    if isinstance(ident, list) and ident:
        return str(ident[-1])
    return None
