"""Gap filling of an optical STRDS with a SAR STRDS inside a running GRASS session (i.fusion.temporal's engine).

:func:`fill_strds` does what the workflow does from ``pairing`` to ``register``, for one region held in memory,
in the GRASS session that calls it (the module's, or a notebook's ``stfuse.grass.session``), writing only
into that session's CURRENT mapset:

1. the granules of the STRDS come from TGIS (:func:`stfuse.temporal.granules`; semantic labels name the bands);
2. validity per optical date: a validity STRDS (``mask=``, 0/1 maps), or a classification band of the
   optical STRDS (``mask_band=`` with ``valid_classes=``: 1 where the class is clear and every band has data,
   0 elsewhere, null where the class is null, as :mod:`stfuse.ingest` derives it), or neither (1 where every
   band has data, 0 where only some have, null where none has);
3. each optical date is paired with the nearest SAR granule with data in the region within ``max_gap_days``
   (:func:`stfuse.pairing.pair_sensors`);
4. every check (names, search path, existing outputs, the checkpoint's channels, the memory estimate) runs
   before a pixel is read, and nothing is written before every check has passed;
5. the (T, C, H, W) cube of the current computational region is read (:func:`stfuse.cube.read_cube`,
   the channel layout of :func:`stfuse.cube.channel_layout`);
6. a checkpoint the workflow trained is loaded (``model=``), or a model is trained in place on tiles in a
   temporary directory (:func:`stfuse.tiles.export_tiles`, :func:`stfuse.train.train`);
7. inference over the whole region (:func:`stfuse.infer.predict_cube`); each filled map and flag map is
   written with :func:`stfuse.grassio.write_map` and registered as STRDS ``output`` (band names as semantic
   labels, the optical UTC start times) and ``flag_output`` (default ``<output>_flag``).

The whole region is held in memory in this version: :func:`estimate_bytes` says how much, and a region above
``memory_mb`` is refused before reading.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from . import cube as cube_mod
from . import grassio, pairing, temporal
from .steps.pairing import data_fractions

log = logging.getLogger("stfuse.fusion")

#: Sentinel-2 SCL classes that count as clear (vegetation, bare soil, water, unclassified, snow)
DEFAULT_VALID_CLASSES = (4, 5, 6, 7, 11)
#: the model trained in place: the workflow's default (config.yaml train.model / model_params)
MODEL, MODEL_PARAMS = "unet", {"base_channels": 16, "depth": 2}
#: K previous and K next optical dates of a model trained in place (config pairing.neighbours)
K_NEIGHBOURS = 2


class FusionError(ValueError):
    """Bad input to :func:`fill_strds`; the message names the option, STRDS, map or file at fault."""


@dataclass
class Plan:
    """What :func:`fill_strds` will read and write, known before a pixel is read."""

    optical: str
    sar: str
    mask: str | None
    bands: list[str]
    sar_bands: list[str]
    mask_band: str | None
    valid_classes: list[int]
    opt: pd.DataFrame  # optical granules: id, start_time, a map per band, [valid | mask band]
    sar_table: pd.DataFrame  # SAR granules: id, start_time, a map per band
    shape: tuple[int, int, int, int]  # T, C, rows, cols
    maps: dict  # output map names per (date index, band) and per date ("flag")
    output: str
    flag_output: str
    nbytes: int = 0
    checkpoint: dict | None = None
    pairs: pd.DataFrame | None = None
    unpaired: pd.DataFrame | None = None
    notes: list[str] = field(default_factory=list)


# --- names, search path, STRDS ----------------------------------------------------------------------------


def _search_path(gs) -> list[str]:
    return [m for m in gs.read_command("g.mapsets", flags="p", separator="comma", quiet=True).strip().split(",") if m]


def resolve_strds(gs, tgis, dbif, name: str, option: str) -> str:
    """The full id ``name@mapset`` of an existing STRDS; FusionError naming the option and what to do.

    An unqualified name is looked up in the current mapset, then along the search path (as GRASS finds
    maps); a qualified one must be in a mapset on the search path (TGIS reads no other mapset's database).
    """
    current, path = gs.gisenv()["MAPSET"], _search_path(gs)
    with_tgis = set(tgis.get_available_temporal_mapsets())  # on the search path, with a temporal database
    searched = [m for m in dict.fromkeys([current, *path]) if m in with_tgis]
    if "@" in name:
        mapset = name.split("@", 1)[1]
        if mapset != current and mapset not in path:
            raise FusionError(
                f"{option}={name}: mapset <{mapset}> is not on the search path of the current mapset <{current}>, "
                f"so TGIS cannot read it; add it with: g.mapsets mapset={mapset} operation=add")
        candidates = [name] if mapset in with_tgis else []
    else:
        candidates = [f"{name}@{m}" for m in searched]
    for strds_id in candidates:
        if tgis.dataset_factory("strds", strds_id).is_in_db(dbif):
            return strds_id
    where = "" if "@" in name else f" in the mapsets {', '.join(searched) or '(none with a temporal database)'}"
    raise FusionError(f"{option}={name}: space time raster dataset <{name}> not found{where}")


def _labels(tgis, strds_id: str, option: str) -> list[str]:
    """Semantic labels of an STRDS in sorted order; FusionError when its maps have none."""
    maps = _registered(tgis, strds_id, option)
    labels = sorted(set(maps.semantic_label.dropna()) - {""})
    if not labels:
        raise FusionError(f"{option}={strds_id}: its maps have no semantic labels (the bands); set them with "
                          "r.semantic.label or t.register, or name the maps' labels with bands=")
    return labels


def _registered(tgis, strds_id: str, option: str) -> pd.DataFrame:
    try:
        return temporal.registered_maps(tgis, strds_id)
    except temporal.DatasetError as exc:
        raise FusionError(f"{option}={strds_id}: {exc}") from None


def _granules(tgis, strds_id: str, bands: list[str], option: str) -> pd.DataFrame:
    try:
        return temporal.granules(tgis, strds_id, bands)
    except temporal.DatasetError as exc:
        raise FusionError(f"{option}={strds_id}: {exc}") from None


def choose_bands(tgis, strds_id: str, option: str, given, exclude=(), from_model=None) -> list[str]:
    """The bands to use, in channel order: as given, else the checkpoint's, else every label but ``exclude``."""
    if given:
        return list(given)
    if from_model:
        return list(from_model)
    bands = [b for b in _labels(tgis, strds_id, option) if b not in set(exclude)]
    if not bands:
        raise FusionError(f"{option}={strds_id}: no band left besides {', '.join(exclude)}")
    return bands


def _with_validity(tgis, opt: pd.DataFrame, mask_id: str | None) -> pd.DataFrame:
    """Add the validity map of each optical date (``valid``) from the mask STRDS, matched by start time."""
    if mask_id is None:
        return opt
    valid = _registered(tgis, mask_id, "mask")[["start_time", "id"]].drop_duplicates("start_time")
    out = opt.merge(valid.rename(columns={"id": "valid"}), on="start_time", how="left")
    if out.valid.isna().any():
        when = out.start_time[out.valid.isna()].iloc[0]
        raise FusionError(f"mask={mask_id} has no validity map at {temporal.iso(when)}, a date of the optical STRDS")
    return out


# --- outputs -----------------------------------------------------------------------------------------------


def output_maps(output: str, flag_output: str, bands: list[str], times) -> dict:
    """Names of the maps to write: ``(t, band) -> <output>_<band>_<stamp>``, ``(t, "flag") -> <flag>_<stamp>``."""
    names = {}
    for t, when in enumerate(times):
        stamp = temporal.stamp(pd.Timestamp(when))
        for band in bands:
            names[(t, band)] = f"{output}_{band}_{stamp}"
        names[(t, "flag")] = f"{flag_output}_{stamp}"
    return names


def existing_outputs(gs, tgis, dbif, strds_names: list[str], maps) -> list[str]:
    """What already exists in the current mapset among the output STRDS and maps (for --overwrite)."""
    mapset = gs.gisenv()["MAPSET"]
    found = [f"space time raster dataset <{n}@{mapset}>" for n in strds_names
             if tgis.dataset_factory("strds", f"{n}@{mapset}").is_in_db(dbif)]
    cellhd = Path(gs.gisenv()["GISDBASE"], gs.gisenv()["LOCATION_NAME"], mapset, "cellhd")
    taken = [m for m in maps if (cellhd / m).exists()]
    if taken:
        more = f" and {len(taken) - 3} more" if len(taken) > 3 else ""
        found.append(f"raster map(s) <{'>, <'.join(taken[:3])}>{more}")
    return found


def _check_names(output: str, flag_output: str) -> None:
    import re

    for option, name in (("output", output), ("flag_output", flag_output)):
        if "@" in name:
            raise FusionError(f"{option}={name}: outputs are written into the current mapset; give the name "
                              "without @mapset")
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name):
            raise FusionError(f"{option}={name}: not a legal map name (a letter, then letters, digits, _)")
    if output == flag_output:
        raise FusionError(f"output and flag_output are both {output}")


