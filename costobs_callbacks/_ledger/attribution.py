"""Who a run is for: its feature, route, tenant, user (hashed), prompt version and other attributes, and the
policy (budget, loop limits) its metadata gives it, worked out once per distinct set of metadata values."""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import time
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from .._events import usd_to_nanos
from .._exceptions import MissingAttributionError
from .._policy import Budget, LoopPolicy, coerce_budget, coerce_loops
from .model import _NO_META, ATTRIBUTION_KEYS, UNATTRIBUTED, Exporter, Run, logger

if TYPE_CHECKING:
    from .._caps import SpendCaps

BUDGET_META_KEY = "costobs_budget"


LOOPS_META_KEY = "costobs_loops"


_INTERNAL_PREFIXES = ("ls_", "lc_", "langgraph_", "langsmith", "costobs_", "checkpoint_", "__")


_MAX_ATTR_LEN = 256


_MAX_ATTRS = 32


_ATTR_PLANS: dict[tuple[Any, ...], _AttrPlan] = {}


_IGNORED: Any = object()
"""Metadata keys (in order) -> their ``_AttrPlan``. Bounded; filled on the app's threads (a lost race only
recomputes an entry)."""


_MAX_ATTR_PLANS = 1024


_MAX_ATTR_MEMO = 4096


_POLICY_META_KEYS = frozenset({BUDGET_META_KEY, LOOPS_META_KEY})


_Attribution = tuple[str, str | None, str | None, str | None, str | None, Mapping[str, Any], "Budget | None",
                     int | None, "LoopPolicy | None", int, tuple[str, ...]]
"""(feature, route, tenant_id, user_hash, prompt_version, attributes, budget, max_cost_nanos, loops) of a run,
``_first_call`` of its policy, and the flags its attribution earned (``truncated``, ``sanitized``)."""


def _first_call(budget: Budget | None, loops: LoopPolicy | None) -> int:
    """What a policy asks of a new run's first call when that call is a root model call (depth 0, the run's first
    step, nothing spent): ``_FIRST_CHECKED`` (0) if the full checks must run, else ``_FIRST_FREE`` with these bits:
    ``_FIRST_DEFER`` if its request signature is needed (counted at its end, see ``_end_root``), ``_FIRST_ESTIMATE``
    if its cost estimate must fit the budget (no other budget limit can refuse a first call: counts and tokens
    limits are at least 1, nothing is spent yet; a ``max_seconds`` budget takes the full checks)."""
    first = _FIRST_FREE
    if budget is not None:
        if budget.max_seconds is not None:
            return _FIRST_CHECKED
        first |= _FIRST_ESTIMATE
    if loops is None:
        return first
    if (loops.max_depth is not None and loops.max_depth < 0) or (loops.max_steps is not None and loops.max_steps < 1):
        return _FIRST_CHECKED
    reqs = loops.max_identical_model_requests
    if reqs is None:
        return first
    return first | _FIRST_DEFER if reqs > 1 else _FIRST_CHECKED


class _AttrPlan:
    """For one set of metadata keys: the keys whose values decide a run's attribution and policy (attribution
    and policy keys first, then the others), the keys that may be other attributes (with their attribute names),
    and how many of the deciding keys are attribution or policy keys. Hashed by identity (it leads the keys of
    ``Ledger._attr_memo``, which keep it alive)."""

    __slots__ = ("cands", "deciding", "flags", "n")

    def __init__(self, keys: tuple[Any, ...]) -> None:
        cands = []
        flags: list[str] = []
        for k in keys:
            if not isinstance(k, str) or k in ATTRIBUTION_KEYS or k.startswith(_INTERNAL_PREFIXES):
                continue
            if k in ("user", "user_hash"):  # never let a raw id in under another name
                continue
            cands.append((k, _clean(k, flags)))
        deciding = [k for k in keys if isinstance(k, str) and (k in ATTRIBUTION_KEYS or k in _POLICY_META_KEYS)]
        self.n = len(deciding)
        deciding += [k for k, _ in cands]
        self.deciding: tuple[str, ...] = tuple(deciding)
        self.cands: tuple[tuple[str, str], ...] = tuple(cands)
        self.flags: tuple[str, ...] = tuple(flags)


