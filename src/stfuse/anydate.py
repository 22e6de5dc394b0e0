"""The "any date" gap filling: the dates the filled series answers (config key ``infer.dates``).

Pure pandas/numpy: nothing here imports GRASS. The setting is one of

``"observed"`` (default)
    one filled date per optical acquisition, at its own start time (the series as it always was);
``{"every": <pandas offset alias>, "start": null, "end": null}``
    a regular grid, ``pandas.date_range(start, end, freq=every)``: ``5D`` every 5 days, ``SMS`` the 1st and
    15th of each month (the Level-3A style), ``MS`` the 1st; ``start``/``end`` default to the UTC day (00:00)
    of the first and last optical acquisition;
a list of dates or times
    exactly those (UTC; a date alone is its 00:00 UTC).

Every time is UTC (GRASS has no time zones). :func:`plan_dates` turns the requested times and the optical
acquisitions into the series of dates the model sees: every optical acquisition, plus one **query date** per
requested time with no optical acquisition on its UTC day (no optical maps: never clear, never a neighbour --
:class:`stfuse.dataset.InputAssembler` -- and never in a training tile). Each date answers a list of
``outputs``: the requested times it stands for (an optical date answers the requested times on its UTC day;
in observed mode, its own start time). Registration writes one map set per output time.
"""

from __future__ import annotations

import datetime as dt
import logging

import numpy as np
import pandas as pd

from . import pairing

__all__ = ["OBSERVED", "KEY", "parse_setting", "parse_module_dates", "requested_times", "plan_dates",
           "pair_queries", "output_times"]

log = logging.getLogger("stfuse.anydate")

OBSERVED = "observed"
KEY = "infer.dates"


def _utc(value, where: str) -> pd.Timestamp:
    """A UTC timestamp from a date, datetime or ISO string (naive values are UTC); ValueError naming ``where``."""
    if isinstance(value, bool) or value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"{where}: {value!r} is not a date or time (give an ISO date, e.g. '2021-05-01', "
                         "or a UTC time, e.g. '2021-05-01T10:30:00Z')")
    if isinstance(value, dt.date) and not isinstance(value, dt.datetime):
        value = value.isoformat()
    try:
        ts = pd.Timestamp(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {value!r} is not a date or time (give an ISO date, e.g. '2021-05-01', "
                         "or a UTC time, e.g. '2021-05-01T10:30:00Z')") from None
    if ts is pd.NaT or pd.isna(ts):
        raise ValueError(f"{where}: {value!r} is not a date or time")
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def _offset(alias, where: str):
    if not isinstance(alias, str) or not alias.strip():
        raise ValueError(f"{where}: {alias!r} is not a pandas offset alias (e.g. 5D, 10D, SMS, MS, W)")
    try:
        off = pd.tseries.frequencies.to_offset(alias.strip())
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {alias!r} is not a pandas offset alias (e.g. 5D every 5 days, SMS the 1st "
                         "and 15th of each month, MS the 1st; "
                         "https://pandas.pydata.org/docs/user_guide/timeseries.html#offset-aliases)") from None
    # a step must move forward: pandas accepts "0D" and "-5D", date_range would then loop or run backwards
    probe = pd.Timestamp("2000-01-01", tz="UTC")
    if not probe + off > probe:
        raise ValueError(f"{where}: {alias!r} does not step forward in time")
    return off


def parse_setting(value, where: str = f"config key {KEY}"):
    """The checked setting: ``"observed"``, ``{"every": alias, "start": Timestamp|None, "end": Timestamp|None}``
    or a sorted list of UTC Timestamps; ValueError naming ``where`` (the config key) and the entry at fault."""
    if value is None or value == OBSERVED:
        return OBSERVED
    if isinstance(value, str):
        raise ValueError(f"{where}: {value!r} is neither 'observed', nor {{every: <offset alias>}}, nor a list "
                         "of dates")
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"every", "start", "end"})
        if unknown or "every" not in value:
            raise ValueError(f"{where}: a regular step takes keys every (required), start, end; got "
                             f"{sorted(value)}")
        _offset(value["every"], f"{where}.every")
        start = None if value.get("start") is None else _utc(value["start"], f"{where}.start")
        end = None if value.get("end") is None else _utc(value["end"], f"{where}.end")
        if start is not None and end is not None and end < start:
            raise ValueError(f"{where}: end {end.isoformat()} is before start {start.isoformat()}")
        return {"every": value["every"].strip(), "start": start, "end": end}
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"{where}: the list of dates is empty (use 'observed' for the optical dates)")
        times = [_utc(v, f"{where}[{i}]") for i, v in enumerate(value)]
        seen = {}
        for i, t in enumerate(times):
            if t in seen:
                raise ValueError(f"{where}[{i}]: {value[i]!r} is the same time as {where}[{seen[t]}]")
            seen[t] = i
        return sorted(times)
    raise ValueError(f"{where}: {value!r} is neither 'observed', nor {{every: <offset alias>}}, nor a list of dates")


def parse_module_dates(text: str | None, option: str = "dates"):
    """The setting of i.fusion.temporal's ``dates=``: ``observed``, a pandas offset alias (``5D``, ``SMS``: a
    regular step from the first to the last optical day) or a comma list of dates/times (UTC)."""
    text = (text or "").strip()
    if not text or text == OBSERVED:
        return OBSERVED
    items = [s.strip() for s in text.split(",") if s.strip()]
    if len(items) == 1:
        try:
            _offset(items[0], option)
            return parse_setting({"every": items[0]}, f"{option}={text}")
        except ValueError:
            pass  # not a step: a single date
    try:
        return parse_setting(items, f"{option}={text}")
    except ValueError as exc:
        raise ValueError(f"{exc}; dates= takes observed, an offset alias (e.g. 5D, SMS) or a comma list of "
                         "dates") from None


