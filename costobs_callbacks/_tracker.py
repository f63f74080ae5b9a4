"""``CostTracker``: the one object an app holds. Wires the ledger, pricing, exporter and store."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

from langchain_core.utils.uuid import uuid7

from ._caps import SpendCaps, coerce_cap_table
from ._events import TokenUsage
from ._exceptions import ConfigurationError
from ._export import BatchExporter, Spool, StoreSpool, Watchdog, default_spool_dir
from ._ledger import BUDGET_META_KEY, LOOPS_META_KEY, Ledger, RunCost, run_text, salt_from, user_hash
from ._ledger.manual import record
from ._policy import Budget, BudgetHook, LoopPolicy, coerce_budget, coerce_loops
from ._pricing import MAX_TOKENS, PriceBook
from ._scope import RunScope
from ._store import ROLLUP_KEYS, RUN_KEYS, RollupRow, Store, run_matches

if TYPE_CHECKING:
    from langchain_core.runnables import RunnableConfig

    from .integrations.langchain import CostCallbackHandler

__all__ = ["CostTracker"]

logger = logging.getLogger("costobs_callbacks")

DEFAULT_DATABASE_URL = "sqlite:///costobs.db"


class CostTracker:
    """Tracks what LLM runs cost, guards their budgets and stores every span.

    Args:
        database_url: any SQLAlchemy URL; default ``$COSTOBS_DATABASE_URL``, else ``sqlite:///costobs.db``.
        prices: model name -> ``{"input", "output", "cache_read", "cache_write"}`` in USD per million
            tokens, or the path of a YAML / JSON file of that shape; overrides the built-in catalog.
        tool_prices: tool name -> USD per call.
        budget: the default ``Budget`` of every root run (a run's own budget replaces it).
        loops: the loop guard's ``LoopPolicy``; ``None`` means the default policy (on).
        user_salt: secret for hashing user ids (default ``$COSTOBS_USER_SALT``, else a random salt
            kept in the database so every process agrees).
        require: attribution keys every root run must carry (``MissingAttributionError`` otherwise).
        on_budget_warning: called once per limit per run when a run reaches ``Budget.warn_at``.
        refresh_prices: fetch newer catalog data from its publisher in the background (opt-in).
        export_delay: seconds between background writes (lower: fresher rollups, more transactions).
        max_queue_size: spans held in memory before new ones are dropped (and counted).
        tenant_budgets: tenant id -> spend limits held across every replica sharing the database: ``daily_usd``,
            ``monthly_usd`` (calendar periods in UTC), ``usd_per_minute`` (a rate: calls wait, up to ``max_wait_s``,
            default 30, then are refused); ``"*"``: the limits of every tenant not named. A call of a run whose
            tenant is at its cap is refused with ``BudgetExceededError`` before it is sent.
        user_budgets: the same per user id (kept hashed, as everywhere).
        cap_refresh_s: how old the shared figures the caps decide on may be (seconds): how often each replica reports
            its spend, renews its leases and reads the store's figures again.
        spool_dir: where batches the database does not take are kept until it does (default: a folder per
            database under the user's cache directory); they are replayed in order, by this process or the next.
        db_timeout: seconds a database call of the exporter may take (PostgreSQL: ``connect_timeout``,
            ``statement_timeout``, and its sockets cut past it) before its batch goes to the spool; the
            ``statement_timeout`` bounds this tracker's queries (``rollup``) too: raise it for long reports.
        count_later: a LlamaIndex completion that reports no usage is counted by the exporter's thread before it is
            written, not on the app's thread when it ends (see the README's "How tokens are counted"); ``False``:
            always when it ends (an app whose threads make calls flat out, never waiting on a provider).

    SIGTERM: where the default handler is in place (and the tracker is made on the main thread), one is installed
    that closes the tracker (its queue flushed to the database, or the spool) and then dies of SIGTERM as before;
    where the app installed its own, the tracker's flush runs first, then the app's handler. A handler the app
    installs later replaces it: call ``tracker.close()`` from it.
    """

    def __init__(
        self,
        database_url: str | None = None,
        *,
        prices: Mapping[str, Mapping[str, Any]] | str | os.PathLike[str] | None = None,
        tool_prices: Mapping[str, Any] | None = None,
        budget: Budget | Mapping[str, Any] | None = None,
        loops: LoopPolicy | Mapping[str, Any] | None = None,
        user_salt: str | bytes | None = None,
        require: Iterable[str] = (),
        on_budget_warning: BudgetHook | None = None,
        refresh_prices: bool = False,
        export_delay: float = 0.5,
        max_queue_size: int = 65_536,
        spool_dir: str | os.PathLike[str] | None = None,
        db_timeout: float = 10.0,
        tenant_budgets: Mapping[str, Any] | None = None,
        user_budgets: Mapping[str, Any] | None = None,
        cap_refresh_s: float = 5.0,
        count_later: bool = True,
    ) -> None:
        if not isinstance(count_later, bool):
            raise ConfigurationError(f"count_later must be True or False, not {count_later!r}")
        if isinstance(require, str):
            require = (require,)
        req = tuple(require)
        for k in req:
            if not isinstance(k, str) or not k:
                raise ConfigurationError(f"require takes attribution key names, got {k!r}")
        if on_budget_warning is not None and not callable(on_budget_warning):
            raise ConfigurationError("on_budget_warning must be callable")
        default_budget, default_loops = coerce_budget(budget), coerce_loops(loops)  # before any thread or file
        if isinstance(db_timeout, bool) or not isinstance(db_timeout, (int, float)) or not db_timeout > 0:
            raise ConfigurationError(f"db_timeout must be a number of seconds > 0, got {db_timeout!r}")
        if (isinstance(cap_refresh_s, bool) or not isinstance(cap_refresh_s, (int, float))
                or not 0.05 <= cap_refresh_s <= 3600):
            raise ConfigurationError(
                f"cap_refresh_s must be a number of seconds from 0.05 to 3600, got {cap_refresh_s!r}")
        tenant_caps = coerce_cap_table("tenant_budgets", tenant_budgets, "tenant")
        coerce_cap_table("user_budgets", user_budgets, "user")  # checked now; keyed by hash once the salt is known
        self.database_url = database_url or os.environ.get("COSTOBS_DATABASE_URL") or DEFAULT_DATABASE_URL
        self.prices = PriceBook(prices, tool_prices=tool_prices, refresh=refresh_prices)
        self.store = Store(self.database_url, engine_kwargs=_timeouts(self.database_url, db_timeout))
        self._watchdog = Watchdog(self.store.engine, db_timeout) if self.store.dialect == "postgresql" else None
        if spool_dir is None:
            spool_dir = default_spool_dir(self.database_url, self.store.engine.url.render_as_string(True))
        try:
            spool = Spool(spool_dir)
        except OSError as exc:
            raise ConfigurationError(f"spool_dir {str(spool_dir)!r} cannot be used: {exc}") from exc
        salt = user_salt if user_salt is not None else os.environ.get("COSTOBS_USER_SALT")
        if salt is not None and not salt:
            raise ConfigurationError("user_salt must not be empty")
        try:
            self.store.ensure_schema()
            if salt is None:
                salt = self.store.get_or_create_salt()
        except ConfigurationError:
            raise
        except Exception as exc:
            if salt is None:
                said = str(getattr(exc, "orig", None) or exc).strip().splitlines() or [type(exc).__name__]
                raise ConfigurationError(
                    f"database_url {self.store.engine.url.render_as_string(hide_password=True)!r} cannot be opened "
                    f"({said[0].strip()}); it keeps the salt that anonymises user ids: fix the URL, or pass "
                    "user_salt= so that tracking starts while the database is down (batches are spooled)"
                ) from exc
            logger.error("costobs: database unavailable at start (%r); spans are queued and retried", exc)
        self._spool = StoreSpool(self.store, spool, after=lambda: self.ledger.trim_recent(),
                                 watchdog=self._watchdog)
        salt_bytes = salt_from(salt)
        user_caps = coerce_cap_table("user_budgets", user_budgets, "user", lambda uid: user_hash(salt_bytes, uid))
        self._caps = (SpendCaps(self.store.engine, tenant_caps, user_caps, float(cap_refresh_s))
                      if tenant_caps is not None or user_caps is not None else None)
        self.exporter = BatchExporter(
            self._write, schedule_delay=export_delay, max_queue_size=max_queue_size, on_start=_warm_tokenizers,
            fallback=self._spool,
        )
        self.ledger = Ledger(
            prices=self.prices,
            exporter=self.exporter,
            user_salt=salt_from(salt),
            budget=default_budget,
            loops=default_loops,
            require=req,
            on_budget_warning=on_budget_warning,
            caps=self._caps,
        )
        # the exporter settles each batch's calls left for later (their token counts) before writing it
        self.exporter.prepare = self.ledger.settle
        if count_later:
            self.ledger.room_for_later = self.exporter.room_for_later
        self._handler: CostCallbackHandler | None = None
        self._handler_lock = threading.Lock()
        self._closed = False
        if spool.found:  # replay what processes gone left, without waiting for the first span
            self.exporter._ensure_worker()
            self.exporter._wake.set()
        _on_sigterm(self)

    # -- LangChain ------------------------------------------------------------------------------

    def _write(self, items: Sequence[Any]) -> None:
        """The exporter's sink (on its thread): store a batch, then forget the oldest ended runs, so that the
        app's thread never frees them (freeing a run ended a thousand calls ago costs it cold memory)."""
        wd = self._watchdog
        try:
            with wd.guard() if wd is not None else contextlib.nullcontext():
                self.store.write_batch(items)
        finally:
            self.ledger.trim_recent()

    def langchain_handler(self) -> CostCallbackHandler:
        """The LangChain callback handler (one per tracker, shared by every thread and task)."""
        if self._handler is None:
            with self._handler_lock:
                if self._handler is None:
                    if self._caps is not None:  # its model starts can await on an event loop (see _caps.throttle)
                        from .integrations.langchain.caps import CappedCallbackHandler

                        self._handler = CappedCallbackHandler(self.ledger, self._caps)
                    else:
                        from .integrations.langchain import CostCallbackHandler

                        self._handler = CostCallbackHandler(self.ledger)
        return self._handler

    def config(
        self,
        *,
        feature: str | None = None,
        route: str | None = None,
        user_id: str | None = None,
        tenant_id: str | None = None,
        budget: Budget | Mapping[str, Any] | None = None,
        run_id: uuid.UUID | str | None = None,
        loops: LoopPolicy | Mapping[str, Any] | None = None,
        **attributes: Any,
    ) -> RunnableConfig:
        """A ``RunnableConfig`` with this tracker's handler, the attribution metadata and a fresh ``run_id``.

        Reusing the returned config for a second invocation continues the same run.
        """
        meta = self._metadata(feature, route, user_id, tenant_id, budget, loops, attributes)
        # A UUIDv7 as LangChain makes its own run ids: time-ordered (kind to the database's indexes) and made
        # without a system call (uuid4's os.urandom gives up the GIL, and a CPU-bound thread that does so on every
        # call starves the exporter's thread of it).
        rid = _as_uuid(run_id) if run_id is not None else uuid7()
        cfg: RunnableConfig = {"callbacks": [self.langchain_handler()], "metadata": meta, "run_id": rid}
        return cfg

    @staticmethod
    def _metadata(
        feature: Any, route: Any, user_id: Any, tenant_id: Any, budget: Any, loops: Any, attributes: Mapping[str, Any]
    ) -> dict[str, Any]:
        meta: dict[str, Any] = {}
        for k, v in (("feature", feature), ("route", route), ("user_id", user_id), ("tenant_id", tenant_id)):
            if v is not None:
                meta[k] = v
        for k, v in attributes.items():
            if k.startswith(("ls_", "langgraph_", "costobs_")):
                raise ConfigurationError(f"attribute name {k!r} is reserved")
            meta[k] = v
        if budget is not None and (b := coerce_budget(budget)) is not None:
            meta[BUDGET_META_KEY] = b.model_dump(exclude_none=True, mode="json")
        if loops is not None and (lp := coerce_loops(loops)) is not None:
            meta[LOOPS_META_KEY] = lp.model_dump(mode="json")
        return meta

    # -- LlamaIndex -----------------------------------------------------------------------------

    def instrument_llamaindex(self, *, request_stream_usage: bool = False) -> None:
        """Attribute, price and guard every LlamaIndex LLM, embedding, retrieval and agent call
        (call once at start-up; ``uninstrument_llamaindex()`` undoes it).

        ``request_stream_usage=True`` asks OpenAI-compatible LLMs for usage on streamed responses,
        so streamed calls (every ``FunctionAgent`` call) are priced exactly rather than estimated.
        """
        from .integrations import llamaindex

        llamaindex.instrument(self, request_stream_usage=request_stream_usage)

    def uninstrument_llamaindex(self) -> None:
        from .integrations import llamaindex

        llamaindex.uninstrument(self)

    def llamaindex_handler(self) -> Any:
        """A legacy LlamaIndex ``CallbackManager`` handler, for apps that wire their own managers."""
        from .integrations import llamaindex

        return llamaindex.legacy_handler(self)

    # -- scopes ---------------------------------------------------------------------------------

    def run(
        self,
        *,
        feature: str | None = None,
        route: str | None = None,
        user_id: str | None = None,
        tenant_id: str | None = None,
        budget: Budget | Mapping[str, Any] | None = None,
        run_id: uuid.UUID | str | None = None,
        loops: LoopPolicy | Mapping[str, Any] | None = None,
        **attributes: Any,
    ) -> RunScope:
        """A context manager that opens a root run: everything costed inside it (LangChain or
        LlamaIndex, this thread, asyncio tasks and threads started with a copied context) is
        attributed to it. ``run.run_id``, ``run.cost`` (the live ``RunCost``)."""
        if run_id is not None and not isinstance(run_id, uuid.UUID):
            text = str(run_id)
            if not text or len(text) > 64 or "\x00" in text:  # it keys a 64-character column
                raise ConfigurationError(f"run_id must be a UUID or a text of 1 to 64 characters, got {run_id!r}")
        meta = self._metadata(feature, route, user_id, tenant_id, budget, loops, attributes)
        return RunScope(self, meta, run_id)

    # -- records --------------------------------------------------------------------------------

    def record_usage(
        self,
        *,
        model: str,
        input_tokens: int,
        output_tokens: int,
        cache_read_tokens: int = 0,
        cache_write_tokens: int = 0,
        reasoning_tokens: int = 0,
        provider: str | None = None,
        at: datetime | None = None,
        run_id: uuid.UUID | str | None = None,
        **attribution: Any,
    ) -> RunCost:
        """Record a model call no framework saw (a direct SDK call, a batch job, an import of history): stored as
        an ``llm`` span priced by the ``PriceBook`` as a LangChain call of ``model`` is (an unknown model is
        flagged ``unpriced``, never $0), its span flagged ``manual``.

        Args:
            model, provider: as a framework would report them (``provider`` helps pick the price).
            input_tokens: the whole prompt, cache reads and writes included (Anthropic reports its
                ``input_tokens`` without them: add ``cache_read_input_tokens`` and ``cache_creation_input_tokens``).
            output_tokens: the whole completion, ``reasoning_tokens`` included. Every count is an int from 0 to
                10^9 (record more as several records).
            at: when the call was made (an aware ``datetime``): the span's start, end and hour, and the price in
                effect then. Default: now.
            run_id: add to this run (a ``UUID`` or a text of 1 to 64 characters): a run open in this process gets
                the call in its live totals (and budget); an ended one is continued, as a reused
                ``tracker.config(run_id=...)`` is. Default: a run of its own.
            attribution: ``feature``, ``tenant_id``, ``user_id`` (hashed, as everywhere), ``route``,
                ``prompt_version`` and other attributes (text, numbers, booleans), as ``tracker.config()`` takes
                them. A run open in this process keeps its own attribution; an ended one given none keeps its own.

        Returns the run's ``RunCost`` as this process holds it: the whole run unless it is continued from the
        database (ended in another process, or long ago): ``run_cost(run_id)`` reads the whole then.

        Nothing is sent to the database on the calling thread. Every argument is checked first:
        ``ConfigurationError`` names a bad one, and nothing is recorded. A run past its budget is aborted
        (its next framework call refused), never the record.
        """
        self._open_for("record_usage")
        if not isinstance(model, str) or not model:
            raise ConfigurationError(f"model must be a non-empty text, not {model!r}")
        prov = _optional_text("provider", provider)
        tokens = (
            _token_arg("input_tokens", input_tokens), _token_arg("output_tokens", output_tokens),
            _token_arg("cache_read_tokens", cache_read_tokens), _token_arg("cache_write_tokens", cache_write_tokens),
            _token_arg("reasoning_tokens", reasoning_tokens),
        )
        if tokens[2] + tokens[3] > tokens[0]:
            raise ConfigurationError(
                f"cache_read_tokens + cache_write_tokens ({tokens[2]} + {tokens[3]}) exceed input_tokens "
                f"({tokens[0]}): input_tokens counts the whole prompt, cached tokens included")
        if tokens[4] > tokens[1]:
            raise ConfigurationError(
                f"reasoning_tokens ({tokens[4]}) exceed output_tokens ({tokens[1]}): output_tokens counts the whole "
                "completion, reasoning included")
        when = _at(at)
        rid = _record_run_id(run_id)
        meta = _record_meta(attribution)
        if when is None:
            wall = None
            priced = self.prices.price_nanos(model, prov, tokens)
        else:
            wall = when.timestamp()
            call = self.prices.price(model, prov, TokenUsage(*tokens), at=when)
            priced = None if call is None else (call.cost_nanos, call.prices)
        return record(self.ledger, run_id=rid, meta=meta, kind="llm", name="record_usage", model=model,
                      provider=prov, tokens=tokens, priced=priced, wall=time.time() if wall is None else wall)

    def record_cost(
        self,
        *,
        usd: Decimal | int | float | str,
        name: str,
        at: datetime | None = None,
        run_id: uuid.UUID | str | None = None,
        **attribution: Any,
    ) -> RunCost:
        """Record a cost of exactly ``usd`` (a paid API call, a GPU hour, an invoice line): stored as a ``tool``
        span named ``name`` with that cost (rounded to the nano-dollar, half to even; ``tool_prices`` are not
        added), flagged ``manual``. ``usd``: a finite amount, 0 or more (a ``Decimal``, an int, a float or a
        numeric text). ``at``, ``run_id``, ``attribution`` and what it returns: as for ``record_usage``."""
        self._open_for("record_cost")
        nanos = _usd_arg(usd)
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"name must be a non-empty text, not {name!r}")
        when = _at(at)
        rid = _record_run_id(run_id)
        meta = _record_meta(attribution)
        return record(self.ledger, run_id=rid, meta=meta, kind="tool", name=name, cost_nanos=nanos,
                      wall=time.time() if when is None else when.timestamp())

    def _open_for(self, what: str) -> None:
        if self._closed:  # its exporter is stopped: the record would be dropped
            raise ConfigurationError(f"{what}: this tracker is closed")

    # -- queries --------------------------------------------------------------------------------

    def run_cost(self, run_id: uuid.UUID | str, where: Mapping[str, Any] | None = None) -> RunCost | None:
        """What a run cost: live from memory while it is open here, else from the database
        (after flushing what this process still holds); ``None`` for a run never seen.

        ``run_id``: a ``UUID`` or a text of 1 to 64 characters (``ConfigurationError`` otherwise).
        ``where``: the run's attribution keys (``feature``, ``route``, ``tenant_id``, ``user``, ``prompt_version``)
        as for ``rollup``: a run that does not match is ``None`` (another tenant's run is not seen)."""
        rid = _query_run_id(run_id)
        filters = _run_where(where)
        live = self.ledger.run_cost(rid)
        if live is not None:
            return live if run_matches(live, filters) else None
        self.flush(timeout=10.0)
        try:
            return self.store.run_cost(rid, where=filters)
        except Exception:
            recent = self.ledger.recent_run(rid)
            if recent is None:
                raise
            # the database is unreachable: this process still remembers the run (at least its last 1,024 runs)
            logger.warning("costobs: database unavailable; run_cost(%s) answered from memory", rid, exc_info=True)
            snap = recent.snapshot()
            return snap if run_matches(snap, filters) else None

    def spend(
        self, since: datetime | None = None, until: datetime | None = None, where: Mapping[str, Any] | None = None,
    ) -> Decimal:
        """The total cost of the spans started in ``[since, until)`` that match ``where`` (exact; priced calls
        only, as ``rollup``'s ``cost_usd``, which it equals). Arguments as for ``rollup``."""
        start, end = _window(since, until)
        filters = _rollup_where(where)
        self.flush(timeout=10.0)
        return self.store.spend(since=start, until=end, where=filters)

    def top_runs(
        self, n: int = 10, since: datetime | None = None, until: datetime | None = None,
        where: Mapping[str, Any] | None = None,
    ) -> list[RunCost]:
        """The ``n`` runs that spent most in ``[since, until)`` among the spans matching ``where``, costliest first
        (ties by run id). Each ``RunCost`` counts those spans only: with no window and no filter, the whole run
        (as ``run_cost``); its status and attributes are the run's. Arguments as for ``rollup``; ``n`` a positive
        int."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigurationError(f"n must be a positive int, not {n!r}")
        start, end = _window(since, until)
        filters = _rollup_where(where)
        self.flush(timeout=10.0)
        return self.store.top_runs(n, since=start, until=end, where=filters)

    def rollup(
        self,
        by: Sequence[str] | str = ("feature",),
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        bucket: str | None = None,
        where: Mapping[str, Any] | None = None,
    ) -> list[RollupRow]:
        """Costs grouped by attribution keys (and hour or day), most expensive first.

        Args:
            by: a key of ``ROLLUP_KEYS`` or a sequence of them (none: one row of everything).
            since, until: the spans started in ``[since, until)``; ``datetime`` objects, a naive one read as
                UTC (as the database keeps times).
            bucket: ``"hour"``, ``"day"`` or ``None``.
            where: key -> a text (equal to it), ``None`` (no value), or a list, tuple or set of those (any of
                them). Values are compared as stored: NUL characters dropped, lone surrogates as U+FFFD,
                at most 256 characters.

        Every argument is checked before the database is asked: ``ConfigurationError`` names a bad one.
        """
        keys = _rollup_by(by)
        if bucket not in (None, "hour", "day"):
            raise ConfigurationError(f"bucket must be 'hour', 'day' or None, not {bucket!r}")
        start, end = _window(since, until)
        filters = _rollup_where(where)
        self.flush(timeout=10.0)
        return self.store.rollup(keys, since=start, until=end, bucket=bucket, where=filters)

    def spans(self, run_id: uuid.UUID | str, where: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        """The stored spans of a run (after flushing), for audits; ``run_id`` as for ``run_cost``; ``where``
        as for ``rollup`` (only the spans matching it: ``[]`` for another tenant's run)."""
        rid = _query_run_id(run_id)
        filters = _rollup_where(where)
        self.flush(timeout=10.0)
        return self.store.spans_of(rid, where=filters)

    @property
    def stats(self) -> dict[str, int]:
        """Exporter counters plus the handler's internal errors: check that nothing was lost.

        ``failed`` counts the spans and runs lost, ``refused`` those of them the database refused for their
        content, ``sanitized`` the spans stored with a value made to fit its column (flagged ``sanitized``).
        ``spooled`` counts the items sent to the spool (the database did not take them), ``replayed`` those
        written from it (this process's and those found from processes gone), ``in_spool`` those still only
        there, ``spool_lost`` those of torn or corrupt spool records (counted in ``failed`` too). ``duplicates``
        counts the items of batches that reached the database a second time (a retry or a replay of a batch whose
        COMMIT went through while its reply was lost) and were left out: each batch is applied once.

        Spend caps (0 without them): ``caps_refused`` calls refused at a tenant's or user's cap; ``throttled`` calls
        that waited for a ``usd_per_minute`` rate, ``throttle_wait_ms`` how long in all, ``throttle_refused`` calls
        refused past ``max_wait_s``; ``caps_lease_waits`` / ``caps_lease_wait_ms`` calls that waited for a lease this
        replica did not have yet, ``caps_lease_timeouts`` those the store did not answer in time (decided as while it is
        down); ``caps_store_errors`` rounds of the caps' thread the database failed;
        ``caps_offline`` 1 while it cannot be reached; ``caps_leases_lost`` leases found given back after they
        expired (this replica was away too long)."""
        out = self.exporter.stats.as_dict()
        sp = self._spool.spool
        out["replayed"] = sp.replayed
        out["in_spool"] = sp.pending()
        out["spool_lost"] = sp.lost
        out["spool_found"] = sp.found
        out["failed"] += sp.lost
        out["internal_errors"] = self.ledger.internal_errors
        out["sanitized"] = self.store.sanitized
        out["duplicates"] = self.store.duplicates
        out["open_runs"] = len(self.ledger.runs)
        out.update(self._caps.stats() if self._caps is not None else _NO_CAPS_STATS)
        out["pending"] = self.exporter.pending()
        return out

    # -- lifecycle ------------------------------------------------------------------------------

    def flush(self, timeout: float | None = None) -> bool:
        """Write everything finished so far, and everything spooled (by this process, or found from processes
        gone), to the database; True once it is there, False when ``timeout`` passed first (then a warning says
        how many items are still only in the spool: ``stats["in_spool"]``)."""
        done = self.exporter.force_flush(timeout)
        if not done:
            left = self._spool.backlog()
            if left:
                logger.warning("costobs: flush timed out with %d items still only in the spool %s", left,
                               self._spool.spool.directory)
        return done

    def close(self, timeout: float | None = None) -> None:
        """Flush, stop the exporter and release the database. Idempotent.

        ``timeout=None`` waits until every span recorded before the call is in the database or in the spool: it
        ends, since each database call is bounded (``db_timeout`` on PostgreSQL, a 30 s busy timeout on SQLite)
        and a batch the database does not take is spooled at once; the spool's backlog then gets one last replay
        of up to 5 s, and what it keeps is replayed by the next tracker on this database. A number of seconds
        bounds the wait instead: what is still queued when it passes may be lost when the process exits."""
        if self._closed:
            return
        self._closed = True
        li = sys.modules.get("costobs_callbacks.integrations.llamaindex")
        if li is not None:  # leave LlamaIndex's global dispatcher and Settings as they were
            li.uninstrument(self)
        try:
            if self._caps is not None:  # its leases given back while the database is still open
                self._caps.close(timeout)
            self.exporter.shutdown(timeout)
        finally:
            self._spool.close()
            self.prices.close()
            self.store.close()

    def __enter__(self) -> CostTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CostTracker({self.store.engine.url.render_as_string(hide_password=True)!r})"


_NO_CAPS_STATS = {"caps_refused": 0, "throttled": 0, "throttle_wait_ms": 0, "throttle_refused": 0,
                  "caps_lease_waits": 0, "caps_lease_wait_ms": 0, "caps_lease_timeouts": 0, "caps_store_errors": 0,
                  "caps_offline": 0, "caps_leases_lost": 0}


def _as_uuid(value: uuid.UUID | str) -> uuid.UUID:
    if isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(str(value))
    except ValueError:
        raise ConfigurationError(f"run_id must be a UUID (LangChain requires one), got {value!r}") from None


def _query_run_id(run_id: Any) -> str:
    """A run id to look up, as stored (``run_text``): a ``UUID``, or a text that could name a stored run (1 to 64
    characters, no NUL, as ``run()`` takes them)."""
    if not isinstance(run_id, uuid.UUID) and (
            not isinstance(run_id, str) or not run_id or len(run_id) > 64 or "\x00" in run_id):
        raise ConfigurationError(f"run_id must be a UUID or a text of 1 to 64 characters, got {run_id!r}")
    return run_text(run_id)


def _rollup_by(by: Any) -> tuple[str, ...]:
    if isinstance(by, str):
        keys: tuple[Any, ...] = (by,)
    elif isinstance(by, Iterable) and not isinstance(by, (bytes, Mapping)):
        keys = tuple(by)
    else:
        raise ConfigurationError(f"by must be a rollup key or a sequence of them, not {by!r}")
    for k in keys:
        if not isinstance(k, str) or k not in ROLLUP_KEYS:
            raise ConfigurationError(f"unknown rollup key {k!r} in by; choose from {', '.join(ROLLUP_KEYS)}")
    if len(set(keys)) != len(keys):
        raise ConfigurationError(f"duplicate rollup key in by={keys!r}")
    return keys


def _moment(name: str, value: Any) -> datetime | None:
    """``since``/``until`` as an aware UTC ``datetime`` (a naive one is UTC, as stored)."""
    if value is None:
        return None
    if not isinstance(value, datetime):
        raise ConfigurationError(f"{name} must be a datetime (a naive one is read as UTC), not {value!r}")
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _window(since: Any, until: Any) -> tuple[datetime | None, datetime | None]:
    """A query's ``since``/``until`` (see ``_moment``), ``since`` not after ``until``."""
    start, end = _moment("since", since), _moment("until", until)
    if start is not None and end is not None and start > end:
        raise ConfigurationError(f"since ({since!r}) is after until ({until!r})")
    return start, end


def _run_where(where: Any) -> dict[str, Any] | None:
    """``where`` of a query of one run's totals: ``_rollup_where`` of the run's own attribution keys only."""
    filters = _rollup_where(where)
    for k in filters or ():
        if k not in RUN_KEYS:
            raise ConfigurationError(
                f"{k!r} in where is a key of each span, not of a run: run_cost takes {', '.join(RUN_KEYS)} "
                "(spans(run_id, where=...) filters by any rollup key)")
    return filters


def _rollup_where(where: Any) -> dict[str, Any] | None:
    if where is None:
        return None
    if not isinstance(where, Mapping):
        raise ConfigurationError(f"where must be a mapping of rollup keys to values, not {where!r}")
    out: dict[str, Any] = {}
    for k, v in where.items():
        if not isinstance(k, str) or k not in ROLLUP_KEYS:
            raise ConfigurationError(f"unknown rollup key {k!r} in where; choose from {', '.join(ROLLUP_KEYS)}")
        if isinstance(v, (list, tuple, set, frozenset)):
            bad = [x for x in v if x is not None and not isinstance(x, str)]
            ok = not bad
            v = list(v)
        else:
            ok = v is None or isinstance(v, str)
        if not ok:
            raise ConfigurationError(
                f"where[{k!r}] must be a text, None, or a list, tuple or set of them, not {where[k]!r}")
        out[k] = v
    return out


def _token_arg(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigurationError(f"{name} must be an int, not {value!r}")
    if value < 0 or value > MAX_TOKENS:
        raise ConfigurationError(
            f"{name} must be from 0 to {MAX_TOKENS:,} (record more as several records), not {value!r}")
    return value


_MAX_RECORD_NANOS = 2**63 - 1


def _usd_arg(usd: Any) -> int:
    """``usd`` as nano-USD (half to even): a finite amount, 0 or more, that fits the store's BIGINT."""
    if isinstance(usd, bool) or not isinstance(usd, (Decimal, int, float, str)):
        raise ConfigurationError(f"usd must be a Decimal, an int, a float or a numeric text, not {usd!r}")
    if isinstance(usd, float) and not math.isfinite(usd):
        raise ConfigurationError(f"usd must be a finite amount, not {usd!r}")
    try:
        d = usd if isinstance(usd, Decimal) else Decimal(str(usd).strip() if isinstance(usd, str) else str(usd))
    except InvalidOperation:
        raise ConfigurationError(f"usd must be a number, not {usd!r}") from None
    if not d.is_finite():
        raise ConfigurationError(f"usd must be a finite amount, not {usd!r}")
    if d < 0:
        raise ConfigurationError(f"usd must be 0 or more, not {usd!r}")
    nanos = int(d.scaleb(9).to_integral_value())
    if nanos > _MAX_RECORD_NANOS:
        raise ConfigurationError(f"usd is too large to store ({usd!r})")
    return nanos


def _optional_text(name: str, value: Any) -> str | None:
    if value is not None and (not isinstance(value, str) or not value):
        raise ConfigurationError(f"{name} must be a non-empty text or None, not {value!r}")
    return value


def _at(value: Any) -> datetime | None:
    """A record's ``at``: an aware ``datetime`` (a naive one is refused: which zone it means is unknown)."""
    if value is None:
        return None
    if not isinstance(value, datetime):
        raise ConfigurationError(f"at must be a datetime, not {value!r}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ConfigurationError(f"at must be timezone-aware (e.g. datetime(..., tzinfo=UTC)), not {value!r}")
    return value.astimezone(UTC)


def _record_run_id(run_id: Any) -> str | None:
    """A record's ``run_id`` as stored (see ``_query_run_id``), or ``None`` (a new run)."""
    return None if run_id is None else _query_run_id(run_id)


_RESERVED_PREFIXES = ("ls_", "lc_", "langgraph_", "langsmith", "costobs_", "checkpoint_", "__")
_PLAIN_VALUES = (str, int, float, bool)


def _record_meta(attribution: Mapping[str, Any]) -> dict[str, Any]:
    """A record's attribution keywords as run metadata: the attribution keys and other attributes of plain
    values (text, numbers, booleans, ``None`` for none); other names and values are refused."""
    meta: dict[str, Any] = {}
    for k, v in attribution.items():
        if not isinstance(k, str) or not k:
            raise ConfigurationError(f"attribute names must be non-empty texts, not {k!r}")
        if k.startswith(_RESERVED_PREFIXES):
            raise ConfigurationError(f"attribute name {k!r} is reserved")
        if k in ("user", "user_hash"):
            raise ConfigurationError(f"{k!r} is not an attribute name: pass user_id=... (stored hashed)")
        if v is not None and not isinstance(v, _PLAIN_VALUES):
            raise ConfigurationError(
                f"{k} must be a text, a number, a boolean or None, not {type(v).__name__} {v!r}")
        if v is not None:
            meta[k] = v
    return meta


def _timeouts(url: str, seconds: float) -> dict[str, Any] | None:
    """PostgreSQL's ``connect_timeout`` and ``statement_timeout`` for a tracker's engine (unless the URL sets
    them): a server that hangs cannot hold the exporter's thread past them."""
    import sqlalchemy as sa

    try:
        u = sa.engine.make_url(url)
    except Exception:
        return None  # Store names the bad URL
    if u.get_backend_name() != "postgresql" or u.get_driver_name() not in ("psycopg", "psycopg2"):
        return None
    args: dict[str, Any] = {}
    if "connect_timeout" not in u.query:
        args["connect_timeout"] = max(1, round(seconds))
    if "options" not in u.query:
        args["options"] = f"-c statement_timeout={max(1, int(seconds * 1000))}"
    return {"connect_args": args} if args else None


_term_trackers: weakref.WeakSet[CostTracker] = weakref.WeakSet()
_term_prev: Any = None  # the SIGTERM handler ours replaced


def _on_sigterm(tracker: CostTracker) -> None:
    """Flush on SIGTERM (see ``CostTracker``): set from the main thread only, where Python runs handlers."""
    global _term_prev
    if threading.current_thread() is not threading.main_thread():
        return
    try:
        cur = signal.getsignal(signal.SIGTERM)
    except (ValueError, AttributeError):  # pragma: no cover - no SIGTERM here
        return
    if cur is _sigterm:
        _term_trackers.add(tracker)
        return
    if cur is signal.SIG_IGN or cur is None:  # ignored, or set outside Python: left as it is
        return
    try:
        signal.signal(signal.SIGTERM, _sigterm)
    except ValueError:  # pragma: no cover
        return
    _term_prev = cur
    _term_trackers.add(tracker)


def _sigterm(signum: int, frame: Any) -> None:
    prev = _term_prev
    default = prev is signal.SIG_DFL
    for t in list(_term_trackers):
        if t._closed:
            continue
        try:
            if default:  # the process ends now: close (the spool's files released for the next process)
                t.close(timeout=5.0)
            else:  # the app's handler decides whether it ends: flush only
                t.flush(timeout=5.0)
        except Exception:
            logger.exception("costobs: flushing on SIGTERM failed")
    if default:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
    elif callable(prev):
        prev(signum, frame)


def _warm_tokenizers() -> None:
    from ._tokens import warm

    warm()