# --- memory ------------------------------------------------------------------------------------------------


#: measured peak over the arrays counted below: +8 % at 512 x 512, +11 % at 1024 x 1024 cells (7 dates; chunked
#: reads, per-date temporaries, inference strips), besides ~340 MB for Python, GRASS and PyTorch themselves
ESTIMATE_MARGIN = 1.15


def estimate_bytes(n_dates: int, n_channels: int, n_bands: int, rows: int, cols: int) -> int:
    """Bytes held at the peak: the cube (T, C, H, W) float32, inference's prediction and filled series
    (T, B, H, W) float32 each and the flags (T, H, W) uint8, with :data:`ESTIMATE_MARGIN`. Training tiles go to
    disk strip by strip."""
    cells = int(n_dates) * int(rows) * int(cols)
    return int(cells * (4 * (int(n_channels) + 2 * int(n_bands)) + 1) * ESTIMATE_MARGIN)


def _check_memory(plan: Plan, memory_mb: float) -> None:
    t, c, h, w = plan.shape
    plan.nbytes = estimate_bytes(t, c, len(plan.bands), h, w)
    if memory_mb is not None and plan.nbytes > float(memory_mb) * 2**20:
        raise FusionError(
            f"the region holds {t} dates x {c} channels x {h} x {w} cells: about {plan.nbytes / 2**20:.0f} MB "
            f"in memory, above memory={memory_mb:g} MB. This version holds the whole region in memory: shrink "
            "the region (g.region), or raise memory= if the machine has the RAM")