_BUDGETS: dict[tuple[tuple[str, type, Any], ...], Budget] = {}


_LOOP_POLICIES: dict[tuple[tuple[str, type, Any], ...], LoopPolicy] = {}


_MAX_POLICIES = 256


_PLAIN = frozenset({str, int, float, bool, type(None)})


def _policy_key(value: Any) -> tuple[tuple[str, type, Any], ...] | None:
    """A hashable stand-in for a plain policy mapping, JSON-like values only (with their types, so ``True``
    and ``1`` differ), or ``None`` when it is anything else (it is then validated every time)."""
    if type(value) is not dict:
        return None
    key = []
    try:
        for k, v in value.items():
            tv = type(v)
            if type(k) is not str or tv not in _PLAIN:
                return None
            key.append((k, tv, v))
    except RuntimeError:  # changed by another thread meanwhile
        return None
    return tuple(key)


def _present(v: Any) -> bool:
    """An attribution value was given (``None`` and ``""`` are not; never calls the value's own ``__eq__``)."""
    return v is not None and not (isinstance(v, str) and not v)


def _text(v: Any) -> str:
    """Any value as text, without NUL characters (PostgreSQL refuses them); never raises."""
    if isinstance(v, str):
        s = v
    else:
        try:
            s = str(v)
        except Exception:  # an app object whose __str__ fails must not cost us the run
            s = f"<{type(v).__name__}>"
    return s.replace("\x00", "") if "\x00" in s else s


def _clean(v: Any, flags: list[str]) -> str:
    """An attribution value or key as stored: text (``_text``), lone surrogates (which no database encoding takes)
    replaced by U+FFFD (flag ``sanitized``), cut to ``_MAX_ATTR_LEN`` characters (flag ``truncated``)."""
    s = _text(v)
    if not s.isascii() and _SURROGATE.search(s) is not None:
        s = _SURROGATE.sub("\ufffd", s)
        flags.append("sanitized")
    if len(s) > _MAX_ATTR_LEN:
        s = s[:_MAX_ATTR_LEN]
        flags.append("truncated")
    return s


_SURROGATE = re.compile("[\ud800-\udfff]")


def coerce_budget_quiet(value: Any) -> Budget | None:
    """A budget from run metadata: bad input there is logged and ignored (a payload, not config)."""
    if value is None:
        return None
    try:
        return coerce_budget(value)
    except Exception as exc:
        logger.error("costobs: ignoring invalid %s in run metadata: %s", BUDGET_META_KEY, exc)
        return None


def coerce_loops_quiet(value: Any) -> LoopPolicy | None:
    if value is None:
        return None
    try:
        return coerce_loops(value)
    except Exception as exc:
        logger.error("costobs: ignoring invalid %s in run metadata: %s", LOOPS_META_KEY, exc)
        return None


