"""The ``costobs`` command: an offline demo, read-only cost reports, and the upkeep of a store.

    costobs demo                       simulated multi-feature, multi-tenant workload + report
    costobs report --by feature model  rollup of a database (``--bucket hour``, ``--since 24h``)
    costobs run RUN_ID                 one run's cost and its spans
    costobs price MODEL [--provider]   how a model is priced (catalog or override), per million tokens
    costobs db upgrade | current | prune --older-than 90d

Every command takes ``--database-url`` before or after its name. Reading commands never create or
change a database: they open SQLite files read-only and say so when there is nothing to read. Every
failure the user can fix (an argument, a path, a server that is down) is one line on stderr and exit
status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, NoReturn
from urllib.parse import quote

__all__ = ["build_parser", "main"]

DEFAULT_DATABASE_URL = "sqlite:///costobs.db"
ROLLUP_TABLE = "costobs_rollups_hourly"
_MAX_AGE_S = 100 * 366 * 86400
_UNITS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class CLIError(Exception):
    """A failure the user can fix, reported as one line (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # one line instead of argparse's usage block: the usage is one ``--help`` away
        self.exit(2, f"{self.prog}: error: {message} (see: {self.prog} --help)\n")


# -- argument types --------------------------------------------------------------------------------

def _duration(value: str) -> timedelta:
    v = value.strip().lower()
    if len(v) >= 2 and v[-1] in _UNITS and v[:-1].isdigit() and int(v[:-1]) > 0:
        seconds = int(v[:-1]) * _UNITS[v[-1]]
        if seconds > _MAX_AGE_S:
            raise argparse.ArgumentTypeError(f"{value!r} is longer than 100 years")
        return timedelta(seconds=seconds)
    raise argparse.ArgumentTypeError(f"{value!r} is not a duration such as 30m, 24h, 90d or 2w")


def _since(value: str) -> datetime:
    """A duration ago (``24h``) or an ISO timestamp (UTC unless it names its offset)."""
    v = value.strip().lower()
    if v[-1:] in _UNITS and v[:-1].isdigit():
        return datetime.now(UTC) - _duration(value)
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is neither a duration (30m, 24h, 7d) nor an ISO timestamp (2026-11-01 or 2026-11-01T08:00)"
        ) from None
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)


def _rollup_keys() -> list[str]:
    from ._store import ROLLUP_KEYS

    return sorted(ROLLUP_KEYS)


def _where(value: str) -> tuple[str, str]:
    key, sep, val = value.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{value!r} is not KEY=VALUE (e.g. tenant_id=acme)")
    if key not in _rollup_keys():
        raise argparse.ArgumentTypeError(f"unknown key {key!r} in {value!r} (one of: {', '.join(_rollup_keys())})")
    return key, val


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number of at least 1")
    return n


# -- opening a database ----------------------------------------------------------------------------

def _shown(url: str) -> str:
    """The URL for messages, password hidden."""
    import sqlalchemy as sa

    try:
        return str(sa.engine.make_url(url).render_as_string(hide_password=True))
    except Exception:
        return url


def _reason(exc: BaseException) -> str:
    """The first line of what the driver said (SQLAlchemy's own text adds the statement and a link)."""
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip() or type(exc).__name__
    return text.splitlines()[0].strip()


def _sqlite_file(url: str) -> str | None:
    """The file of a SQLite URL (None: another database, or an in-memory one)."""
    import sqlalchemy as sa

    try:
        u = sa.engine.make_url(url)
    except sa.exc.ArgumentError as exc:
        raise CLIError(f"invalid database URL {url!r}: {exc}") from None
    if u.get_backend_name() != "sqlite":
        return None
    db = u.database or ""
    if not db or db == ":memory:" or db.startswith("file:"):
        return None
    return os.path.abspath(db)


def _engine_kwargs(url: str) -> dict[str, Any] | None:
    import sqlalchemy as sa

    if sa.engine.make_url(url).get_backend_name() == "postgresql":
        return {"connect_args": {"connect_timeout": 10}}  # a host that drops packets fails in seconds
    return None


