"""Stage pairing: each optical granule with its nearest SAR granule(s) with data in the region, optical
neighbours, clear fractions per date; CSV tables and a summary (a GRASS session in a mapset of its own)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from .. import grassio, pairing, temporal
from ..grass import map_mapset as _mapset, stage_session

log = logging.getLogger("stfuse.steps.pairing")


def optical_table(tgis, optical_state: dict) -> pd.DataFrame:
    """Optical granules from TGIS: id, start_time, a column per band, the validity map."""
    bands = optical_state["bands"]
    opt = temporal.granules(tgis, optical_state["strds"], bands)
    valid = temporal.registered_maps(tgis, optical_state["valid_strds"])[["start_time", "id"]]
    opt = opt.merge(valid.rename(columns={"id": "valid"}), on="start_time", how="left")
    if opt.valid.isna().any():
        when = opt.start_time[opt.valid.isna()].iloc[0]
        raise temporal.DatasetError(f"{optical_state['valid_strds']} has no validity map at {temporal.iso(when)}")
    return opt


def sar_table(tgis, sar_state: dict) -> pd.DataFrame:
    """SAR granules from TGIS: id, start_time, a column per band, and ``data_fraction``: the share of the
    region's cells where the granule's first band has data (0: the granule holds nothing here)."""
    sar = temporal.granules(tgis, sar_state["strds"], sar_state["bands"])
    sar["data_fraction"] = data_fractions(list(sar[sar_state["bands"][0]]))
    return sar


#: most bytes of maps read into memory at once by the pairing step's per-map fractions
READ_CHUNK_BYTES = 256 * 2**20


def _chunks(maps: list[str]):
    """(first index, (n, H, W) float32) over `maps` in the current region, a bounded number at a time."""
    if not maps:
        return
    h, w = grassio.region_shape()
    step = max(1, READ_CHUNK_BYTES // max(1, 4 * h * w))
    for i in range(0, len(maps), step):
        yield i, grassio.read_maps(maps[i:i + step])


def data_fractions(maps: list[str]) -> np.ndarray:
    """Share of the region's cells that are not null, per map."""
    out = np.zeros(len(maps))
    for i, chunk in _chunks(maps):
        out[i:i + len(chunk)] = np.isfinite(chunk).reshape(len(chunk), -1).mean(axis=1)
    return out


def clear_fractions(valid_maps: list[str]) -> np.ndarray:
    """Clear fraction per validity map: the share of the *observed* cells that are clear (valid == 1).

    Observed cells are those whose validity is not null on at least one of the given dates (inside the
    sensor's footprint); cells never observed count neither as clear nor as cloud, so a footprint that
    covers half the region does not make every date half cloudy. 0 for every map when no cell is ever
    observed. The benchmark uses the same definition (:func:`stfuse.metrics.clear_fraction`).
    """
    clear = np.zeros(len(valid_maps))
    observed = None
    for i, chunk in _chunks(valid_maps):
        clear[i:i + len(chunk)] = (chunk == 1).reshape(len(chunk), -1).sum(axis=1)
        seen = np.isfinite(chunk).any(axis=0)
        observed = seen if observed is None else observed | seen
    n_observed = int(observed.sum()) if observed is not None else 0
    return clear / n_observed if n_observed else np.zeros(len(valid_maps))


def _region_text(region: dict) -> str:
    epsg = f"EPSG:{region['epsg']}, " if region.get("epsg") else ""
    return (f"W {region['west']:g}, E {region['east']:g}, S {region['south']:g}, N {region['north']:g} "
            f"({epsg}{region['cols']} x {region['rows']} cells)")


def pairing_step(project_state: dict, optical_state: dict, sar_state: dict, out_dir, *, max_gap_days: float,
                 mode: str = "nearest", k: int = 1, neighbours: int = 2, min_clear: float = 0.0) -> dict:
    """Pair every optical granule with SAR; list optical neighbours; write CSV tables and a summary."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    reads = [_mapset(optical_state["strds"]), _mapset(optical_state["valid_strds"]), _mapset(sar_state["strds"])]
    with stage_session(project_state, "pairing", reads):
        import grass.temporal as tgis

        tgis.init()
        opt = optical_table(tgis, optical_state)
        sar = sar_table(tgis, sar_state)
        opt["clear_fraction"] = clear_fractions(list(opt.valid))
    try:
        pairs, unpaired = pairing.pair_sensors(opt, sar, max_gap_days, mode=mode, k=k, coverage="data_fraction")
    except pairing.NoSarDataError:
        raise temporal.DatasetError(
            f"STRDS {sar_state['strds']} has no data in the study region {_region_text(project_state['region'])}: "
            f"none of its {len(sar)} granules has a non-null cell there (band {sar_state['bands'][0]}); check "
            "config key region and that the SAR files cover the optical scene") from None
    line = pairing.summarise(pairs, unpaired)
    near = pairing.optical_neighbours(opt[["id", "start_time", "clear_fraction"]], k=neighbours,
                                      min_clear=min_clear)
    for frame in (opt, sar, pairs, unpaired, near):
        for col in frame.columns:
            if col.endswith("time"):
                frame[col] = [temporal.iso(t) for t in frame[col]]
    opt.to_csv(out_dir / "optical.csv", index=False)
    sar.to_csv(out_dir / "sar.csv", index=False)
    pairs.to_csv(out_dir / "pairs.csv", index=False)
    unpaired.to_csv(out_dir / "unpaired.csv", index=False)
    near.to_csv(out_dir / "neighbours.csv", index=False)
    log.info("%s", line)
    for r in unpaired.itertuples():
        log.warning("unpaired %s (%s): %s", r.optical_id, r.optical_time, r.reason)
    summary = dict(summary=line, optical=len(opt), sar=len(sar), paired=int(pairs.optical_id.nunique()),
                   unpaired=len(unpaired), mode=mode, k=k, max_gap_days=max_gap_days,
                   sar_without_data=int((sar.data_fraction == 0).sum()),
                   median_clear_fraction=float(opt.clear_fraction.median()), seconds=time.perf_counter() - t0)
    (out_dir / "pairing.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
