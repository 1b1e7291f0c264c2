"""What both sides read from the per-gateway configuration file (`--config`, addons/gateway_config.py):
which entries apply to a gateway, and its budgets.

The gateway validates the whole file with these pieces and enforces the budgets; the read side
(`consume --gateway-config FILE`) reads the same file for its budgets alone, to show each one's use
computed from the events. Data still flows one way: neither side imports the other, both import this.
Nothing here reads a token or a key: the read side never needs the file's secrets and never resolves
them (`tokens_env`, `provider_key` are the gateway's alone).
"""

from __future__ import annotations

import fnmatch
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

MICRO = 1_000_000  # cost counters count micro-dollars: the rate limit library counts integers
PERIODS = ("day", "week", "month")  # budgets: calendar periods, UTC
KEYS = ("gateway", "account", "api_key", "model")  # or "metadata.<name>"
MAX_WINDOW_S = 31 * 24 * 3600
MAX_LIMIT = 10**12
MAX_ESTIMATE = 10_000_000
MAX_RULES = 16
PERIOD_S = {"day": 86400, "week": 7 * 86400, "month": 31 * 86400}


# --- checkers: each raises TypeError for a value it does not accept ----------------------------------


def boolean(v: Any) -> bool:
    if not isinstance(v, bool):
        raise TypeError
    return v


def int_in(lo: int, hi: int) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise TypeError
        return v

    return check


def one_of(choices: tuple[str, ...]) -> Callable[[Any], str]:
    def check(v: Any) -> str:
        if v not in choices:
            raise TypeError
        return v

    return check