# --- the checkpoint ------------------------------------------------------------------------------------------


def read_checkpoint(path) -> dict:
    """A checkpoint written by :func:`stfuse.train.train`; FusionError naming the file when it is not one."""
    from .train import load_checkpoint

    try:
        return load_checkpoint(path)
    except (FileNotFoundError, ValueError) as exc:
        raise FusionError(f"model={path}: {exc}") from None


def model_bands(ckpt: dict) -> tuple[list[str], list[str]]:
    """(optical bands, SAR bands) of a checkpoint, in its channel order."""
    kinds = lambda kind: [c["name"] for c in ckpt["channels"] if c["kind"] == kind]  # noqa: E731
    return kinds("optical"), kinds("sar")


def check_model(ckpt: dict, path, channels: list[dict], dates: list[dict]) -> None:
    """FusionError naming the missing and unexpected channels when the checkpoint's inputs are not these."""
    from .dataset import InputAssembler
    from .prior import PRIOR_KIND, prior_layout
    from .train import check_channels

    if any(ch.get("kind") == PRIOR_KIND for ch in ckpt["channels"]):
        channels = [dict(ch) for ch in channels] + prior_layout(channels)
    stats = {str(ch["name"]): {"mean": 0.0, "std": 1.0} for ch in channels}  # only names matter here
    names = InputAssembler(channels, dates, stats, ckpt["k_neighbours"]).input_channels
    try:
        check_channels(ckpt, names)
    except ValueError as exc:
        raise FusionError(f"model={path}: {exc}. This module gives a model the optical bands, the validity and "
                          "the SAR bands (no static layers): choose bands= and sar_bands= to match") from None