def requested_times(setting, optical_times) -> pd.DatetimeIndex | None:
    """The requested UTC times of a :func:`parse_setting` value (None: observed mode); a grid's start and end
    default to the UTC days of the first and last of ``optical_times``. ValueError when a grid is empty."""
    if setting == OBSERVED:
        return None
    if isinstance(setting, dict):
        opt = pd.DatetimeIndex(pd.to_datetime(pd.Series(list(optical_times)), utc=True))
        if (setting["start"] is None or setting["end"] is None) and not len(opt):
            raise ValueError(f"{KEY}: a regular step without start and end needs optical dates to span")
        start = setting["start"] if setting["start"] is not None else opt.min().floor("D")
        end = setting["end"] if setting["end"] is not None else opt.max().floor("D")
        grid = pd.date_range(start, end, freq=_offset(setting["every"], f"{KEY}.every"))
        if not len(grid):
            raise ValueError(f"{KEY}: every {setting['every']} from {start.isoformat()} to {end.isoformat()} "
                             "gives no date")
        return grid.tz_convert("UTC")
    return pd.DatetimeIndex(list(setting)).tz_convert("UTC")


def plan_dates(optical_times, requested) -> pd.DataFrame:
    """The dates of the series: every optical acquisition and one query date per requested time with none on
    its UTC day, in time order.

    ``optical_times``: the optical acquisitions' start times (in their order); ``requested``: the
    :func:`requested_times` (None: observed mode). Columns ``optical`` (position in ``optical_times``, -1 for a
    query date), ``query`` (bool), ``start_time`` (UTC) and ``outputs`` (list of UTC Timestamps): in observed
    mode an optical date answers its own start time; otherwise a query date answers its requested time and an
    optical date the requested times on its UTC day (the nearest acquisition of that day when it has several:
    ties to the earlier, then the first given), possibly none.
    """
    opt = pd.DatetimeIndex(pd.to_datetime(pd.Series(list(optical_times), dtype=object), utc=True))
    rows = [dict(optical=i, query=False, start_time=t, outputs=[t] if requested is None else [])
            for i, t in enumerate(opt)]
    if requested is not None:
        days = opt.floor("D")
        ns = opt.as_unit("ns").asi8 if len(opt) else np.zeros(0, dtype=np.int64)  # pandas 2 and 3: ns, not us
        for q in pd.DatetimeIndex(requested).tz_convert("UTC"):
            same = np.flatnonzero(days == q.floor("D"))
            if len(same):
                gap = np.abs(ns[same] - q.as_unit("ns").value)
                best = same[np.lexsort((same, ns[same], gap))[0]]
                rows[best]["outputs"].append(q)
            else:
                rows.append(dict(optical=-1, query=True, start_time=q, outputs=[q]))
    out = pd.DataFrame(rows, columns=["optical", "query", "start_time", "outputs"])
    out["start_time"] = pd.to_datetime(out["start_time"], utc=True)
    # stable: optical dates keep their order among equal times (query dates never share a day with one)
    return out.sort_values("start_time", kind="stable").reset_index(drop=True)


def pair_queries(times, sar: pd.DataFrame, max_gap_days: float, *, mode: str = "nearest", k: int = 1,
                 coverage: str | None = None) -> pd.DataFrame:
    """The SAR granule of each query time, as the pairing step pairs an optical acquisition
    (:func:`stfuse.pairing.pair_sensors`, same mode and maximum gap; rank 1 with ``k_nearest``).

    Returns one row per time, in the given order: ``start_time``, ``sar_id`` (None: no SAR granule within the
    gap) and ``gap_days`` (SAR minus query time, None when unpaired)."""
    times = pd.DatetimeIndex(pd.to_datetime(pd.Series(list(times), dtype=object), utc=True))
    ids = [f"query_{i}" for i in range(len(times))]
    out = pd.DataFrame({"start_time": times, "sar_id": [None] * len(times), "gap_days": [None] * len(times)},
                       index=ids, dtype=object)
    if not len(times):
        return out.reset_index(drop=True)
    queries = pd.DataFrame({"id": ids, "start_time": times})
    sar = sar.copy()
    sar["start_time"] = pd.to_datetime(sar["start_time"], utc=True)
    pairs, _ = pairing.pair_sensors(queries, sar, max_gap_days, mode=mode, k=k if mode == "k_nearest" else 1,
                                    coverage=coverage)
    for r in pairs[pairs["rank"] == 1].itertuples(index=False):
        out.loc[r.optical_id, "sar_id"] = r.sar_id
        out.loc[r.optical_id, "gap_days"] = float(r.gap_days)
    out["start_time"] = times
    return out.reset_index(drop=True)


def output_times(dates: list[dict]) -> list[tuple[int, str]]:
    """(date index, output start time) of every map set to register from cube.json-style ``dates``: each date's
    ``outputs`` in order; without an ``outputs`` key on any date (an older cube.json), every date at its own
    ``start_time``."""
    if not any("outputs" in d for d in dates):
        return [(t, d["start_time"]) for t, d in enumerate(dates)]
    return [(t, o) for t, d in enumerate(dates) for o in (d.get("outputs") or [])]
