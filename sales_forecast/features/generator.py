"""Walmart-like synthetic weekly sales from a counter-based generator.

Same public API and statistical character as ``sales_forecast/data.py`` (log-normal series levels from store size
x department share x series factor, yearly seasonality per department, holiday uplifts per department and holiday,
an unflagged pre-Christmas peak in the gift departments, AR(1) log-noise with phi 0.75, a slow drift, ~0.3 % net
returns, and exogenous columns that do not move sales), but every random number is a pure function of its keys:

    value = F(hash(seed, stream, store, dept, absolute week))

with ``absolute week = (Friday - 1970-01-02).days // 7``. There is no random state and no origin, so

* the sales of (seed, store, dept, week) are the same whatever window or shape is asked for: one more week extends
  the same history, an earlier end date gives a prefix of it, and a shape with more stores or departments contains
  the smaller shape's series unchanged;
* big shapes can be produced store block by store block (``generate_stores``, ``iter_store_blocks``) with results
  identical to ``generate`` and memory bounded by the block.

Processes that need an origin in a sequential generator are written without one:

* AR(1) log-noise ``ar_t = sum_{k<K} phi^k eps_{t-k}`` over the last K = 57 keyed shocks (phi^K < 1e-7), which has
  the stationary AR(1) distribution and autocorrelation;
* the drift is a sum of three keyed low-frequency sinusoids per series (periods 1.5-10 years) instead of a random
  walk: stationary, smooth, and about as large over a year as the old walk;
* temperature / fuel / CPI / unemployment wander as truncated AR(1) sums with phi 0.97 (a walk over a few months,
  stationary over years); CPI's trend runs from a fixed week (2010-02-05), not from the window's first week.

Exactness: every output element goes through the same sequence of IEEE operations whatever the window, so two
windows agree bit for bit on this machine. (numpy picks SIMD kernels for exp/sin/cos by CPU; another CPU may differ
in the last bit of an intermediate, which the rounding to cents almost never shows.)
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.special import ndtri

from sales_forecast.config import ShapeDefaults

RAW_COLUMNS = ["store", "dept", "date", "weekly_sales", "is_holiday",
               "temperature", "fuel_price", "cpi", "unemployment"]

EPOCH_FRIDAY = dt.date(1970, 1, 2)  # absolute week 0 ends on this Friday
CPI_BASE_WEEK = dt.date(2010, 2, 5)  # the first week of the Walmart data: CPI's trend counts from here

PHI = 0.75  # AR(1) coefficient of the log-noise
AR_SHOCK_SD = 0.07
AR_TAPS = int(np.ceil(np.log(1e-7) / np.log(PHI)))  # 57: phi^K < 1e-7
WHITE_SD = 0.04
DRIFT_TERMS, DRIFT_AMP_SD, DRIFT_PERIODS = 3, 0.05, (78.0, 520.0)  # weeks
EXO_PHI = 0.97
EXO_TAPS = int(np.ceil(np.log(1e-7) / np.log(EXO_PHI)))  # 530
RETURN_RATE = 0.003
HOLIDAY_EFFECTS = {  # holiday: (share of departments affected, uplift range); constant across years
    "super_bowl": (0.15, (0.10, 0.30)),
    "labor_day": (0.15, (0.05, 0.20)),
    "thanksgiving": (0.35, (0.50, 1.00)),
    "christmas": (0.25, (0.10, 0.30)),
}
GIFT_SHARE, GIFT_UPLIFT = 0.3, (0.3, 0.8)  # pre-Christmas (Dec 11-24 week ends, unflagged) peak
BLOCK_CELLS = 1_500_000  # series x weeks per block when generating store block by store block


@dataclass(frozen=True)
class Shape:
    stores: int = ShapeDefaults.stores
    depts: int = ShapeDefaults.depts
    weeks: int = ShapeDefaults.weeks
    seed: int = ShapeDefaults.seed
    end_date: dt.date | None = None  # a Friday; None = the most recent Friday

    @property
    def rows(self) -> int:
        return self.stores * self.depts * self.weeks

    def resolved_end_date(self) -> dt.date:
        return self.end_date or latest_friday(dt.datetime.now(dt.UTC).date())

    def dept_ids(self) -> np.ndarray:
        return np.arange(1, self.depts + 1, dtype=np.int64)

    def dates(self) -> pd.DatetimeIndex:
        """The week-ending Fridays, oldest first."""
        return week_dates(self.resolved_end_date(), self.weeks)


def latest_friday(day: dt.date) -> dt.date:
    return day - dt.timedelta(days=(day.weekday() - 4) % 7)


def week_dates(end_date: dt.date, weeks: int) -> pd.DatetimeIndex:
    return pd.date_range(end=pd.Timestamp(end_date), periods=weeks, freq="7D")


def _nth_weekday(year: int, month: int, weekday: int, n: int) -> dt.date:
    first = dt.date(year, month, 1)
    return first + dt.timedelta(days=(weekday - first.weekday()) % 7 + 7 * (n - 1))


def holidays(year: int) -> dict[str, dt.date]:
    return {
        # The first Sunday of February until the NFL's 17-game seasons (2022), the second since.
        "super_bowl": _nth_weekday(year, 2, 6, 2 if year >= 2022 else 1),
        "labor_day": _nth_weekday(year, 9, 0, 1),  # first Monday of September
        "thanksgiving": _nth_weekday(year, 11, 3, 4),  # fourth Thursday of November
        "christmas": dt.date(year, 12, 25),
    }


def holiday_of_week(week_end: dt.date) -> str | None:
    """The holiday that falls in the seven days ending on ``week_end``, if any."""
    start = week_end - dt.timedelta(days=6)
    for year in {start.year, week_end.year}:
        for name, day in holidays(year).items():
            if start <= day <= week_end:
                return name
    return None


def is_holiday_week(dates: pd.DatetimeIndex | pd.Series) -> np.ndarray:
    index = pd.DatetimeIndex(dates)
    flagged = [day for day in index.unique() if holiday_of_week(day.date()) is not None]
    return np.asarray(index.isin(flagged), dtype=bool)


def is_pre_christmas_week(dates: pd.DatetimeIndex) -> np.ndarray:
    """Weeks ending Dec 11-24: the two unflagged Christmas shopping weeks."""
    index = pd.DatetimeIndex(dates)
    return np.asarray((index.month == 12) & (index.day >= 11) & (index.day <= 24), dtype=bool)


def absolute_weeks(dates: pd.DatetimeIndex) -> np.ndarray:
    """Weeks since the Friday 1970-01-02 (week 0); the key of every weekly random number."""
    days = (pd.DatetimeIndex(dates) - pd.Timestamp(EPOCH_FRIDAY)).days.to_numpy()
    return np.floor_divide(days, 7).astype(np.int64)


# ---------------------------------------------------------------------------------------------- counter-based RNG
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)
_MASK64 = (1 << 64) - 1


class Stream:
    """Stream ids: one per random quantity, so no two quantities share a hash."""
    STORE_SIZE, DEPT_SHARE, SERIES_FACTOR, SEASON_AMP, SEASON_PHASE = 1, 2, 3, 4, 5
    HOLIDAY_AFFECTED, HOLIDAY_SIZE = 10, 20  # + holiday index
    GIFT, GIFT_SIZE = 30, 31
    AR_SHOCK, WHITE, RETURN_FLAG, RETURN_SIZE = 40, 41, 42, 43
    DRIFT_AMP, DRIFT_PERIOD, DRIFT_PHASE = 50, 60, 70  # + term index
    TEMP_BASE, TEMP_AMP, TEMP_SHOCK = 80, 81, 82
    FUEL_BASE, FUEL_SHOCK, FUEL_NATIONAL = 83, 84, 85
    CPI_BASE, CPI_SHOCK, UNEMP_BASE, UNEMP_SHOCK = 86, 87, 88, 89


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer (a bijection of uint64 with full avalanche), vectorized."""
    z = z ^ (z >> _S30)
    z *= _M1
    z ^= z >> _S27
    z *= _M2
    z ^= z >> _S31
    return z