# --- the plan: every check before a pixel is read ----------------------------------------------------------


def plan_fill(gs, tgis, dbif, optical: str, sar: str, output: str, *, flag_output=None, bands=None,
              sar_bands=None, mask=None, mask_band=None, valid_classes=None, model=None, save_model=None,
              tile_size=32, memory_mb=None, overwrite=False) -> Plan:
    """Resolve the inputs through TGIS and check everything that needs no pixel; FusionError on bad input."""
    flag_output = flag_output or f"{output}_flag"
    _check_names(output, flag_output)
    _check_mapset(gs)
    if mask and mask_band:
        raise FusionError(f"give mask= (a validity STRDS) or mask_band= (a class band of optical=), not both: "
                          f"mask={mask}, mask_band={mask_band}")
    optical_id = resolve_strds(gs, tgis, dbif, optical, "optical")
    sar_id = resolve_strds(gs, tgis, dbif, sar, "sar")
    mask_id = resolve_strds(gs, tgis, dbif, mask, "mask") if mask else None
    ckpt = read_checkpoint(model) if model else None
    model_opt, model_sar = model_bands(ckpt) if ckpt else (None, None)
    bands = choose_bands(tgis, optical_id, "optical", bands, [mask_band] if mask_band else [], model_opt)
    sar_bands = choose_bands(tgis, sar_id, "sar", sar_bands, (), model_sar)
    if mask_band in bands:
        raise FusionError(f"mask_band={mask_band} is also one of bands= ({', '.join(bands)})")
    opt = _granules(tgis, optical_id, bands + ([mask_band] if mask_band else []), "optical")
    opt = _with_validity(tgis, opt, mask_id)
    sar_table = _granules(tgis, sar_id, sar_bands, "sar")
    rows, cols = grassio.region_shape()
    channels = _channels(optical_id, bands, sar_id, sar_bands)
    plan = Plan(optical_id, sar_id, mask_id, bands, sar_bands, mask_band,
                [int(c) for c in (valid_classes or DEFAULT_VALID_CLASSES)], opt, sar_table,
                (len(opt), len(channels), rows, cols), output_maps(output, flag_output, bands, opt.start_time),
                output, flag_output)
    _check_outputs(gs, tgis, dbif, plan, save_model, overwrite)
    if model:
        dates = [dict(start_time=temporal.iso(t), sar_gap_days=None) for t in opt.start_time]
        check_model(ckpt, model, channels, dates)
        plan.checkpoint = ckpt
    else:
        _check_tile_size(tile_size, rows, cols)
    _check_memory(plan, memory_mb)
    return plan


def _channels(optical_id: str, bands, sar_id: str, sar_bands) -> list[dict]:
    sensor = lambda strds_id: strds_id.split("@")[0]  # noqa: E731
    return cube_mod.channel_layout(dict(sensor=sensor(optical_id), bands=list(bands)),
                                   dict(sensor=sensor(sar_id), bands=list(sar_bands)), [])


def _check_mapset(gs) -> None:
    """Refuse to write into one of stfuse's own mapsets: a rerun of the workflow replaces them."""
    from .grass import read_marker

    env = gs.gisenv()
    if read_marker(Path(env["GISDBASE"], env["LOCATION_NAME"], env["MAPSET"])) is not None:
        raise FusionError(f"the current mapset <{env['MAPSET']}> is one of stfuse's own (a rerun of the workflow "
                          "replaces it); run i.fusion.temporal in a mapset of your own, e.g. grass -c <project>/analysis")


