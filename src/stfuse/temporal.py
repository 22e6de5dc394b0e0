"""Reading space-time raster datasets through TGIS (map lists and times never come from file names)."""

from __future__ import annotations

import pandas as pd


class DatasetError(ValueError):
    """An STRDS is missing, empty, has relative time or lacks a band; the message names it."""


def registered_maps(tgis, strds_id: str) -> pd.DataFrame:
    """id, name, start_time (UTC), semantic_label of every map of an absolute-time STRDS, in time order."""
    try:
        ds = tgis.open_old_stds(strds_id, "strds")
    except SystemExit:  # TGIS reports a missing dataset with a fatal message
        raise DatasetError(f"STRDS {strds_id} not found") from None
    if ds.get_temporal_type() != "absolute":
        raise DatasetError(f"STRDS {strds_id} has relative time; stfuse needs absolute (UTC) start times")
    rows = ds.get_registered_maps(columns="id,name,start_time,semantic_label", order="start_time")
    if not rows:
        raise DatasetError(f"STRDS {strds_id} is empty")
    df = pd.DataFrame([dict(r) for r in rows])
    # TGIS stores naive datetimes; stfuse registers UTC only.
    df["start_time"] = pd.to_datetime(df.start_time).dt.tz_localize("UTC")
    return df


def granules(tgis, strds_id: str, bands: list[str]) -> pd.DataFrame:
    """One row per acquisition: id (`<strds name>_<YYYYmmddTHHMMSS>`), start_time, a map id column per band.

    Every acquisition must have every band (identified by semantic label).
    """
    df = registered_maps(tgis, strds_id)
    present = set(df.semantic_label.dropna())
    missing = [b for b in bands if b not in present]
    if missing:
        raise DatasetError(
            f"STRDS {strds_id} has no maps with semantic label {', '.join(missing)}; "
            "set them with r.semantic.label or t.register"
        )
    df = df[df.semantic_label.isin(bands)]
    wide = df.pivot_table(index="start_time", columns="semantic_label", values="id", aggfunc="first")
    for when, row in wide.iterrows():
        lacking = [b for b in bands if pd.isna(row.get(b))]
        if lacking:
            raise DatasetError(
                f"STRDS {strds_id}: the granule at {when.strftime('%Y-%m-%dT%H:%M:%SZ')} lacks band(s) "
                f"{', '.join(lacking)}"
            )
    wide = wide[bands].reset_index()
    wide.columns.name = None
    name = strds_id.split("@")[0]
    wide.insert(0, "id", [f"{name}_{stamp(t)}" for t in wide.start_time])
    return wide


def stamp(when: pd.Timestamp) -> str:
    return when.strftime("%Y%m%dT%H%M%S")


def iso(when: pd.Timestamp) -> str:
    return when.tz_convert("UTC").strftime("%Y-%m-%dT%H:%M:%SZ")