def _store(url: str, *, mode: str) -> Any:
    """A ``Store`` on ``url``. ``mode`` "read": the database must exist and hold the head schema; "inspect":
    it must exist (any schema); "write": a missing SQLite file is created. SQLite files are opened read-only
    unless writing, so that reading creates or converts nothing."""
    from ._exceptions import ConfigurationError
    from ._store import HEAD_REVISION, Store

    path = _sqlite_file(url)
    if path is not None:
        if os.path.isdir(path):
            raise CLIError(f"{path} is a directory, not a database file")
        if mode != "write" and not os.path.exists(path):
            raise CLIError(f"no database at {path} (nothing was created; `{_upgrade_hint(url)}` creates one)")
        parent = os.path.dirname(path)
        if not os.path.isdir(parent):
            raise CLIError(f"cannot create the database {path}: the directory {parent} does not exist")
    open_url = url
    if path is not None and mode != "write":
        open_url = f"sqlite:///file:{quote(path)}?mode=ro&uri=true"
    try:
        store = Store(open_url, engine_kwargs=_engine_kwargs(url))
    except ConfigurationError as exc:
        raise CLIError(str(exc)) from None
    if mode == "read":
        try:
            rev = _revision(store, url)
            if rev is None:
                raise CLIError(f"no costobs tables in {_shown(url)} (`{_upgrade_hint(url)}` creates them)")
            if rev != HEAD_REVISION:
                raise CLIError(f"{_shown(url)} is at schema revision {rev}, this costobs reads {HEAD_REVISION} "
                               f"(`{_upgrade_hint(url)}`)")
        except BaseException:
            store.close()
            raise
    return store


def _upgrade_hint(url: str) -> str:
    return f"costobs db upgrade --database-url {shlex.quote(_shown(url))}"


def _revision(store: Any, url: str) -> str | None:
    try:
        return store.current_revision()  # type: ignore[no-any-return]
    except Exception as exc:
        raise CLIError(f"cannot use the database {_shown(url)}: {_reason(exc)}") from None


def _db_call(url: str, fn: Callable[[], Any]) -> Any:
    """Run a database operation; a database error becomes one line naming the database."""
    import sqlalchemy as sa

    try:
        return fn()
    except CLIError:
        raise
    except (sa.exc.SQLAlchemyError, OSError) as exc:
        raise CLIError(f"cannot use the database {_shown(url)}: {_reason(exc)}") from None
    except Exception as exc:
        from alembic.util import CommandError

        if isinstance(exc, CommandError):
            raise CLIError(f"cannot migrate {_shown(url)}: {_reason(exc)}") from None
        raise


def _url(args: argparse.Namespace) -> str:
    return str(args.database_url or os.environ.get("COSTOBS_DATABASE_URL") or DEFAULT_DATABASE_URL)


# -- commands --------------------------------------------------------------------------------------