def _check_target(gs, plan: Plan) -> None:
    """Refuse outputs that would replace an input dataset or map."""
    mapset = gs.gisenv()["MAPSET"]
    inputs = {plan.optical, plan.sar, plan.mask}
    for name in (plan.output, plan.flag_output):
        if f"{name}@{mapset}" in inputs:
            raise FusionError(f"output {name}@{mapset} is one of the input datasets; choose another name")
    maps = set(plan.opt.drop(columns=["id", "start_time"]).to_numpy().ravel())
    maps |= set(plan.sar_table.drop(columns=["id", "start_time"]).to_numpy().ravel())
    clash = sorted(f"{m}@{mapset}" for m in plan.maps.values() if f"{m}@{mapset}" in maps)
    if clash:
        raise FusionError(f"output={plan.output}: the output map {clash[0]} is an input map; choose another name")


def _check_outputs(gs, tgis, dbif, plan: Plan, save_model, overwrite: bool) -> None:
    _check_target(gs, plan)
    found = existing_outputs(gs, tgis, dbif, [plan.output, plan.flag_output], plan.maps.values())
    if save_model and Path(save_model).exists():
        found.append(f"file {save_model} (save_model=)")
    if found and not overwrite:
        raise FusionError(f"output={plan.output}: {'; '.join(found)} already exist(s) in the current mapset "
                          f"<{gs.gisenv()['MAPSET']}>; nothing was written. Use --overwrite to replace them")


def _check_tile_size(tile_size, rows: int, cols: int) -> None:
    multiple = 2 ** MODEL_PARAMS["depth"]
    if int(tile_size) < multiple or int(tile_size) % multiple:
        raise FusionError(f"tile_size={tile_size}: must be a multiple of {multiple} for the {MODEL} model")
    if int(tile_size) > min(rows, cols):
        raise FusionError(f"tile_size={tile_size} exceeds the computational region ({rows} rows x {cols} cols): "
                          "lower tile_size= or enlarge the region")


def pair_with_sar(plan: Plan, max_gap_days: float) -> None:
    """Pair each optical date with the nearest SAR granule holding data in the region (reads one band of SAR)."""
    sar = plan.sar_table.copy()
    sar["data_fraction"] = data_fractions(list(sar[plan.sar_bands[0]]))
    try:
        plan.pairs, plan.unpaired = pairing.pair_sensors(plan.opt[["id", "start_time"]], sar, max_gap_days,
                                                         coverage="data_fraction")
    except pairing.NoSarDataError:
        raise FusionError(f"sar={plan.sar}: none of its {len(sar)} granules has data in the current region "
                          f"(band {plan.sar_bands[0]}); check the region (g.region) and the SAR footprint") from None
    except ValueError as exc:
        raise FusionError(f"max_gap={max_gap_days}: {exc}") from None
    plan.notes.append(pairing.summarise(plan.pairs, plan.unpaired))
    for r in plan.unpaired.itertuples():
        plan.notes.append(f"unpaired {r.optical_id}: {r.reason}")


# --- reading, validity ---------------------------------------------------------------------------------------


def groups_state(plan: Plan) -> dict:
    """The maps of every date in channel order, as :func:`stfuse.cube.read_cube` takes them: the optical bands,
    the validity slot (validity map, class band, or None), the paired SAR bands (None where unpaired)."""
    best = plan.pairs[plan.pairs["rank"] == 1].set_index("optical_id")
    sar = plan.sar_table.set_index("id")
    groups = []
    for r in plan.opt.itertuples(index=False):
        row = r._asdict()
        slot = row.get("valid") if plan.mask else (row[plan.mask_band] if plan.mask_band else None)
        sar_id = best.sar_id.get(r.id)
        maps = [row[b] for b in plan.bands] + [slot]
        maps += [sar.loc[sar_id, b] if sar_id is not None else None for b in plan.sar_bands]
        groups.append(dict(maps=maps, optical_id=r.id, start_time=temporal.iso(r.start_time), sar_id=sar_id,
                           sar_gap_days=None if sar_id is None else float(best.gap_days[r.id])))
    return dict(channels=_channels(plan.optical, plan.bands, plan.sar, plan.sar_bands), groups=groups)


