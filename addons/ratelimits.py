"""Rate limits per gateway: requests, tokens or cost per window, counted with the `limits` library.

A gateway's configuration holds rules (`rate_limits = [{ limit = 100, window = 60 }, ...]`), each
counting `requests`, `tokens` (billed input + output) or `cost` (USD) per `window` seconds, `fixed` or
`sliding`, keyed by the gateway, the account, the model, the API-key fingerprint or a `cf-aig-metadata`
value; budgets are cost rules over calendar periods or rolling windows. Counters live in the process
(one gateway process alone) or in Redis (`--state-url redis://...`: every worker and every gateway
sharing it counts against the same numbers, atomically - Redis runs the library's scripts).

A sliding token or cost rule (and a rolling budget) counts in the library's sliding-window-counter
form: windows of `window` seconds aligned to the epoch, the previous one weighted by how much of it is
still inside the last `window` seconds (the approximation Cloudflare has described for its rate
limiting). The library's own strategy for it is not used: it can neither give a reservation back nor
settle it into the window it was taken in, so the two windows are the library's plain counters
(`Storage.incr/get`, Redis: INCRBY), one per window, checked after the increment like the fixed window.
A sliding request rule is the library's moving window: exact, one entry per request.

Token rules reserve before the request is forwarded (its `max_tokens`, else the rule's `estimate`, plus
its input at one token per four bytes) and settle when the exchange ends: the difference to the billed
usage is added or given back. So a request is refused once the window's reservations and usage reach the
limit, and the overshoot is bounded by what was in flight. A refused request is never forwarded: 429 JSON
`{"message"}` with `retry-after` and `x-ratelimit-limit/-remaining/-reset`.
(Module name: `limits` is the library's.)
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field

import limits
import limits.aio.strategies
import limits.storage

from cohere_gateway import gateway_file
from cohere_gateway.gateway_file import MICRO

log = logging.getLogger("cohere_gateway.ratelimits")

UNITS = ("requests", "tokens", "cost")
TECHNIQUES = ("fixed", "sliding")
DEFAULT_ESTIMATE = 1024  # output tokens reserved for a request that names no max_tokens
NAMESPACE = "cgw-rl"
STORE_TIMEOUT_S = 2.0


@dataclass(frozen=True, slots=True)
class RateRule:
    limit: int
    window_s: int
    unit: str = "requests"
    technique: str = "fixed"
    key: str = "gateway"
    estimate: int = DEFAULT_ESTIMATE  # token rules: output tokens reserved when max_tokens is absent
    # Budgets: the window is a period aligned to UTC ("day", "week" from Monday, "month"), or, with
    # aligned set and no period, every window_s seconds since the epoch; "" for a rate limit's window.
    period: str = ""
    aligned: bool = False
    rolling: bool = False  # a budget over the last window_s seconds (technique "sliding")

    @property
    def counter(self) -> bool:
        """Counted in two epoch-aligned windows (sliding tokens or cost), not by the library's strategy."""
        return self.technique == "sliding" and self.unit != "requests"

    def item(self) -> limits.RateLimitItem:
        return limits.RateLimitItemPerSecond(self.limit, self.window_s, namespace=NAMESPACE)

    def shown_limit(self) -> str:
        return f"${self.limit / MICRO:g}" if self.unit == "cost" else f"{self.limit} {self.unit}"


def period_of(rule: RateRule, now: float) -> tuple[str, float]:
    """The label of the budget period `now` is in, and when it ends (epoch seconds)."""
    label, _, end = gateway_file.period_of(rule.period, rule.window_s, now)
    return label, end


def budget_rule(budget: gateway_file.Budget) -> RateRule:
    """A budget is a cost limit: over a period or an aligned window (fixed), or rolling (sliding)."""
    return RateRule(
        limit=budget.limit,
        window_s=budget.window_s,
        unit="cost",
        technique="sliding" if budget.rolling else "fixed",
        key=budget.key,
        estimate=DEFAULT_ESTIMATE if budget.estimate is None else budget.estimate,
        period=budget.period,
        aligned=not budget.rolling,
        rolling=budget.rolling,
    )


@dataclass(slots=True)
class Reservation:
    """What one request holds of each token rule until it settles."""

    held: list[tuple[RateRule, str, int]] = field(default_factory=list)  # rule, storage key, amount
    settled: bool = False


