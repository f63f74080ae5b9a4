"""Every threshold, once: budgets (counts, tokens, time, cost after a call) and the loop guard (depth, steps,
repeated requests, tool cycles), checked before a paid call and after it. A refusal raises ``RunAborted``."""

from __future__ import annotations

import json
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from .._events import nanos_to_usd
from .._exceptions import BudgetExceededError, LoopDetectedError, RunAborted
from .._policy import Budget, BudgetHook, BudgetWarning, LoopPolicy
from .holds import _give_back
from .model import _DEFERRED, COST_KINDS, Run, Span, _usd, logger

if TYPE_CHECKING:
    from .._caps import SpendCaps
    from .._pricing import PriceBook


def canonical_args(args: Any) -> str:
    """A stable text for a tool's arguments (key order and whitespace do not matter)."""
    if isinstance(args, str):
        s = args.strip()
        if s[:1] in ("{", "["):
            try:
                return json.dumps(json.loads(s), sort_keys=True, separators=(",", ":"), default=str)
            except ValueError:
                return s
        return s
    try:
        return json.dumps(args, sort_keys=True, separators=(",", ":"), default=str)
    except (TypeError, ValueError):
        return repr(args)


def _find_cycle(window: list[Any], max_period: int, repeats: int) -> list[Any] | None:
    for period in range(2, max_period + 1):
        need = period * repeats
        if len(window) < need:
            continue
        tail = window[-need:]
        unit = tail[:period]
        if len(set(unit)) < 2:
            continue  # one repeated call is the identical-call rule's business
        if all(tail[i] == unit[i % period] for i in range(need)):
            return unit
    return None


def _again(err: RunAborted) -> RunAborted:
    """A fresh instance of a sticky abort (re-raising one instance grows its traceback forever)."""
    new = type(err)(err.message, run_id=err.run_id, reason=err.reason, limit=err.limit, spent=err.spent,
                    spent_usd=err.spent_usd, detail=err.detail)
    return new