def _cmd_demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo
    from ._tracker import CostTracker

    url = args.database_url
    if url is None:  # a fresh file each time, unless asked for a database
        url = f"sqlite:///{os.path.join(tempfile.mkdtemp(prefix='costobs-demo-'), 'costobs-demo.db')}"
    store = _store(url, mode="write")
    try:
        # before the workload: with the demo's fixed salt, the tracker would start on a database that is down
        _db_call(url, store.ensure_schema)
    finally:
        store.close()
    with CostTracker(url, tool_prices={"search_kb": "0.001"}, user_salt="demo-salt") as tracker:
        print(f"costobs demo: {args.runs} simulated agent runs -> {url}")
        result = run_demo(tracker, runs=args.runs, seed=args.seed)
        stats = tracker.stats
        print(f"exporter: {stats['exported']} records written, {stats['dropped']} dropped, "
              f"{stats['failed']} failed; handler internal errors: {stats['internal_errors']}")
    db = shlex.quote(url)
    print("\nExplore it:")
    print(f"  costobs report --database-url {db} --by tenant_id model")
    print(f"  costobs report --database-url {db} --by feature --bucket hour --since 24h")
    print(f"  costobs report --database-url {db} --by feature model --where kind=llm --json")
    print(f"  costobs run {result['runaway_id']} --spans --database-url {db}")
    print(f"  costobs db current --database-url {db}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from ._format import key_text, table, usd

    url = _url(args)
    store = _store(url, mode="read")
    try:
        where = dict(args.where or [])
        rows = _db_call(url, lambda: store.rollup(args.by, since=args.since, bucket=args.bucket,
                                                  where=where or None))
    finally:
        store.close()
    if args.json:
        print(json.dumps([_row_json(r) for r in rows], indent=2))
        return 0
    header = [*args.by, *(["bucket"] if args.bucket else []), "runs", "llm", "tools", "input", "output", "cost",
              "avg_ms", "max_ms"]
    cells = []
    for r in rows:
        cells.append([
            *(key_text(r.key[k]) for k in args.by),
            *([r.bucket_start.isoformat() if r.bucket_start else "-"] if args.bucket else []),
            r.runs, r.llm_calls, r.tool_calls, r.input_tokens, r.output_tokens,
            usd(r.cost_usd, r.unpriced_calls, r.llm_calls),
            f"{r.avg_latency_ms:.1f}" if r.avg_latency_ms is not None else "-",
            f"{r.max_latency_ms:.1f}" if r.max_latency_ms is not None else "-",
        ])
    table(print, f"Costs by {', '.join(args.by)}", header, cells)
    for note in _cost_notes(unpriced=any(r.unpriced_calls for r in rows), tools=any(r.tool_calls for r in rows)):
        print(note)
    return 0


def _cost_notes(*, unpriced: bool, tools: bool) -> list[str]:
    """What a cost printed beside unpriced model calls or tool calls covers (a legend under the figures)."""
    notes = []
    if unpriced:
        notes.append("unpriced: model calls without a price, never counted as $0 (tokens kept; price the model with "
                     "CostTracker(prices=...)); a cost beside them is what the priced calls cost")
    if tools:
        notes.append("tools: a tool call without a price (CostTracker(tool_prices=...), or a cost the tool reports) "
                     "is counted, not costed")
    return notes


def _row_json(r: Any) -> dict[str, Any]:
    """A rollup row for ``--json``: ``cost_usd`` is what the priced calls cost, exactly (a decimal text);
    ``unpriced_calls`` the model calls without a price it leaves out."""
    return {
        "key": r.key, "bucket_start": r.bucket_start.isoformat() if r.bucket_start else None,
        "cost_usd": str(r.cost_usd), "input_tokens": r.input_tokens, "output_tokens": r.output_tokens,
        "cache_read_tokens": r.cache_read_tokens, "cache_write_tokens": r.cache_write_tokens,
        "reasoning_tokens": r.reasoning_tokens, "llm_calls": r.llm_calls, "tool_calls": r.tool_calls,
        "runs": r.runs, "avg_latency_ms": r.avg_latency_ms, "max_latency_ms": r.max_latency_ms,
        "unpriced_calls": r.unpriced_calls, "estimated_calls": r.estimated_calls, "cache_hits": r.cache_hits,
        "saved_usd": str(r.saved_usd),
    }


def _cmd_run(args: argparse.Namespace) -> int:
    from ._format import usd
    from ._ledger import run_text

    url = _url(args)
    run_id = run_text(args.run_id)
    store = _store(url, mode="read")
    try:
        rc = _db_call(url, lambda: store.run_cost(run_id))
        # the spans always: one indexed read, and what tells the tool calls without a price
        spans = _db_call(url, lambda: store.spans_of(run_id)) if rc is not None else []
    finally:
        store.close()
    if rc is None:
        print(f"costobs: no run {args.run_id} in {_shown(url)}", file=sys.stderr)
        return 1
    free = [s for s in spans if s["kind"] == "tool" and s["cost_nanos"] is None]
    print(f"run {rc.run_id}: {rc.status}{f' ({rc.reason})' if rc.reason else ''} cost "
          f"{usd(rc.cost_usd, rc.unpriced_calls, rc.llm_calls, places=None)}")
    print(f"  tokens: input {rc.input_tokens} (cached {rc.cache_read_tokens}), output {rc.output_tokens} "
          f"(reasoning {rc.reasoning_tokens}); llm calls {rc.llm_calls}"
          f"{f' ({rc.unpriced_calls} unpriced)' if rc.unpriced_calls else ''}, tool calls {rc.tool_calls}"
          f"{f' ({len(free)} without a price)' if free else ''}")
    print(f"  attributes: {rc.attributes}")
    for m, c in rc.by_model.items():
        print(f"  {m}: {usd(c, places=None)}")
    for m in rc.unpriced_models:
        n = sum(1 for s in spans if s["unpriced"] and s["model"] == m)
        print(f"  {m}: {usd(0, n)}")
    if args.spans:
        below = _unpriced_below(spans)
        for s in spans:
            print(f"  - {s['kind']:<9} {(s['name'] or '')[:40]:<40} {s['status']:<7} {s['latency_ms']:8.1f} ms "
                  f"{_span_cost(s, *below.get(s['span_id'], (0, 0)))}")
    return 0


def _unpriced_below(spans: list[dict[str, Any]]) -> dict[str, tuple[int, int]]:
    """Span id -> (model calls, unpriced model calls) in the subtree under it (itself excluded)."""
    parent = {s["span_id"]: s["parent_id"] for s in spans}
    out: dict[str, list[int]] = {}
    for s in spans:
        if s["kind"] not in ("llm", "embedding"):
            continue
        p, seen = s["parent_id"], set()
        while p is not None and p in parent and p not in seen:  # (a cycle cannot be stored, but never loop)
            seen.add(p)
            acc = out.setdefault(p, [0, 0])
            acc[0] += 1
            acc[1] += 1 if s["unpriced"] else 0
            p = parent[p]
    return {k: (v[0], v[1]) for k, v in out.items()}


def _span_cost(s: dict[str, Any], calls_below: int, unpriced_below: int) -> str:
    """A stored span's own cost as ``run --spans`` shows it; a chain's, retriever's or agent's is what its
    subtree cost (its own is nothing), with the unpriced model calls under it."""
    from ._format import usd

    own = s["cost_nanos"]
    if s["kind"] in ("llm", "embedding"):
        return usd(Decimal(own or 0) / 10**9, 1 if s["unpriced"] else 0, 1, places=9)
    if s["kind"] == "tool":
        return "- (no price)" if own is None else usd(Decimal(own) / 10**9, places=9)
    tree = Decimal(s["tree_cost_nanos"] or 0) / 10**9
    return f"(subtree {usd(tree, unpriced_below, calls_below, places=9)})"


def _cmd_price(args: argparse.Namespace) -> int:
    from ._exceptions import ConfigurationError
    from ._pricing import PriceBook

    try:
        book = PriceBook(args.prices)
    except (ConfigurationError, OSError) as exc:
        raise CLIError(str(exc)) from None
    up = book.unit_prices(args.model, args.provider)
    if up is None:
        print(f"{args.model}: no price (unknown to the catalog; add it with prices=...)")
        return 1
    print(f"{args.model}: input ${up.input}/M, output ${up.output}/M, cache read ${up.cache_read}/M, "
          f"cache write ${up.cache_write}/M  [{up.source}]")
    return 0


def _cmd_db_upgrade(args: argparse.Namespace) -> int:
    from ._store import HEAD_REVISION

    url = _url(args)
    store = _store(url, mode="write")
    try:
        before = _revision(store, url)
        if before == HEAD_REVISION:
            print(f"{_shown(url)}: at the head revision {HEAD_REVISION}, nothing to do")
            return 0
        _db_call(url, store.ensure_schema)
        after = _revision(store, url)
    finally:
        store.close()
    print(f"{_shown(url)}: upgraded from {before or 'an empty database'} to {after}")
    return 0


def _cmd_db_current(args: argparse.Namespace) -> int:
    from ._store import HEAD_REVISION

    url = _url(args)
    store = _store(url, mode="inspect")
    try:
        rev = _revision(store, url)
    finally:
        store.close()
    note = " (no costobs tables)" if rev is None else " (head)" if rev == HEAD_REVISION else ""
    print(f"current: {rev or 'none'}{note}")
    print(f"head:    {HEAD_REVISION}")
    return 0


def _cmd_db_prune(args: argparse.Namespace) -> int:
    import sqlalchemy as sa

    from ._store import runs, spans

    url = _url(args)
    # whole hours: an hour's spans go together, so no hour is left with part of its total
    cut_hour = int((datetime.now(UTC) - args.older_than).timestamp() // 3600)
    cut = datetime.fromtimestamp(cut_hour * 3600, UTC)
    cut_naive = cut.replace(tzinfo=None)
    span_cond = spans.c.hour < cut_hour
    run_cond = sa.and_(runs.c.started_at < cut_naive,
                       sa.or_(runs.c.ended_at.is_(None), runs.c.ended_at < cut_naive))
    store = _store(url, mode="read")  # the database and its schema, checked without creating anything
    store.close()
    store = _store(url, mode="write")
    try:
        def count() -> tuple[int, int, bool]:
            with store.engine.connect() as conn:
                n_spans = conn.execute(sa.select(sa.func.count()).select_from(spans).where(span_cond)).scalar_one()
                n_runs = conn.execute(sa.select(sa.func.count()).select_from(runs).where(run_cond)).scalar_one()
                return int(n_spans), int(n_runs), bool(sa.inspect(conn).has_table(ROLLUP_TABLE))

        n_spans, n_runs, has_rollups = _db_call(url, count)
        when = cut.strftime("%Y-%m-%d %H:%M UTC")
        if not n_spans and not n_runs:
            _db_call(url, lambda: _prune_batches(store, cut.timestamp(), args.batch_size))
            print(f"nothing to prune: no spans or runs before {when} in {_shown(url)}")
            return 0
        if not args.yes:
            kept = (f"the hourly totals in {ROLLUP_TABLE} are kept" if has_rollups else
                    f"this database keeps no hourly rollups ({ROLLUP_TABLE}), so reports will no longer include "
                    "the costs of those hours")
            sys.stderr.write(f"Delete {n_spans:,} spans and {n_runs:,} runs from before {when} in {_shown(url)}? "
                             f"{kept}. [y/N] ")
            sys.stderr.flush()
            answer = sys.stdin.readline().strip().lower()
            if answer not in ("y", "yes"):
                print("costobs: nothing deleted (pass --yes to prune without asking)", file=sys.stderr)
                return 1
        done_spans, done_runs = _db_call(url, lambda: _prune(store, span_cond, run_cond, n_spans, n_runs,
                                                             args.batch_size))
        _db_call(url, lambda: _prune_batches(store, cut.timestamp(), args.batch_size))
    finally:
        store.close()
    print(f"deleted {done_spans:,} spans and {done_runs:,} runs from before {when}")
    return 0


def _prune_batches(store: Any, before: float, batch: int) -> int:
    """Delete the applied-batch ids (``costobs_batches``) of batches formed before ``before`` (epoch seconds), in
    short transactions: they go with the spans of their time (exactly once holds for a spooled batch replayed while
    its spans are kept, see ``_store.applied``). Bookkeeping of ours: not asked about, not counted in the output."""
    from ._store.applied import prune_statement

    n = 0
    while True:
        with store.engine.begin() as conn:
            deleted = conn.execute(prune_statement(before, batch)).rowcount
        if not deleted:
            return n
        n += deleted


def _prune(store: Any, span_cond: Any, run_cond: Any, n_spans: int, n_runs: int, batch: int) -> tuple[int, int]:
    """Delete in batches, one transaction each, so the writers of a live database wait for one batch at most."""
    import sqlalchemy as sa
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from ._store import runs, spans

    jobs = (
        ("spans", n_spans, lambda: sa.delete(spans).where(
            spans.c.id.in_(sa.select(spans.c.id).where(span_cond).order_by(spans.c.id).limit(batch)))),
        ("runs", n_runs, lambda: sa.delete(runs).where(
            runs.c.run_id.in_(sa.select(runs.c.run_id).where(run_cond).limit(batch)))),
    )
    done: list[int] = []
    columns = (TextColumn("pruning {task.description:<5}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True)) as progress:
        for name, total, stmt in jobs:
            task = progress.add_task(name, total=total)
            n = 0
            while True:
                with store.engine.begin() as conn:
                    deleted = conn.execute(stmt()).rowcount
                if not deleted:
                    break
                n += deleted
                progress.update(task, completed=n, total=max(total, n))
            progress.update(task, completed=n, total=max(total, n))
            done.append(n)
    return done[0], done[1]


# -- the parser ------------------------------------------------------------------------------------

def _database_arg(p: argparse.ArgumentParser, *, top: bool = False) -> None:
    # SUPPRESS below the top: a subcommand sets the value only when given there, so either place works
    p.add_argument("--database-url", default=None if top else argparse.SUPPRESS, metavar="URL",
                   help="SQLAlchemy URL (default: $COSTOBS_DATABASE_URL, else sqlite:///costobs.db; "
                        "the demo: a new temporary file)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="costobs", description="What your LLM agents cost.")
    _database_arg(p, top=True)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    d = sub.add_parser("demo", help="run an offline simulated agent workload and print its cost report")
    d.add_argument("--runs", type=_positive_int, default=200)
    d.add_argument("--seed", type=int, default=7)
    d.set_defaults(fn=_cmd_demo)
    r = sub.add_parser("report", help="costs grouped by attribution keys")
    r.add_argument("--by", nargs="+", default=["feature"], choices=_rollup_keys(), metavar="KEY",
                   help=f"one or more of: {', '.join(_rollup_keys())}")
    r.add_argument("--bucket", choices=["hour", "day"])
    r.add_argument("--since", type=_since, help="e.g. 24h, 7d, or an ISO timestamp (UTC)")
    r.add_argument("--where", type=_where, action="append", metavar="KEY=VALUE", help="filter (repeatable)")
    r.add_argument("--json", action="store_true")
    r.set_defaults(fn=_cmd_report)
    rn = sub.add_parser("run", help="one run's cost")
    rn.add_argument("run_id")
    rn.add_argument("--spans", action="store_true")
    rn.set_defaults(fn=_cmd_run)
    pr = sub.add_parser("price", help="show how a model is priced")
    pr.add_argument("model")
    pr.add_argument("--provider")
    pr.add_argument("--prices", help="a YAML or JSON price file of overrides")
    pr.set_defaults(fn=_cmd_price)
    db = sub.add_parser("db", help="the database: schema revision, upgrade, pruning")
    dbs = db.add_subparsers(dest="db_cmd", required=True, metavar="ACTION")
    up = dbs.add_parser("upgrade", help="create the tables, or upgrade them to the head revision")
    up.set_defaults(fn=_cmd_db_upgrade)
    cur = dbs.add_parser("current", help="the database's schema revision and the head revision")
    cur.set_defaults(fn=_cmd_db_current)
    pu = dbs.add_parser("prune", help="delete spans and runs older than a cut-off (asks first)")
    pu.add_argument("--older-than", type=_duration, required=True, metavar="AGE", help="e.g. 90d, 12w, 48h")
    pu.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    pu.add_argument("--batch-size", type=_positive_int, default=5000, help=argparse.SUPPRESS)
    pu.set_defaults(fn=_cmd_db_prune)
    for sp in (d, r, rn, pr, db, up, cur, pu):
        _database_arg(sp)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # a usage error (status 2) or --help (0), returned like every other outcome
        return 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 2
    try:
        return int(args.fn(args))
    except BrokenPipeError:
        # The reader went away (`costobs report ... | head`): what it wanted it has; no traceback, and nothing
        # more written (stdout now points at /dev/null, so the interpreter's final flush cannot fail again).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141  # 128 + SIGPIPE, what a shell reports for a command stopped by a closed pipe
    except CLIError as exc:
        print(f"costobs: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # what a store or the demo's tracker refuses, in one line
        from ._exceptions import ConfigurationError

        if isinstance(exc, ConfigurationError):
            print(f"costobs: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
