"""The STRDS -> tensor bridge, as workflow steps: cross-sensor pairing, imagery groups, tile export.

Each step opens a GRASS session in a mapset of its own (parallel jobs never share a mapset), reads the
ingest mapsets by fully qualified names, and writes plain files (CSV, JSON, .npy) as its outputs.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import logging
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from . import grass, grassio, pairing, temporal, tiles
from .cube import channel_layout, hide  # noqa: F401  (the cube contract; kept importable from here)
from .ingest import grid_from_project, set_region

log = logging.getLogger("stfuse.bridge")


def stage_mapset(project_state: dict, stage: str) -> str:
    """The pipeline's own mapset for a stage: `<stage>`, or `<prefix>_<stage>` in a user's project."""
    prefix = project_state.get("mapset")
    return f"{prefix}_{stage}" if project_state.get("source") == "grass_project" else stage


@contextlib.contextmanager
def stage_session(project_state: dict, stage: str, read_mapsets):
    """A fresh own mapset for `stage`, the mapsets it reads on its search path, the study region.

    The mapset is replaced only when it is the same study's and holds nothing stfuse did not write there
    (or the project state allows it: `replace_foreign_maps`); on success its marker records what was written.
    """
    project = project_state["project"]
    mapset = stage_mapset(project_state, stage)
    with grass.own_session(project, mapset, study=project_state.get("study"), stage=stage,
                           replace_foreign=project_state.get("replace_foreign_maps", False)) as gs:
        reads = sorted({m for m in read_mapsets if m and m != mapset})
        if reads:
            gs.run_command("g.mapsets", mapset=",".join(reads), operation="add", quiet=True)
        set_region(gs, grid_from_project(project_state))
        yield gs


def map_mapset(map_or_strds_id: str) -> str:
    """The mapset of a fully qualified ``name@mapset`` ("" when unqualified)."""
    return map_or_strds_id.split("@", 1)[1] if "@" in map_or_strds_id else ""


_mapset = map_mapset


# --- pairing -------------------------------------------------------------------------------------------


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


# --- imagery groups ------------------------------------------------------------------------------------


def import_static(gs, static: list[dict], project_state: dict) -> dict[str, str]:
    """Import static layers (e.g. a DEM) from files onto the study grid; returns name -> map id."""
    from .ingest import build_vrt
    from .manifest import inspect_rasters

    if not static:
        return {}
    mapset = gs.gisenv()["MAPSET"]
    rows = inspect_rasters(pd.DataFrame(dict(path=[str(Path(s["file"]).resolve()) for s in static],
                                             line=[f"static[{i}]" for i in range(len(static))])))
    grid = grid_from_project(project_state)
    out = {}
    with tempfile.TemporaryDirectory(prefix="stfuse_static_") as tmp:
        for s, (_, row) in zip(static, rows.iterrows()):
            vrt = Path(tmp) / f"{s['name']}.vrt"
            vrt.write_text(build_vrt(rows.loc[[row.name]], grid, resampling=s.get("resampling", "bilinear")))
            gs.run_command("r.in.gdal", input=str(vrt), output=f"static_{s['name']}", flags="o", quiet=True)
            gs.run_command("r.semantic.label", map=f"static_{s['name']}", semantic_label=s["name"], quiet=True)
            out[s["name"]] = f"static_{s['name']}@{mapset}"
    return out


def groups_step(project_state: dict, optical_state: dict, sar_state: dict, pairing_dir, out_json,
                static: list[dict] | None = None) -> dict:
    """One imagery group per optical acquisition: its bands, validity, paired SAR bands, static layers."""
    static = static or []
    t0 = time.perf_counter()
    pairing_dir = Path(pairing_dir)
    opt = pd.read_csv(pairing_dir / "optical.csv")
    sar = pd.read_csv(pairing_dir / "sar.csv").set_index("id")
    pairs = pd.read_csv(pairing_dir / "pairs.csv")
    pairs = pairs[pairs["rank"] == 1].set_index("optical_id")
    channels = channel_layout(optical_state, sar_state, static)
    reads = [_mapset(optical_state["strds"]), _mapset(optical_state["valid_strds"]), _mapset(sar_state["strds"])]
    groups = []
    with stage_session(project_state, "groups", reads) as gs:
        mapset = gs.gisenv()["MAPSET"]
        static_maps = import_static(gs, static, project_state)
        for r in opt.itertuples(index=False):
            row = r._asdict()
            paired = r.id in pairs.index
            maps = [row[b] for b in optical_state["bands"]] + [row["valid"]]
            sar_id = pairs.loc[r.id, "sar_id"] if paired else None
            maps += [sar.loc[sar_id, b] if paired else None for b in sar_state["bands"]]
            maps += [static_maps[s["name"]] for s in static]
            name = r.id
            # i.group keeps the order given: the channel order of the model.
            gs.run_command("i.group", group=name, subgroup=name, input=",".join(m for m in maps if m), quiet=True)
            groups.append(dict(group=f"{name}@{mapset}", optical_id=r.id, start_time=r.start_time,
                               clear_fraction=float(r.clear_fraction), sar_id=sar_id,
                               sar_gap_days=float(pairs.loc[r.id, "gap_days"]) if paired else None, maps=maps))
    state = dict(project=project_state["project"], mapset=mapset, channels=channels, groups=groups,
                 region=project_state["region"])
    Path(out_json).write_text(json.dumps(state, indent=1) + "\n")
    log.info("%d imagery groups in %s (%d channels: %s) in %.1f s", len(groups), mapset, len(channels),
             ", ".join(c["name"] for c in channels), time.perf_counter() - t0)
    return state


# --- cube and tiles ------------------------------------------------------------------------------------


#: dates read from GRASS per chunk by `read_cube` (peak memory: one chunk of maps, not the cube twice)
CUBE_CHUNK_DATES = 8


def read_cube(groups_state: dict, out: np.ndarray | None = None, *,
              chunk_dates: int = CUBE_CHUNK_DATES) -> np.ndarray:
    """(T, C, H, W) float32 of every group in the current region; absent channels (no SAR) are NaN.

    Reads `chunk_dates` groups at a time with `grassio.read_maps` and places them, so memory peaks at
    one chunk of maps on top of the result. `out` (e.g. a `numpy.lib.format.open_memmap`) receives the
    cube instead of a new array; it must have the cube's shape and dtype float32.
    """
    groups = groups_state["groups"]
    n_chan = len(groups_state["channels"])
    h, w = grassio.region_shape()
    shape = (len(groups), n_chan, h, w)
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    elif tuple(out.shape) != shape or out.dtype != np.float32:
        raise ValueError(f"out must be float32 {shape}, got {out.dtype} {tuple(out.shape)}")
    chunk_dates = max(1, int(chunk_dates))
    for lo in range(0, len(groups), chunk_dates):
        part = groups[lo:lo + chunk_dates]
        names = [m for g in part for m in g["maps"] if m]
        flat = grassio.read_maps(names) if names else None
        i = 0
        for t, g in enumerate(part, start=lo):
            for c, m in enumerate(g["maps"]):
                if m:
                    out[t, c] = flat[i]
                    i += 1
                else:
                    out[t, c] = np.nan
        del flat
    return out


def cube_dates(groups_state: dict) -> list[dict]:
    keys = ("start_time", "optical_id", "sar_id", "sar_gap_days", "clear_fraction")
    return [{k: g[k] for k in keys} for g in groups_state["groups"]]


def read_cube_step(project_state: dict, groups_state: dict, stage: str, out: np.ndarray | None = None,
                   ) -> np.ndarray:
    reads = [_mapset(m) for g in groups_state["groups"] for m in g["maps"] if m]
    with stage_session(project_state, stage, reads):
        return read_cube(groups_state, out)


def cube_step(project_state: dict, groups_json, out_dir) -> dict:
    """Read every imagery group once into `cube.npy` (T, C, H, W) + `cube.json` (channels, dates, region).

    Later stages (tiles, inference, benchmark) read this array and never GRASS: np.load from the page
    cache is ~10x faster than decoding GRASS rasters. `cube.npy` is written through
    `numpy.lib.format.open_memmap` (the same bytes as `np.save` of the array) and filled a chunk of
    dates at a time, under a temporary name renamed at the end.
    """
    t0 = time.perf_counter()
    groups_state = json.loads(Path(groups_json).read_text())
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = out_dir / ".cube.npy.partial"
    reads = [_mapset(m) for g in groups_state["groups"] for m in g["maps"] if m]
    try:
        with stage_session(project_state, "cube", reads):
            shape = (len(groups_state["groups"]), len(groups_state["channels"])) + tuple(grassio.region_shape())
            mm = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=shape)
            read_cube(groups_state, mm)
        mm.flush()
        nbytes = mm.nbytes
        del mm
        os.replace(partial, out_dir / "cube.npy")
    finally:
        if partial.exists():
            partial.unlink()
    meta = dict(channels=groups_state["channels"], dates=cube_dates(groups_state), region=project_state["region"],
                shape=list(shape))
    (out_dir / "cube.json").write_text(json.dumps(meta, indent=1) + "\n")
    log.info("read %s cube (%.1f MB) from GRASS in %.1f s", shape, nbytes / 1e6, time.perf_counter() - t0)
    return meta


def load_cube(cube_dir, hidden=None, *, mmap_mode=None) -> tuple[np.ndarray, dict]:
    """The cube and its metadata; with `hidden` (T, H, W) bool, those cells become gaps (valid 0, bands NaN).

    `mmap_mode` is passed to `np.load`: None reads the cube into memory (hidden cells are then set in that
    array, no second copy); "r" maps it read-only (only without `hidden`); "c" maps it copy-on-write, so
    hiding copies only the memory pages it changes (optical and valid channels at dates with hidden cells)
    and the rest stays in the page cache.
    """
    cube_dir = Path(cube_dir)
    if hidden is not None and mmap_mode in ("r", "r+"):
        raise ValueError(f"load_cube: mmap_mode={mmap_mode!r} with hidden cells would change cube.npy or fail; "
                         "use mmap_mode='c' (copy-on-write) or None")
    cube = np.load(cube_dir / "cube.npy", mmap_mode=mmap_mode)
    meta = json.loads((cube_dir / "cube.json").read_text())
    if hidden is not None:
        cube = hide(cube, meta["channels"], hidden, inplace=True)
    return cube, meta


def tiles_step(cube_dir, out_dir, *, hidden=None, **tile_params) -> dict:
    """Export training tiles from the cube (with the benchmark's hidden cells removed when given)."""
    cube, meta = load_cube(cube_dir, hidden, mmap_mode="c")
    summary = tiles.export_tiles(cube, meta["channels"], meta["dates"], out_dir, region=meta["region"],
                                 **tile_params)
    log.info("tiles: %s", {k: v for k, v in summary.items() if k.startswith("n_")})
    return summary