class GuardsMixin:
    """A ledger's guards (``Ledger`` is made of this and the attribution's and holds' mixins)."""

    if TYPE_CHECKING:  # set by Ledger.__init__, or defined by HoldsMixin
        prices: PriceBook
        on_budget_warning: BudgetHook | None
        _budget_limits: tuple[Budget | None, float | None, int | None, int | None, int | None]
        _loops_memo: tuple[LoopPolicy | None, int | None, int | None, int | None]

        def _check_llm_estimate(self, run: Run, span: Span, budget: Budget) -> None: ...

        def _reserve(self, run: Run, span: Span, budget: Budget, estimate: int, what: str, detail: dict[str, Any],
                     least: int | None = None) -> None: ...

        caps: SpendCaps | None

        def cap_estimate(self, span: Span) -> int: ...

        def settle_run(self, run: Run) -> None: ...

    def _guard_start(self, run: Run, span: Span, kind: str, name: str, tool_args: Any) -> None:
        if run.aborted is not None:
            raise _again(run.aborted)
        if run.pending:  # calls whose count was left for later: every check below reads the run's totals
            self.settle_run(run)
        loops = run.loops
        budget = run.budget
        max_steps = max_reqs = None
        if loops is not None:
            # The policy's limits as plain values, read once per policy object (a pydantic model's attributes
            # cost several times a plain one's).
            lm = self._loops_memo
            if lm[0] is not loops:
                lm = self._loops_memo = (loops, loops.max_depth, loops.max_steps, loops.max_identical_model_requests)
            max_depth, max_steps, max_reqs = lm[1], lm[2], lm[3]
        if loops is not None and max_depth is not None and span.depth > max_depth:
            self._abort(run, LoopDetectedError(
                f"run {run.run_id} nested {span.depth} levels deep (max_depth={loops.max_depth}): "
                f"agents or chains calling each other without end; refused {kind} {name!r}",
                run_id=run.run_id, reason="max_depth", limit=loops.max_depth, spent=span.depth,
                detail={"kind": kind, "name": name},
            ))
        if kind in COST_KINDS:
            # Count the call before checking it, under the run's lock, so that concurrent calls (a ToolNode
            # runs one message's tool calls in parallel) never pass a count limit together.
            with run.lock:
                run.steps += 1
                steps = run.steps
                if kind == "tool":
                    run.tool_calls += 1
                    nth = run.tool_calls
                else:
                    run.llm_calls += 1
                    nth = run.llm_calls
            if budget is None and self.caps is None:  # spend caps hook: capped trackers take the full checks
                if loops is None:
                    return
                if kind != "tool" and (max_steps is None or steps <= max_steps):
                    # A model call under the loop guard alone (the common case): what _check_loops would find,
                    # without the calls, as long as nothing can refuse it.
                    if max_reqs is None or span.prompt is None or span.prompt_ops is None:
                        return
                    if span.is_root and max_reqs > 1 and not run.model_reqs:
                        span.request_sig = _DEFERRED
                        return
                    # _check_loops's identical-request rule, inline: a request seen fewer than max_reqs - 1 times
                    # passes with its signature; one that would be refused takes the full checks, which refuse it.
                    sig = span.prompt_ops.signature(span.model, span.prompt)
                    reqs = run.model_reqs
                    if reqs is None or reqs.get(sig, 0) + 1 < max_reqs:
                        span.request_sig = sig
                        return
            try:
                self._check_call_start(run, span, budget, loops, tool_args, nth, steps)
            except RunAborted:
                self._withdraw(run, span)
                raise
        elif budget is not None and budget.max_seconds is not None:
            self._check_seconds(run, budget)

    @staticmethod
    def _withdraw(run: Run, span: Span) -> None:
        """A paid call refused at its start was never made: its counts and what it held of the budget are taken
        back."""
        with run.lock:
            run.steps -= 1
            if span.kind == "tool":
                run.tool_calls -= 1
            else:
                run.llm_calls -= 1
            if span.reserved:
                _give_back(run, span)

    def _check_seconds(self, run: Run, budget: Budget) -> None:
        assert budget.max_seconds is not None
        elapsed = time.perf_counter() - run.started_perf
        if elapsed > budget.max_seconds:
            self._abort(run, BudgetExceededError(
                f"run {run.run_id} exceeded max_seconds={budget.max_seconds:g} "
                f"(running for {elapsed:.1f}s); spent {_usd(run.cost_nanos)}",
                run_id=run.run_id, reason="max_seconds", limit=budget.max_seconds, spent=elapsed,
            ))

    def _check_call_start(
        self, run: Run, span: Span, budget: Budget | None, loops: LoopPolicy | None, tool_args: Any, nth: int,
        steps: int,
    ) -> None:
        """``nth``: this call's number among the run's tool (or LLM) calls; ``steps``: among all its calls."""
        kind = span.kind
        if budget is not None:
            bl = self._budget_limits
            if bl[0] is not budget:  # the budget's limits as plain values, read once per budget object
                bl = self._budget_limits = (budget, budget.max_seconds, budget.max_tool_calls, budget.max_llm_calls,
                                            budget.max_tokens)
            if bl[1] is not None:
                self._check_seconds(run, budget)
            if kind == "tool":
                if bl[2] is not None and nth > bl[2]:
                    self._abort(run, BudgetExceededError(
                        f"run {run.run_id} refused tool call {nth} ({span.name!r}): "
                        f"max_tool_calls={budget.max_tool_calls}; spent {_usd(run.cost_nanos)}",
                        run_id=run.run_id, reason="max_tool_calls", limit=budget.max_tool_calls,
                        spent=nth - 1, spent_usd=nanos_to_usd(run.cost_nanos),
                        detail={"tool": span.name},
                    ))
                if run.max_cost_nanos is not None:
                    price = self.prices.tool_price_nanos(span.name)
                    if price:
                        self._reserve(run, span, budget, price, f"tool {span.name!r} costing {_usd(price)}",
                                      {"tool": span.name})
            else:
                if bl[3] is not None and nth > bl[3]:
                    self._abort(run, BudgetExceededError(
                        f"run {run.run_id} refused LLM call {nth} ({span.model or span.name}): "
                        f"max_llm_calls={budget.max_llm_calls}; spent {_usd(run.cost_nanos)}",
                        run_id=run.run_id, reason="max_llm_calls", limit=budget.max_llm_calls,
                        spent=nth - 1, spent_usd=nanos_to_usd(run.cost_nanos),
                        detail={"model": span.model},
                    ))
                if bl[4] is not None and run.input + run.output >= bl[4]:
                    self._abort(run, BudgetExceededError(
                        f"run {run.run_id} refused an LLM call: {run.input + run.output} tokens used of "
                        f"max_tokens={budget.max_tokens}",
                        run_id=run.run_id, reason="max_tokens", limit=budget.max_tokens,
                        spent=run.input + run.output, spent_usd=nanos_to_usd(run.cost_nanos),
                    ))
                if run.max_cost_nanos is not None:
                    self._check_llm_estimate(run, span, budget)
        if loops is not None:
            self._check_loops(run, span, loops, tool_args, steps)
        if kind != "tool" and self.caps is not None:  # spend caps hook: last, so that nothing refuses after its holds
            self.caps.admit(run, span, self)

    def _check_loops(self, run: Run, span: Span, loops: LoopPolicy, tool_args: Any, steps: int) -> None:
        if loops.max_steps is not None and steps > loops.max_steps:
            self._abort(run, LoopDetectedError(
                f"run {run.run_id} reached max_steps={loops.max_steps} LLM and tool calls; refused "
                f"{span.kind} {span.model or span.name!r}; spent {_usd(run.cost_nanos)}",
                run_id=run.run_id, reason="max_steps", limit=loops.max_steps, spent=steps - 1,
                spent_usd=nanos_to_usd(run.cost_nanos),
            ))
        if span.kind == "tool":
            sig = (span.name, canonical_args(tool_args))
            with run.lock:
                repeat = run.tool_repeat + 1 if sig == run.last_tool_sig else 1
                seq = run.tool_seq
                if seq is None:
                    seq = run.tool_seq = deque(maxlen=loops.max_cycle_period * (loops.cycle_repeats or 1) + 1)
                window = [*seq, sig]
            limit = loops.max_identical_tool_calls
            if limit is not None and repeat >= limit:
                self._abort(run, LoopDetectedError(
                    f"run {run.run_id} called tool {span.name!r} with the same arguments {repeat} times in a row "
                    f"(max_identical_tool_calls={limit}); the call was refused",
                    run_id=run.run_id, reason="tool_repeat", limit=limit, spent=repeat,
                    spent_usd=nanos_to_usd(run.cost_nanos), detail={"tool": span.name, "arguments": sig[1][:200]},
                ))
            if loops.cycle_repeats is not None:
                cyc = _find_cycle(window, loops.max_cycle_period, loops.cycle_repeats)
                if cyc is not None:
                    names = " -> ".join(s[0] for s in cyc)
                    self._abort(run, LoopDetectedError(
                        f"run {run.run_id} repeats the tool cycle {names} {loops.cycle_repeats} times "
                        f"(cycle_repeats={loops.cycle_repeats}); the call was refused",
                        run_id=run.run_id, reason="tool_cycle", limit=loops.cycle_repeats,
                        spent=loops.cycle_repeats, spent_usd=nanos_to_usd(run.cost_nanos),
                        detail={"cycle": [s[0] for s in cyc]},
                    ))
            with run.lock:
                run.last_tool_sig = sig
                run.tool_repeat = repeat
                seq.append(sig)
        elif loops.max_identical_model_requests is not None and span.prompt_ops is not None and span.prompt is not None:
            if span.is_root and loops.max_identical_model_requests > 1 and not run.model_reqs:
                # The run has no successful model request yet, so this one repeats nothing: its signature is only
                # needed to count it, at its end, and only if the run goes on after it (see _end_root).
                span.request_sig = _DEFERRED
                return
            sig_i = span.prompt_ops.signature(span.model, span.prompt)
            span.request_sig = sig_i
            reqs = run.model_reqs
            seen = reqs.get(sig_i, 0) if reqs is not None else 0
            if seen + 1 >= loops.max_identical_model_requests:
                self._abort(run, LoopDetectedError(
                    f"run {run.run_id} sent the same request to {span.model} {seen + 1} times "
                    f"(max_identical_model_requests={loops.max_identical_model_requests}); the call was refused",
                    run_id=run.run_id, reason="model_repeat", limit=loops.max_identical_model_requests,
                    spent=seen + 1, spent_usd=nanos_to_usd(run.cost_nanos), detail={"model": span.model},
                ))

    def _check_after(self, run: Run, span: Span) -> None:
        budget = run.budget
        assert budget is not None
        if self.on_budget_warning is not None:
            self._maybe_warn(run, budget)
        if run.max_cost_nanos is not None and run.cost_nanos > run.max_cost_nanos:
            self._abort(run, BudgetExceededError(
                f"run {run.run_id} spent {_usd(run.cost_nanos)}, past max_cost_usd=${budget.max_cost_usd}, "
                f"after {span.kind} {span.model or span.name!r}; stopped",
                run_id=run.run_id, reason="max_cost_usd", limit=budget.max_cost_usd,
                spent=nanos_to_usd(run.cost_nanos), spent_usd=nanos_to_usd(run.cost_nanos),
            ))
        if budget.max_tokens is not None and run.input + run.output > budget.max_tokens:
            self._abort(run, BudgetExceededError(
                f"run {run.run_id} used {run.input + run.output} tokens, past max_tokens={budget.max_tokens}; stopped",
                run_id=run.run_id, reason="max_tokens", limit=budget.max_tokens,
                spent=run.input + run.output, spent_usd=nanos_to_usd(run.cost_nanos),
            ))

    def _maybe_warn(self, run: Run, budget: Budget) -> None:
        hook = self.on_budget_warning
        assert hook is not None
        checks: list[tuple[str, Any, Any, float]] = []
        if run.max_cost_nanos is not None:
            checks.append(("max_cost_usd", budget.max_cost_usd, nanos_to_usd(run.cost_nanos),
                           run.cost_nanos / run.max_cost_nanos))
        if budget.max_tokens is not None:
            t = run.input + run.output
            checks.append(("max_tokens", budget.max_tokens, t, t / budget.max_tokens))
        if budget.max_llm_calls is not None:
            checks.append(("max_llm_calls", budget.max_llm_calls, run.llm_calls, run.llm_calls / budget.max_llm_calls))
        if budget.max_tool_calls:
            checks.append(("max_tool_calls", budget.max_tool_calls, run.tool_calls,
                           run.tool_calls / budget.max_tool_calls))
        if budget.max_seconds is not None:
            el = time.perf_counter() - run.started_perf
            checks.append(("max_seconds", budget.max_seconds, el, el / budget.max_seconds))
        for name, limit, spent, ratio in checks:
            if ratio >= budget.warn_at:
                with run.lock:
                    if run.warned is None:
                        run.warned = set()
                    if name in run.warned:
                        continue
                    run.warned.add(name)
                try:
                    hook(BudgetWarning(run.run_id, name, limit, spent, run.public_attributes()))
                except Exception:
                    logger.exception("costobs: on_budget_warning hook failed")

    def _abort(self, run: Run, err: RunAborted) -> None:
        if err.spent_usd is None:
            err.spent_usd = nanos_to_usd(run.cost_nanos)
        with run.lock:
            if run.aborted is None:
                run.aborted = err
                run.status = "aborted"
        logger.warning("costobs: %s", err)
        raise err