def salt_from(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else value


def user_hash(salt: bytes, user_id: str) -> str:
    """A user id as stored: its HMAC-SHA256 under the tracker's salt, in hex (never the id itself)."""
    return hmac.new(salt, user_id.encode("utf-8", "replace"), hashlib.sha256).hexdigest()


def _copy_attribution(src: Run, dst: Run) -> None:
    """What ``Ledger._attribute`` set on ``src``, onto ``dst``."""
    dst.feature, dst.route, dst.tenant_id, dst.user_hash, dst.prompt_version = (
        src.feature, src.route, src.tenant_id, src.user_hash, src.prompt_version)
    dst.attributes, dst.budget, dst.max_cost_nanos, dst.loops, dst.flags = (
        src.attributes, src.budget, src.max_cost_nanos, src.loops, src.flags)


_FIRST_CHECKED, _FIRST_FREE, _FIRST_DEFER, _FIRST_ESTIMATE = 0, 1, 2, 4


_FIRST_CAPS = 8
"""Beside ``_FIRST_FREE``: the run's tenant or user has spend caps (``SpendCaps.admit`` checks the first call)."""


_FIRST_GUARDED = _FIRST_ESTIMATE | _FIRST_CAPS


class AttributionMixin:
    """A ledger's attribution of runs (``Ledger`` is made of this and the guards' and holds' mixins)."""

    if TYPE_CHECKING:  # set by Ledger.__init__
        exporter: Exporter
        require: tuple[str, ...]
        default_budget: Budget | None
        default_loops: LoopPolicy
        _salt: bytes
        _user_cache: dict[str, str]
        _attr_memo: dict[tuple[Any, ...], _Attribution]
        caps: SpendCaps | None
        _bare_attribution: _Attribution | None

    def hash_user(self, user_id: Any) -> str:
        key = str(user_id)
        h = self._user_cache.get(key)
        if h is None:
            h = user_hash(self._salt, key)
            if len(self._user_cache) > 4096:
                self._user_cache.clear()
            self._user_cache[key] = h
        return h

    def _attribute(self, run: Run, meta: Mapping[str, Any] | None, extra: Mapping[str, Any] | None) -> int:
        """Set the run's attribution and policy from its root's metadata (raises ``MissingAttributionError``,
        the refused run stored).

        What a run gets depends only on the values of a few keys (the attribution keys, other attributes, the
        policy keys), and LangChain sends the same metadata with every call of a feature: the outcome is
        remembered per distinct set of those values while they are plain text (the common case), so most runs
        are attributed with one lookup. Other values (numbers, objects, policy dicts) take the full path.

        Returns what the run's policy asks of its first model call (see ``_first_call``)."""
        if not (meta or extra):
            # No metadata at all (a model called on its own, a lone LlamaIndex call): one outcome, kept at hand.
            hit = self._bare_attribution
            if hit is None:
                hit = self._bare_attribution = self._attribute_slow(run, _NO_META.get, (), _AttrPlan(()))
        else:
            if extra:
                merged: Mapping[str, Any] = {**meta, **extra} if meta else dict(extra)
            else:
                merged = meta or _NO_META
            shape = tuple(merged)
            plan = _ATTR_PLANS.get(shape)
            if plan is None:
                plan = _AttrPlan(shape)
                if len(_ATTR_PLANS) >= _MAX_ATTR_PLANS:
                    _ATTR_PLANS.clear()
                _ATTR_PLANS[shape] = plan
            get = merged.get
            try:
                hit = self._attr_memo.get((plan, *map(get, plan.deciding)))  # plain text values: one lookup
            except TypeError:  # an unhashable value (a policy dict, a list)
                hit = None
            if hit is None:
                hit = self._attribute_slow(run, get, shape, plan)
        (run.feature, run.route, run.tenant_id, run.user_hash, run.prompt_version, run.attributes, run.budget,
         run.max_cost_nanos, run.loops, first, flags) = hit
        if flags:
            run.flags = flags
        return first

    def _attribute_slow(
        self, run: Run, get: Any, shape: tuple[Any, ...],
        plan: _AttrPlan,
    ) -> _Attribution:
        """``_attribute`` without a remembered outcome: work it out, and remember it if the values allow."""
        vals: list[Any] | None = []
        plain = True
        for i, k in enumerate(plan.deciding):
            v = get(k)
            if v is None or type(v) is str:
                vals.append(v)  # type: ignore[union-attr]
                continue
            plain = False
            if i >= plan.n and not isinstance(v, (str, int, float)):
                vals.append(_IGNORED)  # type: ignore[union-attr]  # not an attribute value: dropped, whatever it is
            elif k in _POLICY_META_KEYS and (pk := _policy_key(v)) is not None:
                vals.append((_IGNORED, pk))  # type: ignore[union-attr]
            else:
                vals = None  # another type: not remembered (1 and True are equal keys, not equal values)
                break
        if vals is None:
            return self._resolve_attribution(run, get, plan)
        # Plain values are remembered under the key _attribute looks up; others under a key it can never build.
        mkey = (plan, *vals) if plain else (_IGNORED, plan, *vals)
        memo = self._attr_memo
        hit = memo.get(mkey)
        if hit is None:
            hit = self._resolve_attribution(run, get, plan)
            if len(memo) >= _MAX_ATTR_MEMO:
                memo.clear()
            memo[mkey] = hit
        return hit

    def _resolve_attribution(self, run: Run, get: Any, plan: _AttrPlan) -> _Attribution:
        for key in self.require:
            if not _present(get(key)):
                err = MissingAttributionError(
                    f"run {run.run_id} is missing the attribution key {key!r} "
                    f"(required by CostTracker(require={self.require!r})); pass it in config metadata "
                    f"or tracker.config({key}=...)",
                    run_id=run.run_id,
                    reason="missing_attribution",
                    limit=key,
                )
                run.aborted = err
                run.status = "aborted"
                run.ended_wall = time.time()
                self.exporter.emit(run)  # a refused run: stored with its status and reason, no spans
                raise err
        # An attribution value counts when present: not None and not "" (never calls the value's own __eq__).
        flags: list[str] = list(plan.flags)
        v: Any = get("feature")
        feature = UNATTRIBUTED if not _present(v) else _clean(v, flags)
        v = get("route")
        route = _clean(v, flags) if _present(v) else None
        v = get("tenant_id")
        tenant_id = _clean(v, flags) if _present(v) else None
        v = get("prompt_version")
        prompt_version = _clean(v, flags) if _present(v) else None
        v = get("user_id")
        user_hash = self.hash_user(v if isinstance(v, str) else _text(v)) if _present(v) else None
        attrs: dict[str, Any] = {}
        for k, ck in plan.cands:
            if len(attrs) >= _MAX_ATTRS:
                break
            v = get(k)
            if isinstance(v, str) or (isinstance(v, float) and not math.isfinite(v)):
                attrs[ck] = _clean(v, flags)  # NaN and infinities as text: JSON (PostgreSQL's) has no such numbers
            elif v is None or isinstance(v, (int, float, bool)):
                attrs[ck] = v
        budget_value = get(BUDGET_META_KEY)
        budget = None if budget_value is None else self._budget_from_meta(budget_value)
        if budget is None:
            budget = self.default_budget
        run_budget = max_cost = None
        if budget is not None and not budget.is_empty():
            run_budget = budget
            if budget.max_cost_usd is not None:
                max_cost = usd_to_nanos(budget.max_cost_usd)
        loops_value = get(LOOPS_META_KEY)
        loops = None if loops_value is None else self._loops_from_meta(loops_value)
        if loops is None:
            loops = self.default_loops
        run_loops = loops if loops.enabled else None
        first = _first_call(run_budget, run_loops)
        if first and self.caps is not None and self.caps.applies(tenant_id, user_hash):  # spend caps hook
            first |= _FIRST_CAPS
        return (feature, route, tenant_id, user_hash, prompt_version, MappingProxyType(attrs) if attrs else _NO_META,
                run_budget, max_cost, run_loops, first, tuple(dict.fromkeys(flags)))

    @staticmethod
    def _budget_from_meta(value: Any) -> Budget | None:
        """``coerce_budget_quiet``, remembered per distinct plain mapping (``tracker.config(budget=...)`` puts
        the same small dict in every run's metadata; validating it again costs more than the whole call)."""
        key = _policy_key(value)
        if key is not None:
            hit = _BUDGETS.get(key)
            if hit is not None:
                return hit
            value = {k: v for k, _, v in key}  # validate what the key says (the same items)
        elif isinstance(value, Budget):
            return value
        budget = coerce_budget_quiet(value)
        if key is not None and budget is not None:  # invalid input is not remembered: it is logged every time
            if len(_BUDGETS) >= _MAX_POLICIES:
                _BUDGETS.clear()
            _BUDGETS[key] = budget
        return budget

    @staticmethod
    def _loops_from_meta(value: Any) -> LoopPolicy | None:
        key = _policy_key(value)
        if key is not None:
            hit = _LOOP_POLICIES.get(key)
            if hit is not None:
                return hit
            value = {k: v for k, _, v in key}
        elif isinstance(value, LoopPolicy):
            return value
        loops = coerce_loops_quiet(value)
        if key is not None and loops is not None:
            if len(_LOOP_POLICIES) >= _MAX_POLICIES:
                _LOOP_POLICIES.clear()
            _LOOP_POLICIES[key] = loops
        return loops