@dataclass(frozen=True, slots=True)
class Refusal:
    rule: RateRule
    remaining: int
    reset_at: float  # epoch seconds

    def headers(self, now: float) -> dict[str, str]:
        wait = max(1, math.ceil(self.reset_at - now))
        limit: float = self.rule.limit
        remaining: float = max(0, self.remaining)
        if self.rule.unit == "cost":  # in USD, like the configuration
            limit, remaining = limit / MICRO, remaining / MICRO
        return {
            "retry-after": str(wait),
            "x-ratelimit-limit": f"{limit:g}",
            "x-ratelimit-remaining": f"{remaining:g}",
            "x-ratelimit-reset": str(wait),
        }

    def message(self) -> str:
        if self.rule.rolling:
            return (
                f"budget of this gateway spent: {self.rule.shown_limit()} in the last {self.rule.window_s} s "
                f"(rolling, per {self.rule.key}); it frees as spend leaves the window, see retry-after"
            )
        if self.rule.aligned:
            span = f"this {self.rule.period}" if self.rule.period else f"these {self.rule.window_s} s"
            return (
                f"budget of this gateway spent: {self.rule.shown_limit()} {span} (UTC, per {self.rule.key}); "
                "it resumes in the next period, see retry-after"
            )
        return (
            f"rate limit of this gateway reached: {self.rule.shown_limit()} per {self.rule.window_s} s "
            f"({self.rule.technique} window, per {self.rule.key}); retry after the time in retry-after"
        )


# A counter's key takes the model and metadata values a client chose: longer ones are keyed by their
# digest, so a megabyte of model name is not a megabyte of key in memory or in Redis.
MAX_KEY_PART = 200


def _key_part(value: str) -> str:
    if len(value) <= MAX_KEY_PART:
        return value
    return "sha256:" + hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()


def identity(
    rule: RateRule,
    account: str,
    gateway: str,
    fingerprint: str | None,
    meta: dict[str, str],
    model: str | None = None,
    now: float = 0.0,
) -> tuple[str, ...] | None:
    """The counter a request counts against under `rule`; None: the rule does not apply (no key, or no
    such metadata entry)."""
    base = (rule.unit, rule.technique, str(rule.limit), str(rule.window_s), rule.key)
    if rule.rolling:  # not the counter of a sliding cost rate limit that happens to be equal
        base = (*base, "rolling")
    if rule.aligned:  # a budget: each period its own counter, so it resumes when the next begins
        base = (*base, rule.period, period_of(rule, now)[0])
    if rule.key == "model":
        return (*base, account, gateway, _key_part(model or ""))
    if rule.key == "gateway":
        return (*base, account, gateway)
    if rule.key == "account":
        return (*base, account)
    if rule.key == "api_key":
        return (*base, account, gateway, fingerprint) if fingerprint else None
    name = rule.key.removeprefix("metadata.")
    value = meta.get(name)
    return (*base, account, gateway, _key_part(value)) if value is not None else None


def output_estimate(rule: RateRule, max_tokens: int | None) -> int:
    return max_tokens if isinstance(max_tokens, int) and max_tokens > 0 else rule.estimate


def token_estimate(rule: RateRule, max_tokens: int | None, request_bytes: int) -> int:
    return output_estimate(rule, max_tokens) + request_bytes // 4 + 1