def positive(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v <= MAX_LIMIT:
        raise TypeError
    return float(v)


def rule_key(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError
    name = v.removeprefix("metadata.")
    if v in KEYS or (v.startswith("metadata.") and 1 <= len(name) <= 64 and not name.startswith("cf.")):
        return v
    raise TypeError


# --- entry patterns --------------------------------------------------------------------------------


def specificity(account: str, gateway: str) -> tuple[int, int, int]:
    """Sort key of an entry `ACCOUNT/GATEWAY`, least specific first: an exact account beats an exact
    gateway, a literal beats a glob, a longer literal part beats a shorter one."""

    def literal(side: str) -> int:
        return sum(ch not in "*?[]!" for ch in side)

    glob = set("*?[")
    return (not glob & set(account), not glob & set(gateway), literal(account) + literal(gateway))


def matches(account_glob: str, gateway_glob: str, account: str, gateway: str) -> bool:
    return fnmatch.fnmatchcase(account, account_glob) and fnmatch.fnmatchcase(gateway, gateway_glob)


# --- budgets ---------------------------------------------------------------------------------------


def period_of(period: str, window_s: int, now: float) -> tuple[str, float, float]:
    """The label of the budget period `now` is in, its start and its end (epoch seconds): a calendar
    period of UTC ("day", "week" from Monday, "month"), or with no period every window_s seconds since
    the epoch."""
    if not period:
        n = int(now // window_s)
        return str(n), float(n * window_s), float((n + 1) * window_s)
    t = datetime.fromtimestamp(now, UTC)
    start = t.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        end = start + timedelta(days=1)
    elif period == "week":
        start -= timedelta(days=t.weekday())
        end = start + timedelta(days=7)
    else:
        start = start.replace(day=1)
        end = (start + timedelta(days=32)).replace(day=1)
    return start.date().isoformat(), start.timestamp(), end.timestamp()


@dataclass(frozen=True, slots=True)
class Budget:
    """USD (as micro-dollars) per calendar period, per epoch-aligned window, or over the last
    `window_s` seconds (rolling), per `key`."""

    limit: int  # micro-dollars
    window_s: int
    period: str = ""  # "day", "week", "month"; "" with rolling or an epoch-aligned window
    rolling: bool = False
    key: str = "gateway"
    estimate: int | None = None  # output tokens reserved when a request names no max_tokens

    @property
    def usd(self) -> float:
        return self.limit / MICRO

    @property
    def counter(self) -> Budget:
        """What names the gateway's counter: budgets differing only in their estimate share one."""
        return Budget(self.limit, self.window_s, self.period, self.rolling, self.key)

    def windows(self, now: float) -> tuple[float, float, float, float]:
        """(since, split, end, weight): the spend counted at `now` is the spend of [since, split) times
        weight plus the spend of [split, now]; `end` is when the current window ends. A rolling budget is
        the sliding-window counter: the previous window weighted by its share still inside the last
        window_s seconds. A period is its own window (weight 0 for nothing before it)."""
        if self.rolling:
            n = int(now // self.window_s)
            split = float(n * self.window_s)
            weight = 1 - (now / self.window_s - n)
            return split - self.window_s, split, split + self.window_s, weight
        _, start, end = period_of(self.period, self.window_s, now)
        return start, start, end, 0.0

    def describe(self) -> str:
        if self.rolling:
            return f"last {self.window_s} s"
        return self.period or f"{self.window_s} s"


class BudgetError(ValueError):
    """A budget that cannot be used: `key` (e.g. `[0].usd`) and what is wrong and allowed."""

    def __init__(self, key: str, message: str) -> None:
        self.key, self.message = key, message
        super().__init__(f"{key}: {message}")


BUDGET_KEYS: dict[str, tuple[Callable[[Any], Any], str]] = {
    "usd": (positive, "a number of US dollars > 0"),
    "period": (one_of(PERIODS), "one of " + ", ".join(PERIODS) + " (calendar, UTC)"),
    "window": (
        int_in(1, MAX_WINDOW_S),
        f"an integer number of seconds 1..{MAX_WINDOW_S} (periods aligned to the epoch, UTC)",
    ),
    "rolling": (
        int_in(1, MAX_WINDOW_S),
        f"an integer number of seconds 1..{MAX_WINDOW_S} (the spend of the last that many)",
    ),
    "key": (rule_key, "gateway, account, api_key, model or metadata.NAME (a cf-aig-metadata entry)"),
    "estimate": (int_in(1, MAX_ESTIMATE), f"an integer number of output tokens 1..{MAX_ESTIMATE}"),
}
BUDGET_WINDOWS = ("period", "window", "rolling")


def parse_budgets(value: Any) -> tuple[Budget, ...]:
    """A `budgets = [...]` list, validated; raises BudgetError naming the budget and key."""
    if not isinstance(value, list) or len(value) > MAX_RULES:
        raise BudgetError(
            "", f'expected a list of at most {MAX_RULES} budgets: [{{ usd, period = "month" }}]'
        )
    budgets = []
    for i, raw in enumerate(value):
        where = f"[{i}]"
        if not isinstance(raw, dict) or "usd" not in raw or sum(k in raw for k in BUDGET_WINDOWS) != 1:
            raise BudgetError(where, "expected a table with usd and one of period, window or rolling")
        fields: dict[str, Any] = {}
        for key, v in raw.items():
            spec = BUDGET_KEYS.get(key)
            if spec is None:
                raise BudgetError(f"{where}.{key}", f"unknown key; allowed: {', '.join(BUDGET_KEYS)}")
            check, allowed = spec
            try:
                fields[key] = check(v)
            except (TypeError, ValueError):
                raise BudgetError(f"{where}.{key}", f"expected {allowed}, got {repr(v)[:80]}") from None
        period = fields.pop("period", "")
        rolling = fields.pop("rolling", None)
        window = rolling or fields.pop("window", None) or PERIOD_S[period]
        usd = fields.pop("usd")
        budgets.append(Budget(max(1, round(usd * MICRO)), window, period, bool(rolling), **fields))
    return tuple(budgets)


@dataclass(frozen=True, slots=True)
class BudgetFile:
    """The budgets of each entry of a configuration file, least specific entry first (None: the entry
    sets none, so a less specific one's apply)."""

    source: str
    entries: tuple[tuple[str, str, tuple[Budget, ...] | None], ...]

    def budgets_for(self, account: str, gateway: str) -> tuple[Budget, ...]:
        """A gateway's budgets: the list of the most specific matching entry that sets one, whole."""
        found: tuple[Budget, ...] = ()
        for account_glob, gateway_glob, budgets in self.entries:
            if budgets is not None and matches(account_glob, gateway_glob, account, gateway):
                found = budgets
        return found


class FileError(ValueError):
    """The configuration file cannot be read for its budgets."""


def read_budgets(path: Path) -> BudgetFile:
    """The budgets of the file at `path` (the read side's view: nothing else is read)."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise FileError(f"{path}: cannot read the gateway configuration: {exc}") from None
    gateways = data.get("gateways", {})
    if not isinstance(gateways, dict):
        raise FileError(f'{path}: gateways must be tables: [gateways."ACCOUNT/GATEWAY"]')
    entries = []
    for pattern, raw in gateways.items():
        account, _, gateway = str(pattern).partition("/")
        budgets = None
        if isinstance(raw, dict) and "budgets" in raw:
            try:
                budgets = parse_budgets(raw["budgets"])
            except BudgetError as exc:
                raise FileError(f'{path}: gateways."{pattern}".budgets{exc}') from None
        entries.append((account, gateway, budgets))
    entries.sort(key=lambda e: specificity(e[0], e[1]))  # stable: equal ones keep the file's order
    return BudgetFile(str(path), tuple(entries))