def derive_validity(cube: np.ndarray, plan: Plan) -> None:
    """Turn the cube's validity slot into ``valid`` (1 clear, 0 not, NaN no data), in place, date by date."""
    n_bands = len(plan.bands)
    for t in range(cube.shape[0]):
        slot, bands = cube[t, n_bands], cube[t, :n_bands]
        all_data = np.isfinite(bands).all(axis=0)
        if plan.mask:
            bad = np.isfinite(slot) & (slot != 0) & (slot != 1)
            if bad.any():
                raise FusionError(f"mask={plan.mask}: map <{plan.opt.valid.iloc[t]}> holds values other than 0, 1 "
                                  f"and null (e.g. {slot[bad][0]:g}); for a classification band of the optical STRDS "
                                  "use mask_band= and valid_classes= instead")
            continue
        if plan.mask_band:
            clear = np.isin(slot, plan.valid_classes) & all_data
            cube[t, n_bands] = np.where(np.isnan(slot), np.nan, clear.astype(np.float32))
        else:  # nodata is the only mask, as stfuse.ingest without a mask band
            none = ~np.isfinite(bands).any(axis=0)
            cube[t, n_bands] = np.where(none, np.nan, all_data.astype(np.float32))


def cube_dates(groups: dict, cube: np.ndarray, valid_index: int) -> list[dict]:
    """The dates dicts of the workflow's cube.json, with the clear fraction of every date: the share of the
    cells observed on some date (valid not null) that are clear (as stfuse.steps.pairing.clear_fractions)."""
    valid = cube[:, valid_index]
    observed = int(np.isfinite(valid).any(axis=0).sum())
    clear = (valid == 1).reshape(len(valid), -1).sum(axis=1)
    for g, n in zip(groups["groups"], clear):
        g["clear_fraction"] = float(n / observed) if observed else 0.0
    return cube_mod.cube_dates(groups)


# --- the model -------------------------------------------------------------------------------------------------


def train_in_place(cube, channels, dates, workdir, *, epochs: int, tile_size: int, seed: int = 0,
                   threads=None, device="auto") -> tuple[Path, dict]:
    """Export tiles of ``cube`` into ``workdir`` and train the workflow's default model on them; (model.pt, summary)."""
    from . import tiles, train

    workdir = Path(workdir)
    try:
        tiles.export_tiles(cube, channels, dates, workdir / "tiles", size=int(tile_size), overlap=0,
                           min_valid_fraction=0.0, block_size=int(tile_size), val_fraction=0.25, seed=seed)
    except ValueError as exc:
        raise FusionError(f"training in place (tile_size={tile_size}): {exc}") from None
    summary = train.train(workdir / "tiles", workdir / "model", model=MODEL, model_params=MODEL_PARAMS,
                          epochs=int(epochs), batch_size=16, k_neighbours=K_NEIGHBOURS, seed=seed, device=device,
                          patience=int(epochs), threads=threads, resume=False)
    return workdir / "model" / "model.pt", summary