def _mix_int(z: int) -> int:
    z &= _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _key(seed: int, stream: int) -> np.uint64:
    return np.uint64(_mix_int(_mix_int(seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) ^ (stream * 0xD6E8FEB86659FD93)))


def _hash(base, *keys: np.ndarray) -> np.ndarray:
    """hash(base, k1, k2, ...) with broadcasting: h <- mix(h ^ (k * golden)) for each key."""
    h = np.asarray(base, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for key in keys:
            h = _mix(h ^ (np.asarray(key).astype(np.uint64) * _GOLDEN))
    return h


def _uniform(h: np.ndarray) -> np.ndarray:
    """53-bit uniforms in the open interval (0, 1)."""
    return ((h >> _S11).astype(np.float64) + 0.5) * (1.0 / 9007199254740992.0)


def _normal(h: np.ndarray) -> np.ndarray:
    return ndtri(_uniform(h))


def uniform(seed: int, stream: int, *keys: np.ndarray) -> np.ndarray:
    return _uniform(_hash(_key(seed, stream), *keys))


def normal(seed: int, stream: int, *keys: np.ndarray) -> np.ndarray:
    return _normal(_hash(_key(seed, stream), *keys))


# ---------------------------------------------------------------------------------------------------- parameters
def store_sizes(seed: int, stores: np.ndarray) -> np.ndarray:
    """Square feet, log-normal around 130,000."""
    return np.exp(np.log(130_000) + 0.45 * normal(seed, Stream.STORE_SIZE, stores))


def dept_shares(seed: int, depts: np.ndarray) -> np.ndarray:
    return np.exp(1.2 * normal(seed, Stream.DEPT_SHARE, depts))


def series_levels(seed: int, stores: np.ndarray, depts: np.ndarray) -> np.ndarray:
    """(stores, depts) mean weekly sales before seasonality, holidays and noise."""
    factor = np.exp(0.35 * normal(seed, Stream.SERIES_FACTOR, stores[:, None], depts[None, :]))
    return 0.06 * store_sizes(seed, stores)[:, None] * dept_shares(seed, depts)[None, :] * factor


def seasonality(seed: int, depts: np.ndarray, dates: pd.DatetimeIndex) -> np.ndarray:
    """(depts, weeks) yearly seasonal factor by ISO week of year."""
    week_of_year = dates.isocalendar().week.to_numpy(dtype=float)
    amp = 0.2 * uniform(seed, Stream.SEASON_AMP, depts)
    phase = 2 * np.pi * uniform(seed, Stream.SEASON_PHASE, depts)
    return 1.0 + amp[:, None] * np.sin(2 * np.pi * week_of_year[None, :] / 52.18 + phase[:, None])


def holiday_uplifts(seed: int, depts: np.ndarray) -> dict[str, np.ndarray]:
    """Per holiday, the (depts,) uplift (0 for the departments it leaves alone), plus 'pre_christmas' for gifts."""
    out = {}
    for index, (name, (share, (low, high))) in enumerate(HOLIDAY_EFFECTS.items()):
        affected = uniform(seed, Stream.HOLIDAY_AFFECTED + index, depts) < share
        size = low + (high - low) * uniform(seed, Stream.HOLIDAY_SIZE + index, depts)
        out[name] = np.where(affected, size, 0.0)
    gifts = uniform(seed, Stream.GIFT, depts) < GIFT_SHARE
    low, high = GIFT_UPLIFT
    out["pre_christmas"] = np.where(gifts, low + (high - low) * uniform(seed, Stream.GIFT_SIZE, depts), 0.0)
    return out


def holiday_multipliers(seed: int, depts: np.ndarray, dates: pd.DatetimeIndex) -> np.ndarray:
    """(depts, weeks) multiplicative uplift: each holiday lifts only some departments."""
    uplift = np.ones((len(depts), len(dates)))
    names = np.array([holiday_of_week(d.date()) or "" for d in dates])
    sizes = holiday_uplifts(seed, depts)
    for name in HOLIDAY_EFFECTS:
        mask = names == name
        uplift[:, mask] *= 1.0 + sizes[name][:, None]
    uplift[:, is_pre_christmas_week(dates)] *= 1.0 + sizes["pre_christmas"][:, None]
    return uplift


def drift(seed: int, stores: np.ndarray, depts: np.ndarray, weeks: np.ndarray) -> np.ndarray:
    """(stores, depts, weeks) slow stationary log-drift: three keyed low-frequency sinusoids per series."""
    s, d = stores[:, None, None], depts[None, :, None]
    w = weeks.astype(np.float64)[None, None, :]
    low, high = np.log(DRIFT_PERIODS[0]), np.log(DRIFT_PERIODS[1])
    total = np.zeros((len(stores), len(depts), len(weeks)))
    for term in range(DRIFT_TERMS):
        amp = DRIFT_AMP_SD * normal(seed, Stream.DRIFT_AMP + term, s, d)
        period = np.exp(low + (high - low) * uniform(seed, Stream.DRIFT_PERIOD + term, s, d))
        phase = 2 * np.pi * uniform(seed, Stream.DRIFT_PHASE + term, s, d)
        total += amp * np.sin((2 * np.pi / period) * w + phase)
    return total


def _truncated_ar(shocks: np.ndarray, phi: float, taps: int, weeks: int) -> np.ndarray:
    """sum_{k<taps} phi^k shocks[..., t + taps - 1 - k] for t < weeks, in a fixed order (bitwise reproducible)."""
    out = np.zeros(shocks.shape[:-1] + (weeks,))
    term = np.empty_like(out)
    for k in range(taps):
        start = taps - 1 - k
        np.multiply(shocks[..., start:start + weeks], phi ** k, out=term)
        out += term
    return out


def ar_noise(seed: int, stores: np.ndarray, depts: np.ndarray, weeks: np.ndarray) -> np.ndarray:
    """(stores, depts, weeks) AR(1) log-noise, phi 0.75, shocks N(0, 0.07) keyed by absolute week."""
    span = np.arange(weeks[0] - AR_TAPS + 1, weeks[-1] + 1)
    base = _hash(_key(seed, Stream.AR_SHOCK), stores[:, None], depts[None, :])
    shocks = AR_SHOCK_SD * _normal(_hash(base[:, :, None], span[None, None, :]))
    return _truncated_ar(shocks, PHI, AR_TAPS, len(weeks))


def _series_hash(seed: int, stream: int, stores: np.ndarray, depts: np.ndarray, weeks: np.ndarray) -> np.ndarray:
    base = _hash(_key(seed, stream), stores[:, None], depts[None, :])
    return _hash(base[:, :, None], weeks[None, None, :])


@dataclass(frozen=True)
class SalesParts:
    """The hidden state behind the sales of a block, each (stores, depts, weeks) unless said otherwise."""
    level: np.ndarray  # (stores, depts)
    season: np.ndarray  # (depts, weeks)
    uplift: np.ndarray  # (depts, weeks)
    ar: np.ndarray
    drift: np.ndarray
    white: np.ndarray
    returns: np.ndarray  # bool
    sales: np.ndarray


def sales_parts(seed: int, stores: np.ndarray, depts: np.ndarray, dates: pd.DatetimeIndex) -> SalesParts:
    """Weekly sales of stores x depts x dates (ids are 1-based and need not be contiguous) and their components."""
    stores = np.asarray(stores, dtype=np.int64)
    depts = np.asarray(depts, dtype=np.int64)
    weeks = absolute_weeks(dates)
    level = series_levels(seed, stores, depts)
    season = seasonality(seed, depts, dates)
    uplift = holiday_multipliers(seed, depts, dates)
    ar = ar_noise(seed, stores, depts, weeks)
    slow = drift(seed, stores, depts, weeks)
    white = WHITE_SD * _normal(_series_hash(seed, Stream.WHITE, stores, depts, weeks))
    expected = level[:, :, None] * (season * uplift)[None, :, :]
    sales = expected * np.exp(ar + slow + white)
    returns = _uniform(_series_hash(seed, Stream.RETURN_FLAG, stores, depts, weeks)) < RETURN_RATE
    if returns.any():  # occasional net returns, mostly visible in small series
        s, d, w = np.nonzero(returns)
        size = _uniform(_hash(_key(seed, Stream.RETURN_SIZE), stores[s], depts[d], weeks[w]))
        sales[s, d, w] = -0.3 * size * np.minimum(sales[s, d, w], 2_000.0)
    return SalesParts(level, season, uplift, ar, slow, white, returns, sales)


def _store_ar(seed: int, stream: int, keys: np.ndarray, weeks: np.ndarray, sd: float) -> np.ndarray:
    """(len(keys), weeks) stationary AR(1) wander, phi 0.97, keyed shocks (keys = store ids, or [0] = national)."""
    span = np.arange(weeks[0] - EXO_TAPS + 1, weeks[-1] + 1)
    shocks = sd * normal(seed, stream, keys[:, None], span[None, :])
    return _truncated_ar(shocks, EXO_PHI, EXO_TAPS, len(weeks))


def exogenous(seed: int, stores: np.ndarray, dates: pd.DatetimeIndex) -> dict[str, np.ndarray]:
    """(stores, weeks) temperature, fuel price, CPI and unemployment: smooth per-store series, no effect on sales."""
    stores = np.asarray(stores, dtype=np.int64)
    weeks = absolute_weeks(dates)
    week_of_year = dates.isocalendar().week.to_numpy(dtype=float)
    base = 45 + 30 * uniform(seed, Stream.TEMP_BASE, stores)
    amp = 10 + 15 * uniform(seed, Stream.TEMP_AMP, stores)
    temperature = (base[:, None] - amp[:, None] * np.cos(2 * np.pi * (week_of_year[None, :] - 3) / 52.18)
                   + _store_ar(seed, Stream.TEMP_SHOCK, stores, weeks, 1.5))
    national = _store_ar(seed, Stream.FUEL_NATIONAL, np.zeros(1, dtype=np.int64), weeks, 0.02)
    fuel = np.clip((2.6 + 0.6 * uniform(seed, Stream.FUEL_BASE, stores))[:, None]
                   + _store_ar(seed, Stream.FUEL_SHOCK, stores, weeks, 0.03) + national, 1.5, None)
    trend = 1 + 0.0005 * (weeks - absolute_weeks(pd.DatetimeIndex([CPI_BASE_WEEK]))[0]).astype(np.float64)
    cpi = ((126 + 99 * uniform(seed, Stream.CPI_BASE, stores))[:, None] * trend[None, :]
           + _store_ar(seed, Stream.CPI_SHOCK, stores, weeks, 0.05))
    unemployment = np.clip((4.0 + 8.0 * uniform(seed, Stream.UNEMP_BASE, stores))[:, None]
                           + _store_ar(seed, Stream.UNEMP_SHOCK, stores, weeks, 0.05), 2.0, 20.0)
    return {"temperature": temperature, "fuel_price": fuel, "cpi": cpi, "unemployment": unemployment}


# ------------------------------------------------------------------------------------------------------ the frame
def _fill_block(out: dict[str, np.ndarray], offset: int, seed: int, stores: np.ndarray, depts: np.ndarray,
                dates: pd.DatetimeIndex) -> int:
    sales = sales_parts(seed, stores, depts, dates).sales
    exo = exogenous(seed, stores, dates)
    n = sales.size
    rows = slice(offset, offset + n)
    out["weekly_sales"][rows] = np.round(sales.ravel(), 2)
    per_store = (len(stores), len(depts), len(dates))
    for name, decimals in (("temperature", 2), ("fuel_price", 3), ("cpi", 3), ("unemployment", 3)):
        values = np.round(exo[name], decimals)
        out[name][rows] = np.broadcast_to(values[:, None, :], per_store).ravel()
    return offset + n


def generate_stores(shape: Shape, first_store: int, last_store: int) -> pd.DataFrame:
    """The rows of stores ``first_store..last_store`` (1-based, inclusive) of ``generate(shape)``, identical to
    that frame's slice; sorted by store, dept, date."""
    if not 1 <= first_store <= last_store:
        raise ValueError(f"need 1 <= first_store <= last_store, got {first_store}..{last_store}")
    dates = shape.dates()
    stores = np.arange(first_store, last_store + 1, dtype=np.int64)
    depts = shape.dept_ids()
    n_stores, n_depts, n_weeks = len(stores), len(depts), len(dates)
    n = n_stores * n_depts * n_weeks
    out = {name: np.empty(n) for name in ("weekly_sales", "temperature", "fuel_price", "cpi", "unemployment")}
    block = max(1, BLOCK_CELLS // max(1, n_depts * n_weeks))  # stores per block: bounded temporaries
    offset = 0
    for start in range(0, n_stores, block):
        offset = _fill_block(out, offset, shape.seed, stores[start:start + block], depts, dates)
    n_series = n_stores * n_depts
    return pd.DataFrame({
        "store": np.repeat(stores, n_depts * n_weeks),
        "dept": np.tile(np.repeat(depts, n_weeks), n_stores),
        "date": np.tile(dates.values, n_series),
        "weekly_sales": out["weekly_sales"],
        "is_holiday": np.tile(is_holiday_week(dates), n_series),
        "temperature": out["temperature"],
        "fuel_price": out["fuel_price"],
        "cpi": out["cpi"],
        "unemployment": out["unemployment"],
    }, copy=False)  # fresh arrays: no copy, no consolidation


def iter_store_blocks(shape: Shape, stores_per_block: int = 64) -> Iterator[pd.DataFrame]:
    """``generate(shape)`` in consecutive store blocks, for shapes too big to hold at once."""
    for first in range(1, shape.stores + 1, stores_per_block):
        yield generate_stores(shape, first, min(shape.stores, first + stores_per_block - 1))


def generate(shape: Shape) -> pd.DataFrame:
    """Raw weekly sales, one row per (store, dept, week), sorted by store, dept, date."""
    if shape.stores < 1 or shape.depts < 1 or shape.weeks < 1:
        return generate_stores(Shape(1, 1, 1, shape.seed, shape.resolved_end_date()), 1, 1).iloc[0:0]
    return generate_stores(shape, 1, shape.stores)
