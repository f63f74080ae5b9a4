"""Budget reservations: a paid call holds its cost estimate (its prompt counted, its output bounded) from its
start to its end, so that concurrent calls of one run cannot pass its ``max_cost_usd`` together."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .._events import nanos_to_usd
from .._exceptions import BudgetExceededError, RunAborted
from .._policy import Budget
from .model import Run, Span, _usd, logger, max_output_tokens

if TYPE_CHECKING:
    from .._pricing import PriceBook


_MAX_MODELS_SEEN = 1024


DEFAULT_OUTPUT_HOLD = 4096
"""Output tokens a budget holds for a call without ``max_tokens`` of a model with no known outputs and no known
context window (see ``Ledger.output_hold``)."""


def _give_back(run: Run, span: Span) -> None:
    """Under ``run.lock``: what ``span`` held of its run's budget is given back (the call ended, or was refused)."""
    run.reserved_nanos -= span.reserved
    span.reserved = 0
    if run.loose_holds:
        run.loose_holds.discard(span)


class HoldsMixin:
    """A ledger's budget holds (``Ledger`` is made of this and the attribution's and guards' mixins)."""

    if TYPE_CHECKING:  # set by Ledger.__init__, or defined by GuardsMixin
        prices: PriceBook
        largest_output: dict[str, int]

        def _abort(self, run: Run, err: RunAborted) -> None: ...

    def _check_llm_estimate(self, run: Run, span: Span, budget: Budget) -> None:
        assert run.max_cost_nanos is not None
        if run.cost_nanos >= run.max_cost_nanos:
            self._abort(run, BudgetExceededError(
                f"run {run.run_id} refused an LLM call: spent {_usd(run.cost_nanos)} of "
                f"max_cost_usd=${budget.max_cost_usd}",
                run_id=run.run_id, reason="max_cost_usd", limit=budget.max_cost_usd,
                spent=nanos_to_usd(run.cost_nanos), spent_usd=nanos_to_usd(run.cost_nanos),
            ))
        prices = self.prices
        if not prices.is_priced(span.model, span.provider):
            return  # an unpriced model: its cost is unknown; counts and the after-call check still apply
        max_out = max_output_tokens(span)
        prompt_tokens = 0
        ops = span.prompt_ops
        if span.prompt is not None and ops is not None:
            bound = getattr(ops, "token_upper_bound", None)
            if bound is None:
                prompt_tokens, _ = ops.count_tokens(span.model, span.prompt, span.extra)
            else:
                # Tokenizing a long new prompt costs far more than the rest of the call: first try an upper bound
                # (texts not counted before count one token per byte). If even that fits, the call is let through
                # holding the bound, which is tightened to the exact estimate should another call need the room.
                prompt_tokens, exact = bound(span.model, span.prompt, span.extra)
                if not exact:
                    out = max_out or self.output_hold(span.model, span.provider, prompt_tokens)
                    upper = prices.estimate_upper_nanos(span.model, span.provider, prompt_tokens, out)
                    if upper is not None and self._try_hold(run, span, upper, None, True)[0]:
                        return
                    prompt_tokens, _ = ops.count_tokens(span.model, span.prompt, span.extra)
        least = None
        if max_out:
            estimate = prices.estimate_nanos(span.model, span.provider, prompt_tokens, max_out)
        else:
            # No max_tokens: the call holds an output estimate too (see output_hold), as much of it as the budget
            # has left; only its prompt must fit for it to start.
            least = prices.estimate_nanos(span.model, span.provider, prompt_tokens, 0)
            estimate = prices.estimate_nanos(span.model, span.provider, prompt_tokens,
                                             self.output_hold(span.model, span.provider, prompt_tokens))
        if estimate is None:
            return
        what = (f"an LLM call to {span.model} estimated at {_usd(estimate if least is None else least)} "
                f"({prompt_tokens} prompt tokens" + (f", max_tokens={max_out})" if max_out else ", no max_tokens)"))
        self._reserve(run, span, budget, estimate, what, {"model": span.model, "prompt_tokens": prompt_tokens}, least)

    def cap_estimate(self, span: Span) -> int:
        """What a model call holds of its tenant's and user's spend caps while in flight (``SpendCaps.admit``): its
        prompt counted and its output bounded as for a budget's hold (``max_tokens``, else ``output_hold``); 0 for
        an unpriced model."""
        prices = self.prices
        if not prices.is_priced(span.model, span.provider):
            return 0
        prompt_tokens = 0
        ops = span.prompt_ops
        if span.prompt is not None and ops is not None:
            try:
                prompt_tokens, _ = ops.count_tokens(span.model, span.prompt, span.extra)
            except Exception:  # an odd payload: the output bound alone is held
                logger.debug("costobs: could not count a capped call's prompt", exc_info=True)
        out = max_output_tokens(span) or self.output_hold(span.model, span.provider, prompt_tokens)
        return prices.estimate_nanos(span.model, span.provider, prompt_tokens, out) or 0

    def output_hold(self, model: str | None, provider: str | None, prompt_tokens: int) -> int:
        """The output tokens a budget holds for a call that sets no ``max_tokens``: the most this model produced
        in one call in this process, else what its context window leaves after the prompt (the catalog's), else
        ``DEFAULT_OUTPUT_HOLD``."""
        if model:
            seen = self.largest_output.get(model)
            if seen:
                return seen
            window = self.prices.context_window(model, provider)
            if window:
                return max(window - prompt_tokens, 0)
        return DEFAULT_OUTPUT_HOLD

    def _saw_output(self, model: str, out: int) -> None:
        """Remember the most output tokens ``model`` (as requested) produced in one call (see ``output_hold``)."""
        seen = self.largest_output
        if out > seen.get(model, 0):
            if len(seen) >= _MAX_MODELS_SEEN and model not in seen:
                seen.clear()
            seen[model] = out

    def _reserve(self, run: Run, span: Span, budget: Budget, estimate: int, what: str, detail: dict[str, Any],
                 least: int | None = None) -> None:
        """Hold ``estimate`` of the run's budget for this call while it is in flight, or refuse the call if
        what is spent, what calls in flight hold and the estimate would pass ``max_cost_usd``. With ``least``, the
        call needs only that much to start when no other call of the run is in flight, holding what is left of the
        budget if ``estimate`` does not fit."""
        fits, spent, held = self._try_hold(run, span, estimate, least)
        if not fits and run.loose_holds:
            # Calls in flight hold upper bounds: make them exact (what they would hold otherwise) and look again.
            self._tighten_holds(run)
            fits, spent, held = self._try_hold(run, span, estimate, least)
        if not fits:
            in_flight = f" and {_usd(held)} held by calls in flight" if held else ""
            self._abort(run, BudgetExceededError(
                f"run {run.run_id} refused {what}: on top of {_usd(spent)} spent{in_flight} it would pass "
                f"max_cost_usd=${budget.max_cost_usd}",
                run_id=run.run_id, reason="max_cost_usd", limit=budget.max_cost_usd,
                spent=nanos_to_usd(spent), spent_usd=nanos_to_usd(spent),
                detail={**detail, "estimate_usd": nanos_to_usd(estimate if least is None else least),
                        "in_flight_usd": nanos_to_usd(held)},
            ))

    @staticmethod
    def _try_hold(run: Run, span: Span, estimate: int, least: int | None = None,
                  loose: bool = False) -> tuple[bool, int, int]:
        """Hold ``estimate`` for this call if it fits (``max_cost_usd`` is "at most": an estimate that exactly fills
        what is left fits), else, given ``least``, if that fits and no other call of the run is in flight, all that is
        left: ``(fits, spent, held by others)``, read under the lock. ``loose``: ``estimate`` is an upper bound of the
        call's estimate, which ``_tighten_holds`` may replace by the exact one."""
        assert run.max_cost_nanos is not None
        with run.lock:
            spent, held = run.cost_nanos, run.reserved_nanos
            room = run.max_cost_nanos - spent - held
            if estimate <= room:
                take = estimate
            elif least is not None and least <= room and not held:
                take = room  # alone in flight: it may overshoot as a call made on its own can, no more
            else:
                return False, spent, held
            run.reserved_nanos += take
            span.reserved += take
            if loose:
                holds = run.loose_holds
                if holds is None:
                    holds = run.loose_holds = set()
                holds.add(span)
        return True, spent, held

    def _tighten_holds(self, run: Run) -> None:
        """Replace the upper bounds held by the run's calls in flight by their exact estimates."""
        with run.lock:
            spans = list(run.loose_holds or ())
        for sp in spans:
            prompt, ops = sp.prompt, sp.prompt_ops
            if prompt is None or ops is None:
                continue  # ended meanwhile: its hold is gone
            try:
                n, _ = ops.count_tokens(sp.model, prompt, sp.extra)
                est = self.prices.estimate_nanos(
                    sp.model, sp.provider, n, max_output_tokens(sp) or self.output_hold(sp.model, sp.provider, n))
            except Exception:
                logger.debug("costobs: could not tighten a budget hold", exc_info=True)
                continue
            if est is None:
                continue
            with run.lock:
                loose = run.loose_holds
                if loose is not None and sp in loose:  # still in flight, still holding its bound
                    loose.discard(sp)
                    run.reserved_nanos -= sp.reserved - est
                    sp.reserved = est