def _save_copy(src: Path, dest) -> None:
    """Copy the trained checkpoint to ``dest`` (atomically: a temporary name, then a rename)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.partial")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dest)


# --- writing and registering ------------------------------------------------------------------------------------


def _drop_strds(tgis, dbif, strds_id: str) -> None:
    """Remove an output STRDS of the current mapset before it is registered anew (--overwrite); its maps stay."""
    ds = tgis.dataset_factory("strds", strds_id)
    if ds.is_in_db(dbif):
        ds.select(dbif)
        ds.delete(dbif)


def write_outputs(gs, tgis, plan: Plan, dates, filled, flags, *, history: str, overwrite: bool,
                  progress=None) -> tuple[str, str]:
    """Write every filled map and flag map into the current mapset, then register both STRDS; their ids."""
    from .ingest import _register

    band_lines, flag_lines = [], []
    for t, d in enumerate(dates):
        start = pd.Timestamp(d["start_time"]).strftime("%Y-%m-%d %H:%M:%S")  # UTC, as TGIS stores it
        for b, band in enumerate(plan.bands):
            name = plan.maps[(t, band)]
            grassio.write_map(filled[t, b], name, overwrite=overwrite, history=history,
                              title=f"{band} {d['start_time']} gap-filled with {plan.sar} by stfuse")
            band_lines.append(f"{name}|{start}|{band}")
        name = plan.maps[(t, "flag")]
        grassio.write_map(np.asarray(flags[t], dtype=np.float32), name, overwrite=overwrite, history=history,
                          title=f"1 = filled by stfuse, {d['start_time']}")
        flag_lines.append(f"{name}|{start}|filled")
        if progress:
            progress(0.8 + 0.2 * (t + 1) / len(dates), None)
    mapset = gs.gisenv()["MAPSET"]
    saved = os.environ.get("GRASS_OVERWRITE")
    if overwrite:
        os.environ["GRASS_OVERWRITE"] = "1"  # TGIS updates maps already registered only with it
    dbif = tgis.SQLDatabaseInterfaceConnection()
    dbif.connect()
    try:
        for name in (plan.output, plan.flag_output):
            _drop_strds(tgis, dbif, f"{name}@{mapset}")
    finally:
        dbif.close()
    try:
        with tempfile.TemporaryDirectory(prefix="stfuse_fusion_") as tmp:
            strds = _register(gs, tgis, plan.output, band_lines, tmp, f"{plan.optical} gap-filled with {plan.sar}",
                              history)
            flag = _register(gs, tgis, plan.flag_output, flag_lines, tmp, f"filled-cell flags of {strds}",
                             "1 where stfuse filled the value. " + history)
    finally:
        if saved is None:
            os.environ.pop("GRASS_OVERWRITE", None)
        else:
            os.environ["GRASS_OVERWRITE"] = saved
    return strds, flag


def lineage(plan: Plan, model_text: str, command: str | None = None) -> str:
    """What made the series, for every map's history and the STRDS descriptions."""
    from . import __version__

    inputs = f"optical {plan.optical}, sar {plan.sar}, " + (
        f"mask {plan.mask}" if plan.mask else f"mask band {plan.mask_band} classes {plan.valid_classes}"
        if plan.mask_band else "validity from nodata")
    head = f"stfuse {__version__} gap-filling; {inputs}; {model_text}"
    return head if not command else f"{head}\ncommand: {command}"


# --- the whole run --------------------------------------------------------------------------------------------


