"""Cross-sensor and within-sensor pairing of granules (acquisitions) by acquisition time.

Pure pandas/numpy: nothing here imports GRASS. Inputs are DataFrames with one row per granule
and at least the columns

``id``
    granule identifier (a string: an acquisition key or a GRASS map id);
``start_time``
    tz-aware timestamp. Any time zone is accepted and converted to UTC; naive timestamps,
    missing values (NaT) and values that cannot be read as timestamps raise ``ValueError``.

All other columns are carried through to the outputs with their values untouched (see each
function for how they are named).

Tie rules (used everywhere in this module)
------------------------------------------
Candidates are ranked by ``|gap|``; among equal ``|gap|`` the *earlier* granule wins (past
information first: it is what was available at the optical acquisition time), and among equal
times the granule whose ``id`` sorts first lexicographically (as ``str``) wins. A granule at
exactly the same time as the optical one (gap 0) counts both as "before" and as "after".

Every function is vectorised with ``np.searchsorted`` over the time-sorted granules and only
ever looks at ``k`` candidates on each side of each query, so memory and time are
O((N + M) log M + N k); no N x M matrix is built.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import pandas as pd

__all__ = ["MODES", "NoSarDataError", "pair_sensors", "optical_neighbours", "summarise"]

MODES = ("nearest", "before", "after", "k_nearest")

NS_PER_DAY = 86_400 * 1_000_000_000

PAIR_COLUMNS = ("optical_id", "optical_time", "sar_id", "sar_time", "gap_days", "rank")
UNPAIRED_COLUMNS = ("optical_id", "optical_time", "reason")
NEIGHBOUR_COLUMNS = (
    "id",
    "start_time",
    "direction",
    "rank",
    "neighbour_id",
    "neighbour_time",
    "gap_days",
    "neighbour_clear_fraction",
)

#: key under which pair_sensors stores its parameters in ``pairs.attrs`` / ``unpaired.attrs``
ATTRS_KEY = "stfuse.pairing"


# --------------------------------------------------------------------------------------------
# validation helpers


def _check_frame(df: pd.DataFrame, name: str, required: tuple[str, ...]) -> None:
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"{name} must be a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(f"{name} is missing required column(s) {missing}; has {list(df.columns)}")


def _utc_ns(df: pd.DataFrame, name: str, col: str = "start_time") -> pd.DatetimeIndex:
    """Column ``col`` of ``df`` as a UTC DatetimeIndex with ns resolution (raises ValueError)."""
    s = df[col]
    where = f"column '{col}' of {name}"
    if isinstance(s.dtype, pd.DatetimeTZDtype):
        idx = pd.DatetimeIndex(s).tz_convert("UTC")
    elif len(s) == 0:
        idx = pd.DatetimeIndex([], tz="UTC")
    elif pd.api.types.is_datetime64_dtype(s.dtype):
        raise ValueError(f"{where} holds naive timestamps; they must be tz-aware (UTC)")
    else:
        values = []
        for pos, v in enumerate(s.array):
            try:
                ts = pd.Timestamp(v)
            except (TypeError, ValueError) as exc:
                raise ValueError(
                    f"{where}: value {v!r} at row {pos} is not a UTC-convertible timestamp"
                ) from exc
            if ts is pd.NaT:
                raise ValueError(f"{where}: missing time (NaT) at row {pos}")
            if ts.tzinfo is None:
                raise ValueError(
                    f"{where}: value {v!r} at row {pos} is a naive timestamp; "
                    "it must be tz-aware (UTC)"
                )
            values.append(ts.tz_convert("UTC"))
        idx = pd.DatetimeIndex(values)
    if idx.hasnans:
        raise ValueError(f"{where}: missing time (NaT) at row {int(np.flatnonzero(idx.isna())[0])}")
    try:
        return idx.as_unit("ns")
    except (OverflowError, ValueError) as exc:  # outside the ns-representable range
        raise ValueError(f"{where}: times out of the supported range: {exc}") from exc


def _id_keys(df: pd.DataFrame, name: str) -> np.ndarray:
    """Integer sort keys that order ``df['id']`` lexicographically (as str)."""
    ids = df["id"]
    if ids.isna().any():
        raise ValueError(f"column 'id' of {name} has missing values")
    as_str = np.asarray([str(v) for v in ids.array], dtype=object)
    if len(as_str) == 0:
        return np.zeros(0, dtype=np.int64)
    _, inverse = np.unique(as_str, return_inverse=True)
    return inverse.astype(np.int64).ravel()


def _check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return int(k)


def _max_gap_ns(max_gap_days) -> int:
    if isinstance(max_gap_days, bool) or not isinstance(max_gap_days, numbers.Real):
        raise ValueError(f"max_gap_days must be a number > 0, got {max_gap_days!r}")
    value = float(max_gap_days)
    if math.isnan(value) or value <= 0:
        raise ValueError(f"max_gap_days must be > 0, got {max_gap_days!r}")
    if math.isinf(value) or value * NS_PER_DAY >= 2**62:
        return np.iinfo(np.int64).max
    return int(round(value * NS_PER_DAY))


# --------------------------------------------------------------------------------------------
# formatting helpers


def _fmt_num(x: float, decimals: int = 2) -> str:
    text = f"{x:.{decimals}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _fmt_days(x: float, decimals: int = 2) -> str:
    text = _fmt_num(x, decimals)
    return f"{text} day" if text == "1" else f"{text} days"


def _fmt_beyond(abs_gap_days: float, max_gap_days: float) -> str:
    """Format a gap known to exceed the max gap so that it does not *look* equal to it."""
    for decimals in range(2, 10):
        text = _fmt_num(abs_gap_days, decimals)
        if float(text) > max_gap_days:
            return _fmt_days(abs_gap_days, decimals)
    return _fmt_days(abs_gap_days, 9)


# --------------------------------------------------------------------------------------------
# extra columns


def _extras(df: pd.DataFrame, positions: np.ndarray, exclude: tuple[str, ...], prefix: str,
            taken: tuple[str, ...]) -> pd.DataFrame:
    cols = [c for c in df.columns if c not in exclude]
    out = df.iloc[positions][cols].reset_index(drop=True)
    renamed = {c: f"{prefix}{c}" for c in cols}
    clash = [renamed[c] for c in cols if renamed[c] in taken]
    if clash:
        raise ValueError(
            f"extra column(s) {[c for c in cols if renamed[c] in taken]} would be carried through "
            f"as {clash}, which clash with output columns; rename them first"
        )
    return out.rename(columns=renamed)


def _assemble(base: dict, extras: list[pd.DataFrame]) -> pd.DataFrame:
    frame = pd.DataFrame(base)
    frame.index = pd.RangeIndex(len(frame))
    parts = [frame] + [e for e in extras if len(e.columns)]
    if len(parts) == 1:
        return frame
    out = pd.concat(parts, axis=1)
    dup = out.columns[out.columns.duplicated()].tolist()
    if dup:
        raise ValueError(f"carried-through columns clash: {dup}; rename them first")
    return out


# --------------------------------------------------------------------------------------------
# pair_sensors


def pair_sensors(
    optical: pd.DataFrame,
    sar: pd.DataFrame,
    max_gap_days: float,
    mode: str = "nearest",
    k: int = 1,
    coverage: str | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Pair every optical granule with SAR granule(s) acquired within ``max_gap_days``.

    Parameters
    ----------
    optical, sar
        Granule tables with columns ``id`` and ``start_time`` (tz-aware; converted to UTC).
    max_gap_days
        Largest allowed ``|sar_time - optical_time|`` in days, > 0. The boundary is included:
        a gap of exactly ``max_gap_days`` pairs (compared at nanosecond resolution).
    mode
        ``"nearest"``: the single SAR granule with the smallest ``|gap|``.
        ``"before"``: the nearest SAR granule with ``sar_time <= optical_time``.
        ``"after"``: the nearest SAR granule with ``sar_time >= optical_time``.
        ``"k_nearest"``: up to ``k`` granules with the smallest ``|gap|`` (``rank`` 1..k).
    k
        Number of granules for ``"k_nearest"`` (>= 1); must be 1 for the other modes.
    coverage
        Name of a ``sar`` column holding each granule's share of the region with data (0..1),
        or None (every granule is a candidate). With it, granules whose value is 0 hold no data
        in the region and are never paired: the nearest granule *with* data wins, and an optical
        granule whose only candidates within ``max_gap_days`` are empty is unpaired with a
        reason that names the nearest empty one. Raises :class:`NoSarDataError` when no SAR
        granule has data; missing or non-numeric values raise ``ValueError``.

    Ties are broken deterministically: equal ``|gap|`` -> the earlier SAR granule wins (past
    information first; it is what was available at the optical time), then equal times -> the
    ``id`` that sorts first as ``str``. A SAR granule at exactly the optical time (gap 0) is
    both "before" and "after".

    Returns
    -------
    pairs
        Columns ``optical_id, optical_time, sar_id, sar_time, gap_days, rank`` where
        ``gap_days = (sar_time - optical_time)`` in days (negative: SAR before optical) and
        ``rank`` is 1-based; then the other columns of ``optical`` prefixed ``optical_`` and of
        ``sar`` prefixed ``sar_``. Sorted by ``optical_time``, ``optical_id`` (then input
        order), ``rank``. Times are UTC.
    unpaired
        Columns ``optical_id, optical_time, reason`` (a human-readable reason), then the other
        optical columns prefixed ``optical_``; sorted like ``pairs``. Every optical granule is
        in exactly one of the two tables (``k_nearest`` granules with fewer than ``k`` SAR
        granules in range are in ``pairs`` with fewer rows).

    Both tables carry the parameters in ``.attrs["stfuse.pairing"]`` (used by
    :func:`summarise`).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    k = _check_k(k)
    if mode != "k_nearest" and k != 1:
        raise ValueError(f"k must be 1 for mode {mode!r} (got {k}); use mode 'k_nearest'")
    max_ns = _max_gap_ns(max_gap_days)
    _check_frame(optical, "optical", ("id", "start_time"))
    _check_frame(sar, "sar", ("id", "start_time"))
    if coverage is not None:
        return _pair_with_data(optical, sar, max_gap_days, mode, k, coverage)

    o_idx = _utc_ns(optical, "optical")
    s_idx = _utc_ns(sar, "sar")
    o_ns = o_idx.asi8
    s_ns = s_idx.asi8
    o_key = _id_keys(optical, "optical")
    s_key = _id_keys(sar, "sar")
    n, m = len(o_ns), len(s_ns)

    # Optical output order: time, id, input position.
    o_order = np.lexsort((np.arange(n), o_key, o_ns))
    o_sorted_ns = o_ns[o_order]

    # SAR in two orders sharing the same sorted times:
    #   A: time asc, id asc  -> walking forwards gives the "after" side in tie order;
    #   B: time asc, id desc -> walking backwards gives the "before" side in tie order.
    order_a = np.lexsort((np.arange(m), s_key, s_ns))
    order_b = np.lexsort((np.arange(m), -s_key, s_ns))
    rank_a = np.empty(m, dtype=np.int64)
    rank_a[order_a] = np.arange(m)
    t_sorted = s_ns[order_a]

    use_before = mode in ("nearest", "k_nearest", "before")
    use_after = mode in ("nearest", "k_nearest", "after")
    # in nearest/k_nearest, gap-0 granules go on the before side only (no double counting)
    after_inclusive = mode == "after"

    blocks = []  # (candidate sar positions (n, k), valid mask (n, k))
    before_first = after_first = None
    if use_before and m:
        end = np.searchsorted(t_sorted, o_sorted_ns, side="right")
        pos = end[:, None] - 1 - np.arange(k)[None, :]
        ok = pos >= 0
        cand = order_b[np.where(ok, pos, 0)]
        blocks.append((cand, ok))
        before_first = (cand[:, 0], ok[:, 0])
    if use_after and m:
        start = np.searchsorted(t_sorted, o_sorted_ns, side="left" if after_inclusive else "right")
        pos = start[:, None] + np.arange(k)[None, :]
        ok = pos < m
        cand = order_a[np.where(ok, pos, 0)]
        blocks.append((cand, ok))
        after_first = (cand[:, 0], ok[:, 0])

    if blocks:
        cand = np.concatenate([b[0] for b in blocks], axis=1)
        ok = np.concatenate([b[1] for b in blocks], axis=1)
        gap_ns = s_ns[cand] - o_sorted_ns[:, None]
        ok &= np.abs(gap_ns) <= max_ns
        row, col = np.nonzero(ok)
        sar_pos = cand[row, col]
        gap_sel = gap_ns[row, col]
        # rank within each optical granule by (|gap|, time, id) == (|gap|, rank_a)
        srt = np.lexsort((rank_a[sar_pos], np.abs(gap_sel), row))
        row, sar_pos, gap_sel = row[srt], sar_pos[srt], gap_sel[srt]
        rank = np.arange(len(row)) - np.searchsorted(row, row, side="left") + 1
        keep = rank <= k
        row, sar_pos, gap_sel, rank = row[keep], sar_pos[keep], gap_sel[keep], rank[keep]
    else:
        row = sar_pos = gap_sel = rank = np.zeros(0, dtype=np.int64)

    opt_pos = o_order[row]
    pairs = _assemble(
        {
            "optical_id": optical["id"].iloc[opt_pos].reset_index(drop=True),
            "optical_time": o_idx[opt_pos],
            "sar_id": sar["id"].iloc[sar_pos].reset_index(drop=True),
            "sar_time": s_idx[sar_pos],
            "gap_days": gap_sel.astype(np.float64) / NS_PER_DAY,
            "rank": rank.astype(np.int64),
        },
        [
            _extras(optical, opt_pos, ("id", "start_time"), "optical_", PAIR_COLUMNS),
            _extras(sar, sar_pos, ("id", "start_time"), "sar_", PAIR_COLUMNS),
        ],
    )

    # ---- unpaired, with reasons
    paired_rows = np.zeros(n, dtype=bool)
    paired_rows[row] = True
    un_rows = np.flatnonzero(~paired_rows)
    reasons = [
        _reason(r, o_sorted_ns, s_ns, m, mode, float(max_gap_days), before_first, after_first)
        for r in un_rows
    ]
    un_pos = o_order[un_rows]
    unpaired = _assemble(
        {
            "optical_id": optical["id"].iloc[un_pos].reset_index(drop=True),
            "optical_time": o_idx[un_pos],
            "reason": pd.array(reasons, dtype="str"),
        },
        [_extras(optical, un_pos, ("id", "start_time"), "optical_", UNPAIRED_COLUMNS)],
    )

    meta = {
        "mode": mode,
        "k": k,
        "max_gap_days": float(max_gap_days),
        "n_optical": int(n),
        "n_paired": int(n - len(un_rows)),
    }
    pairs.attrs[ATTRS_KEY] = dict(meta)
    unpaired.attrs[ATTRS_KEY] = dict(meta)
    return pairs, unpaired


class NoSarDataError(ValueError):
    """No SAR granule has data in the region (every value of the coverage column is 0)."""


_POS = "_stfuse_position"  # temporary optical column: the input position of each row


def _pair_with_data(optical, sar, max_gap_days, mode, k, coverage):
    """pair_sensors over the SAR granules with data; unpaired reasons name the empty candidates."""
    _check_frame(sar, "sar", (coverage,))
    try:
        cov = pd.to_numeric(sar[coverage]).to_numpy(dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"column '{coverage}' of sar is not numeric: {exc}") from exc
    if np.isnan(cov).any():
        raise ValueError(f"column '{coverage}' of sar has missing values")
    has_data = cov > 0
    if len(sar) and not has_data.any():
        raise NoSarDataError(f"none of the {len(sar)} SAR granules has data in the region "
                             f"(column '{coverage}' is 0 for all)")
    if _POS in optical.columns:
        raise ValueError(f"optical must not have a column named {_POS!r}")
    opt = optical.assign(**{_POS: np.arange(len(optical))})
    pairs, unpaired = pair_sensors(opt, sar[has_data], max_gap_days, mode=mode, k=k)
    if len(unpaired) and not has_data.all():
        # Optical granules that would pair if empty granules counted: their only candidates are empty.
        every, _ = pair_sensors(opt, sar, max_gap_days, mode=mode, k=1 if mode != "k_nearest" else k)
        nearest = every[every["rank"] == 1].set_index(f"optical_{_POS}")
        reasons = unpaired["reason"].tolist()
        for i, pos in enumerate(unpaired[f"optical_{_POS}"]):
            if pos in nearest.index:
                r = nearest.loc[pos]
                side = "before" if r.gap_days < 0 else "after"
                when = "at the optical time" if r.gap_days == 0 else f"{_fmt_days(abs(r.gap_days))} {side}"
                reasons[i] = (reasons[i].replace("no SAR granule", "no SAR granule with data in the region", 1)
                              + f"; {r.sar_id} ({when}) has no data in the region")
        unpaired["reason"] = pd.array(reasons, dtype="str")
    meta = dict(pairs.attrs[ATTRS_KEY], coverage=coverage, n_sar_without_data=int((~has_data).sum()))
    pairs, unpaired = (f.drop(columns=[f"optical_{_POS}"]) for f in (pairs, unpaired))
    for frame in (pairs, unpaired):
        frame.attrs[ATTRS_KEY] = dict(meta)
    return pairs, unpaired


def _reason(r, o_sorted_ns, s_ns, m, mode, max_gap, before_first, after_first) -> str:
    within = f"within {_fmt_days(max_gap)}"
    if m == 0:
        return "SAR dataset is empty"

    def side_gap(first):
        if first is None or not first[1][r]:
            return None
        return (s_ns[first[0][r]] - o_sorted_ns[r]) / NS_PER_DAY

    before = side_gap(before_first)
    after = side_gap(after_first)
    if mode == "before":
        if before is None:
            return "no SAR granule at or before the optical time"
        return (f"no SAR granule before {within} "
                f"(nearest before is {_fmt_beyond(-before, max_gap)} before)")
    if mode == "after":
        if after is None:
            return "no SAR granule at or after the optical time"
        return (f"no SAR granule after {within} "
                f"(nearest after is {_fmt_beyond(after, max_gap)} after)")
    # nearest / k_nearest: report the nearest granule on either side (earlier wins ties)
    if before is not None and (after is None or -before <= after):
        return f"no SAR granule {within} (nearest is {_fmt_beyond(-before, max_gap)} before)"
    return f"no SAR granule {within} (nearest is {_fmt_beyond(after, max_gap)} after)"


# --------------------------------------------------------------------------------------------
# optical_neighbours


def optical_neighbours(optical: pd.DataFrame, k: int = 1, min_clear: float = 0.0) -> pd.DataFrame:
    """Previous and next clear-enough optical acquisitions of every optical granule.

    Parameters
    ----------
    optical
        Columns ``id``, ``start_time`` (tz-aware; converted to UTC) and ``clear_fraction``
        (0..1; missing values are rejected).
    k
        Number of neighbours in each direction (>= 1).
    min_clear
        Only granules with ``clear_fraction >= min_clear`` can be neighbours (the granule
        itself is never its own neighbour; it is listed whatever its own clear fraction).

    Granules are ordered by time, then ``id`` (as ``str``): granules at the same time as the
    focal one are "prev" (gap 0) when their id sorts first and "next" otherwise.

    Returns
    -------
    Long table with columns ``id, start_time, direction ("prev"/"next"), rank (1..k, nearest
    first), neighbour_id, neighbour_time, gap_days (neighbour - granule, negative for prev),
    neighbour_clear_fraction``, then the focal granule's other columns (including its own
    ``clear_fraction``) unchanged. Missing neighbours (series start/end, or too cloudy) are
    simply absent rows. Sorted by start_time, id, direction (prev first), rank.
    """
    k = _check_k(k)
    if isinstance(min_clear, bool) or not isinstance(min_clear, numbers.Real) \
            or not 0.0 <= float(min_clear) <= 1.0:
        raise ValueError(f"min_clear must be a number in [0, 1], got {min_clear!r}")
    _check_frame(optical, "optical", ("id", "start_time", "clear_fraction"))
    idx = _utc_ns(optical, "optical")
    t_ns = idx.asi8
    key = _id_keys(optical, "optical")
    try:
        clear = pd.to_numeric(optical["clear_fraction"]).to_numpy(dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"column 'clear_fraction' of optical is not numeric: {exc}") from exc
    if np.isnan(clear).any():
        raise ValueError("column 'clear_fraction' of optical has missing values")
    if ((clear < 0) | (clear > 1)).any():
        raise ValueError("column 'clear_fraction' of optical must be within [0, 1]")

    n = len(t_ns)
    order = np.lexsort((np.arange(n), key, t_ns))
    qpos = np.flatnonzero(clear[order] >= float(min_clear))  # sorted positions of candidates
    here = np.arange(n)
    steps = np.arange(k)[None, :]

    prev_end = np.searchsorted(qpos, here, side="left")  # candidates strictly before
    next_start = np.searchsorted(qpos, here, side="right")  # candidates strictly after
    prev_q = prev_end[:, None] - 1 - steps
    next_q = next_start[:, None] + steps
    prev_ok = prev_q >= 0
    next_ok = next_q < len(qpos)

    focal, nbr, direction, rank = [], [], [], []
    for q, ok, label in ((prev_q, prev_ok, "prev"), (next_q, next_ok, "next")):
        r, c = np.nonzero(ok)
        focal.append(r)
        nbr.append(qpos[q[r, c]] if len(qpos) else np.zeros(0, dtype=np.int64))
        direction.append(np.full(len(r), label, dtype=object))
        rank.append(c + 1)
    focal = np.concatenate(focal)
    nbr = np.concatenate(nbr)
    direction = np.concatenate(direction)
    rank = np.concatenate(rank).astype(np.int64)
    # sorted position of the focal granule, prev (0) before next (1), rank
    srt = np.lexsort((rank, direction == "next", focal))
    focal, nbr, direction, rank = focal[srt], nbr[srt], direction[srt], rank[srt]

    f_pos = order[focal]
    n_pos = order[nbr]
    return _assemble(
        {
            "id": optical["id"].iloc[f_pos].reset_index(drop=True),
            "start_time": idx[f_pos],
            "direction": pd.array(direction, dtype="str"),
            "rank": rank,
            "neighbour_id": optical["id"].iloc[n_pos].reset_index(drop=True),
            "neighbour_time": idx[n_pos],
            "gap_days": (t_ns[n_pos] - t_ns[f_pos]).astype(np.float64) / NS_PER_DAY,
            "neighbour_clear_fraction": clear[n_pos],
        },
        [_extras(optical, f_pos, ("id", "start_time"), "", NEIGHBOUR_COLUMNS)],
    )


# --------------------------------------------------------------------------------------------
# summarise


def summarise(pairs: pd.DataFrame, unpaired: pd.DataFrame) -> str:
    """One-line summary of :func:`pair_sensors` output, e.g.

    ``"paired 40 of 46 optical granules (mode nearest, max gap 3 d, median |gap| 1.2 d);
    6 unpaired"``

    The number paired is the number of rank-1 rows; the median ``|gap|`` is taken over the
    rank-1 (best) pair of each paired granule. Mode and max gap come from
    ``pairs.attrs["stfuse.pairing"]`` and are left out if those attrs were lost.
    """
    best = pairs.loc[pairs["rank"] == 1, "gap_days"] if len(pairs) else pd.Series([], dtype=float)
    n_paired = int(len(best))
    n_unpaired = int(len(unpaired))
    meta = pairs.attrs.get(ATTRS_KEY) or unpaired.attrs.get(ATTRS_KEY) or {}
    details = []
    if "mode" in meta:
        details.append(f"mode {meta['mode']}")
        if meta["mode"] == "k_nearest":
            details.append(f"k {meta['k']}")
    if "max_gap_days" in meta:
        details.append(f"max gap {_fmt_num(meta['max_gap_days'])} d")
    if n_paired:
        details.append(f"median |gap| {float(np.median(np.abs(best))):.1f} d")
    text = f"paired {n_paired} of {n_paired + n_unpaired} optical granules"
    if details:
        text += f" ({', '.join(details)})"
    return f"{text}; {n_unpaired} unpaired"