class RateLimiter:
    def __init__(self, state_url: str = "") -> None:
        url = state_url.strip()
        if url and not url.startswith(("redis://", "rediss://")):
            raise ValueError(
                f"state_url must be empty (this process) or redis://HOST:PORT[/DB], got {url[:80]!r}"
            )
        self.shared = bool(url)
        if url:
            self.storage = limits.storage.storage_from_string("async+" + url, implementation="redispy")
        else:
            self.storage = limits.storage.storage_from_string("async+memory://")
        self.fixed = limits.aio.strategies.FixedWindowRateLimiter(self.storage)
        self.moving = limits.aio.strategies.MovingWindowRateLimiter(self.storage)

    async def admit(
        self,
        rules: tuple[RateRule, ...],
        ids: list[tuple[str, ...] | None],
        estimates: list[int],
        now: float | None = None,
    ) -> Reservation | Refusal:
        """Count this request against every rule; the first rule it exceeds refuses it, and what the
        rules before it counted is given back. `now`: the request's time (its event's start_time), which
        picks the windows of budgets and sliding counters."""
        now = time.time() if now is None else now
        taken: list[tuple[RateRule, str, int]] = []
        for rule, key, estimate in zip(rules, ids, estimates, strict=True):
            if key is None:
                continue
            item = rule.item()
            cost = estimate if rule.unit != "requests" else 1
            if rule.counter:
                refusal = await self._hit_counter(rule, key, cost, now, taken)
                if refusal is not None:
                    await self._give_back(taken)
                    return refusal
                continue
            if rule.technique == "sliding":  # requests: the library's moving window, one entry each
                ok = await self.moving.hit(item, *key, cost=cost)
                if ok:
                    taken.append((rule, "", cost))  # the moving window's entries are not given back
            else:
                ok = await self.fixed.hit(item, *key, cost=cost)
                # incr then compare: a refused hit was counted, given back at once
                taken.append((rule, item.key_for(*key), cost))
            if not ok:
                if rule.technique == "fixed":
                    taken.pop()
                    await self._refund(item.key_for(*key), cost)
                await self._give_back(taken)
                strategy = self.moving if rule.technique == "sliding" else self.fixed
                stats = await strategy.get_window_stats(item, *key)
                reset = period_of(rule, now)[1] if rule.aligned else stats.reset_time
                return Refusal(rule, stats.remaining, reset)
        return Reservation([t for t in taken if t[0].unit != "requests"])

    async def _hit_counter(
        self,
        rule: RateRule,
        key: tuple[str, ...],
        cost: int,
        now: float,
        taken: list[tuple[RateRule, str, int]],
    ) -> Refusal | None:
        """The sliding window counter: this window's count after adding `cost`, plus the previous
        window's weighted by the share of it still inside the last window_s seconds, within the limit.
        Two requests racing both see the other's increment, so together they never pass the limit."""
        item, window = rule.item(), rule.window_s
        n = int(now // window)
        current, previous = item.key_for(*key, str(n)), item.key_for(*key, str(n - 1))
        count = await self.storage.incr(current, 2 * window, cost)  # alive while it is the previous one
        before = await self.storage.get(previous)
        weight = 1 - (now / window - n)
        if math.floor(before * weight) + count <= rule.limit:
            taken.append((rule, current, cost))
            return None
        await self._refund(current, cost)
        count -= cost
        remaining = rule.limit - math.floor(before * weight) - count
        return Refusal(rule, remaining, sliding_reset(rule, now, before, count, cost))

    async def _give_back(self, taken: list[tuple[RateRule, str, int]]) -> None:
        for _rule, storage_key, cost in taken:
            if storage_key:  # a sliding window's entry stays until it slides out, as Cloudflare counts
                await self._refund(storage_key, cost)

    async def settle(
        self, reservation: Reservation, billed_tokens: int | None, billed_usd: float | None
    ) -> None:
        """Replace each reservation by what was billed (None: unknown, the reservation stands), in the
        window it was taken in."""
        if reservation.settled:
            return
        reservation.settled = True
        for rule, storage_key, held in reservation.held:
            if rule.unit == "tokens":
                billed = billed_tokens
            else:
                billed = math.ceil(billed_usd * MICRO) if billed_usd is not None else None
            if billed is None:
                continue
            delta = billed - held
            if delta > 0:
                expiry = 2 * rule.window_s if rule.counter else rule.item().get_expiry()
                await self.storage.incr(storage_key, expiry, delta)
            elif delta < 0:
                await self._refund(storage_key, -delta)

    async def _refund(self, storage_key: str, amount: int) -> None:
        """Give back what a window counted, through the storage's public incr (Redis: INCRBY, atomic).
        At most what the window holds now: a window that ended meanwhile is not credited in the next."""
        amount = min(amount, await self.storage.get(storage_key))
        if amount > 0:
            await self.storage.incr(storage_key, 1, -amount)  # an existing key keeps its expiry


def sliding_reset(rule: RateRule, now: float, before: int, count: int, cost: int) -> float:
    """When a sliding counter takes `cost` more: the previous window's weight falls linearly through
    the current window, then the current window becomes the previous one."""
    window, limit = rule.window_s, rule.limit
    n = int(now // window)
    room = limit - count - cost
    if room >= 0:  # the weighted previous window is in the way: wait until enough of it slid out
        share = 1 - room / before if before else 0.0
        return max(now, (n + share) * window)
    if cost > limit:  # never fits: say the longest wait there is
        return (n + 2) * window
    share = 1 - (limit - cost) / count if count else 0.0
    return (n + 1 + max(0.0, share)) * window


async def bounded[T](coro: Awaitable[T], what: str) -> T:
    """A state store that hangs must not hang the request: the caller fails closed on TimeoutError."""
    try:
        return await asyncio.wait_for(coro, STORE_TIMEOUT_S)
    except TimeoutError:
        log.error("rate limit store did not answer %s within %.0f s", what, STORE_TIMEOUT_S)
        raise
