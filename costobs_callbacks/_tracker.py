"""``CostTracker``: the one object an app holds. Wires the ledger, pricing, exporter and store."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import uuid
import weakref
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from langchain_core.utils.uuid import uuid7

from ._exceptions import ConfigurationError
from ._export import BatchExporter
from ._ledger import BUDGET_META_KEY, LOOPS_META_KEY, Ledger, RunCost, run_text, salt_from
from ._policy import Budget, BudgetHook, LoopPolicy, coerce_budget, coerce_loops
from ._pricing import PriceBook
from ._spool import Spool, StoreSpool, Watchdog, default_spool_dir
from ._store import ROLLUP_KEYS, RollupRow, Store

if TYPE_CHECKING:
    from langchain_core.runnables import RunnableConfig

    from ._scope import RunScope
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
        spool_dir: where batches the database does not take are kept until it does (default: a folder per
            database under the user's cache directory); they are replayed in order, by this process or the next.
        db_timeout: seconds a database call of the exporter may take (PostgreSQL: ``connect_timeout``,
            ``statement_timeout``, and its sockets cut past it) before its batch goes to the spool; the
            ``statement_timeout`` bounds this tracker's queries (``rollup``) too: raise it for long reports.

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
    ) -> None:
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
                raise ConfigurationError(
                    f"cannot open the cost database {self.store.engine.url!r} ({exc}); it keeps the salt that "
                    "anonymises user ids: fix the URL, or pass user_salt= so tracking can start while "
                    "the database is down"
                ) from exc
            logger.error("costobs: database unavailable at start (%r); spans are queued and retried", exc)
        self._spool = StoreSpool(self.store, spool, after=lambda: self.ledger.trim_recent(),
                                 watchdog=self._watchdog)
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
        )
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
        b = coerce_budget(budget)
        if b is not None:
            meta[BUDGET_META_KEY] = b.model_dump(exclude_none=True, mode="json")
        lp = coerce_loops(loops)
        if lp is not None:
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
        from ._scope import RunScope

        if run_id is not None and not isinstance(run_id, uuid.UUID):
            text = str(run_id)
            if not text or len(text) > 64 or "\x00" in text:  # it keys a 64-character column
                raise ConfigurationError(f"run_id must be a UUID or a text of 1 to 64 characters, got {run_id!r}")
        meta = self._metadata(feature, route, user_id, tenant_id, budget, loops, attributes)
        return RunScope(self, meta, run_id)

    # -- queries --------------------------------------------------------------------------------

    def run_cost(self, run_id: uuid.UUID | str) -> RunCost | None:
        """What a run cost: live from memory while it is open here, else from the database
        (after flushing what this process still holds); ``None`` for a run never seen.

        ``run_id``: a ``UUID`` or a text of 1 to 64 characters (``ConfigurationError`` otherwise)."""
        rid = _query_run_id(run_id)
        live = self.ledger.run_cost(rid)
        if live is not None:
            return live
        self.flush(timeout=10.0)
        try:
            return self.store.run_cost(rid)
        except Exception:
            recent = self.ledger.recent_run(rid)
            if recent is None:
                raise
            # the database is unreachable: this process still remembers the run (at least its last 1,024 runs)
            logger.warning("costobs: database unavailable; run_cost(%s) answered from memory", rid, exc_info=True)
            return recent.snapshot()

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
        start, end = _moment("since", since), _moment("until", until)
        if start is not None and end is not None and start > end:
            raise ConfigurationError(f"since ({since!r}) is after until ({until!r})")
        filters = _rollup_where(where)
        self.flush(timeout=10.0)
        return self.store.rollup(keys, since=start, until=end, bucket=bucket, where=filters)

    def spans(self, run_id: uuid.UUID | str) -> list[dict[str, Any]]:
        """The stored spans of a run (after flushing), for audits; ``run_id`` as for ``run_cost``."""
        rid = _query_run_id(run_id)
        self.flush(timeout=10.0)
        return self.store.spans_of(rid)

    @property
    def stats(self) -> dict[str, int]:
        """Exporter counters plus the handler's internal errors: check that nothing was lost.

        ``failed`` counts the spans and runs lost, ``refused`` those of them the database refused for their
        content, ``sanitized`` the spans stored with a value made to fit its column (flagged ``sanitized``).
        ``spooled`` counts the items sent to the spool (the database did not take them), ``replayed`` those
        written from it (this process's and those found from processes gone), ``in_spool`` those still only
        there, ``spool_lost`` those of torn or corrupt spool records (counted in ``failed`` too)."""
        out = self.exporter.stats.as_dict()
        sp = self._spool.spool
        out["replayed"] = sp.replayed
        out["in_spool"] = sp.pending()
        out["spool_lost"] = sp.lost
        out["spool_found"] = sp.found
        out["failed"] += sp.lost
        out["internal_errors"] = self.ledger.internal_errors
        out["sanitized"] = self.store.sanitized
        out["open_runs"] = len(self.ledger.runs)
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

    def close(self, timeout: float | None = 30.0) -> None:
        """Flush, stop the exporter and release the database. Idempotent."""
        if self._closed:
            return
        self._closed = True
        li = sys.modules.get("costobs_callbacks.integrations.llamaindex")
        if li is not None:  # leave LlamaIndex's global dispatcher and Settings as they were
            li.uninstrument(self)
        try:
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