def fill_strds(optical: str, sar: str, output: str, *, flag_output=None, bands=None, sar_bands=None, mask=None,
               mask_band=None, valid_classes=None, max_gap_days: float = 6.0, model=None, save_model=None,
               epochs: int = 5, tile_size: int = 32, memory_mb: float | None = 4096, workdir=None,
               overwrite: bool = False, dry_run: bool = False, threads=None, device="auto", seed: int = 0,
               command: str | None = None, progress=None) -> dict:
    """Fill the gaps of STRDS ``optical`` with STRDS ``sar`` into STRDS ``output`` of the current mapset.

    Runs in an active GRASS session, over its computational region. ``model``: a checkpoint the workflow
    trained (``results/<study>/main/model/model.pt``); without it a model is trained in place for ``epochs``
    on tiles of ``tile_size`` cells in ``workdir`` (a temporary directory when None, deleted after), and
    ``save_model`` keeps it. ``progress(fraction, message)`` is told how far the run is. ``dry_run``: checks
    and pairing only, nothing read beyond one SAR band, nothing written. FusionError for bad input, before
    anything is written. Returns what was written: STRDS ids, maps, dates, pairing, the model used.
    """
    import grass.script as gs
    import grass.temporal as tgis

    t0 = time.perf_counter()
    say = progress or (lambda fraction, message: None)
    tgis.init()
    dbif = tgis.SQLDatabaseInterfaceConnection()
    dbif.connect()
    try:
        plan = plan_fill(gs, tgis, dbif, optical, sar, output, flag_output=flag_output, bands=bands,
                         sar_bands=sar_bands, mask=mask, mask_band=mask_band, valid_classes=valid_classes,
                         model=model, save_model=save_model, tile_size=tile_size, memory_mb=memory_mb,
                         overwrite=overwrite)
    finally:
        dbif.close()
    say(0.02, f"{len(plan.opt)} optical dates ({', '.join(plan.bands)}), {len(plan.sar_table)} SAR granules "
              f"({', '.join(plan.sar_bands)}), region {plan.shape[2]} x {plan.shape[3]}, "
              f"~{plan.nbytes / 2**20:.1f} MB in memory")
    pair_with_sar(plan, max_gap_days)
    for note in plan.notes:
        say(0.05, note)
    result = dict(optical=plan.optical, sar=plan.sar, mask=plan.mask, bands=plan.bands, sar_bands=plan.sar_bands,
                  shape=list(plan.shape), estimated_mb=plan.nbytes / 2**20, pairing=plan.notes[0],
                  unpaired=[dict(optical_id=r.optical_id, reason=r.reason) for r in plan.unpaired.itertuples()])
    if dry_run:
        return result
    with tempfile.TemporaryDirectory(prefix="stfuse_fusion_", dir=workdir) as tmp:
        filled, flags, dates, model_text = _fill(plan, tmp, model=model, save_model=save_model, epochs=epochs,
                                                 tile_size=tile_size, threads=threads, device=device, seed=seed,
                                                 say=say)
        say(0.8, f"writing {len(dates) * (len(plan.bands) + 1)} maps into mapset {gs.gisenv()['MAPSET']}")
        strds, flag_strds = write_outputs(gs, tgis, plan, dates, filled, flags, overwrite=overwrite,
                                          history=lineage(plan, model_text, command), progress=progress)
    say(1.0, f"registered {strds} and {flag_strds} in {time.perf_counter() - t0:.0f} s")
    result.update(strds=strds, flag_strds=flag_strds, mapset=gs.gisenv()["MAPSET"], model=model_text,
                  dates=dates, filled_fraction=[float(f.mean()) for f in flags],
                  maps={f"{t}:{k}": v for (t, k), v in plan.maps.items()}, seconds=time.perf_counter() - t0)
    return result


def _fill(plan: Plan, tmp, *, model, save_model, epochs, tile_size, threads, device, seed, say):
    """Read the cube, get a model (load or train), infer: (filled, flags, dates, what the model was)."""
    from . import infer
    from .register import file_sha256

    groups = groups_state(plan)
    say(0.06, f"reading {plan.shape[0]} dates x {plan.shape[1]} channels from GRASS")
    cube = cube_mod.read_cube(groups)
    derive_validity(cube, plan)
    channels = groups["channels"]
    dates = cube_dates(groups, cube, len(plan.bands))
    if model:
        checkpoint, model_text = plan.checkpoint, f"checkpoint {model} sha256 {file_sha256(model)[:16]}"
    else:
        say(0.1, f"training a {MODEL} model in place: {epochs} epoch(s) on {tile_size}-cell tiles")
        path, summary = train_in_place(cube, channels, dates, tmp, epochs=epochs, tile_size=tile_size, seed=seed,
                                       threads=threads, device=device)
        if save_model:
            _save_copy(path, save_model)
        checkpoint = str(path)
        loss = summary.get("best_val_loss")
        model_text = (f"{MODEL} trained in place, {summary['last_epoch']} epoch(s), best validation loss "
                      + (f"{loss:.4g}" if isinstance(loss, float) else str(loss))
                      + (f", saved as {save_model}" if save_model else ""))
    say(0.6, "inference over the whole region")
    out = infer.predict_cube(checkpoint, cube, channels, dates, device=device, threads=threads)
    del cube
    return out["filled"], out["filled_flag"], dates, model_text
