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
   (:func:`stfuse.pairing.pair_sensors`); ``dates`` other than ``"observed"`` (:mod:`stfuse.anydate`: a regular
   step such as ``5D`` or ``SMS``, or a list of dates) adds a *query date* per requested time without an optical
   acquisition on its UTC day, paired with SAR the same way, never clear, never a neighbour, never trained on;
4. every check (names, search path, existing outputs, the checkpoint's channels, the block plan, the memory
   estimate) runs before a pixel is read, and nothing is written before every check has passed;
5. the computational region is cut into spatial blocks (``block_size`` cells a side, :func:`stfuse.blocks.plan`;
   default one block, the whole region) with a halo of the tile size; the (T, C, h, w) cube of each block's
   read window (core + halo) is read into a file in the temporary directory (:func:`stfuse.cube.read_cube`,
   the channel layout of :func:`stfuse.cube.channel_layout`, the region set by ``GRASS_REGION`` for the read
   only);
6. a checkpoint the workflow trained is loaded (``model=``), or a model is trained in place on the blocks'
   tiles joined into one tile store (:func:`stfuse.tiles.export_block_tiles`,
   :func:`stfuse.tiles.merge_tile_store`, :func:`stfuse.train.train`);
7. inference block by block (:func:`stfuse.infer.predict_block`, the core of each block into files); each
   filled map and flag map is written from the blocks' cores (:class:`stfuse.cube.Mosaic`, one map of the
   region at a time) with :func:`stfuse.grassio.write_map` and registered as STRDS ``output`` (band names as
   semantic labels, the optical UTC start times -- or, with ``dates``, exactly the requested times) and
   ``flag_output`` (default ``<output>_flag``).

As in the workflow, the result does not depend on the block layout: any ``block_size`` gives the same maps,
bit for bit, as one block (the halo covers every tile and inference window that touches a core). Memory holds
one block at a time: :func:`estimate_bytes` of the largest block's read window says how much, and a plan whose
block needs more than ``memory_mb`` is refused before reading (use a smaller ``block_size``).
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

from . import blocks as blocks_mod
from . import cube as cube_mod
from . import anydate, grassio, pairing, temporal
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
    maps: dict  # output map names per (output index, band) and per output ("flag")
    output: str
    flag_output: str
    nbytes: int = 0
    blocks: list = field(default_factory=list)  # the block plan (stfuse.blocks.Block), row-major
    block_size: int | None = None  # block edge as asked (None: one block, the whole region)
    halo: int = 0
    checkpoint: dict | None = None
    pairs: pd.DataFrame | None = None
    unpaired: pd.DataFrame | None = None
    notes: list[str] = field(default_factory=list)
    #: the series' dates (stfuse.anydate.plan_dates: optical position, query, start_time, outputs), time order
    dates: pd.DataFrame | None = None
    #: (date index, UTC output time) of every map set to write, in order
    outputs: list = field(default_factory=list)
    query_sar: pd.DataFrame | None = None  # the SAR partner of each query date (stfuse.anydate.pair_queries)


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
    """Names of the maps to write: ``(i, band) -> <output>_<band>_<stamp>``, ``(i, "flag") -> <flag>_<stamp>``,
    ``i`` the index of the output time in ``times``."""
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


def block_plan(rows: int, cols: int, block_size: int | None, halo: int) -> list[blocks_mod.Block]:
    """The blocks of a ``rows`` x ``cols`` region: cores of ``block_size`` cells a side (None: one block, the
    whole region) with a ``halo`` (the tile size); FusionError naming ``blocks=`` when the edge is not larger
    than the halo (a block must see every tile and inference window that touches its core)."""
    if block_size is None:
        return blocks_mod.plan(rows, cols, max(rows, cols, int(halo) + 1), int(halo))
    if isinstance(block_size, bool) or int(block_size) != block_size or int(block_size) < 1:
        raise FusionError(f"blocks={block_size}: must be a whole number of cells, at least 1")
    if int(block_size) <= int(halo):
        raise FusionError(f"blocks={block_size}: a block edge must be larger than its halo, the tile size "
                          f"({halo} cells; every tile and inference window that touches a block's core must lie "
                          f"in its read window): use blocks={int(halo) + 1} or more")
    return blocks_mod.plan(rows, cols, int(block_size), int(halo))


def _check_memory(plan: Plan, memory_mb: float) -> None:
    """The need of the largest block (its read window's :func:`estimate_bytes`; writing a map of the region
    takes less but for tiny blocks of a large region) against ``memory_mb``."""
    t, c, h, w = plan.shape
    big = max(plan.blocks, key=lambda b: b.read_rows * b.read_cols)
    plan.nbytes = max(estimate_bytes(t, c, len(plan.bands), big.read_rows, big.read_cols),
                      int(4 * h * w * ESTIMATE_MARGIN))
    if memory_mb is not None and plan.nbytes > float(memory_mb) * 2**20:
        where = ("the region" if len(plan.blocks) == 1 else
                 f"the largest of its {len(plan.blocks)} blocks (blocks={plan.block_size})")
        raise FusionError(
            f"{where} holds {t} dates x {c} channels x {big.read_rows} x {big.read_cols} cells (with the halo): "
            f"about {plan.nbytes / 2**20:.0f} MB in memory, above memory={memory_mb:g} MB. Memory holds one block "
            "at a time: cut the region into smaller blocks (blocks=, in cells), or raise memory= if the machine "
            "has the RAM")


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
    names = InputAssembler(channels, dates, stats, ckpt["k_neighbours"],
                           ckpt.get("input_layout", "stacked")).input_channels
    try:
        check_channels(ckpt, names)
    except ValueError as exc:
        raise FusionError(f"model={path}: {exc}. This module gives a model the optical bands, the validity and "
                          "the SAR bands (no static layers): choose bands= and sar_bands= to match") from None


# --- the plan: every check before a pixel is read ----------------------------------------------------------


def date_setting(dates):
    """The ``dates`` option as :func:`stfuse.anydate.parse_setting` returns it: ``"observed"``, a step (an offset
    alias such as ``5D``, ``SMS``, or a ``{"every", "start", "end"}`` dict) or dates (a comma list or a list);
    FusionError naming ``dates=``."""
    try:
        if dates is None or isinstance(dates, str):
            return anydate.parse_module_dates(dates)
        return anydate.parse_setting(dates, f"dates={dates!r}")
    except ValueError as exc:
        raise FusionError(str(exc)) from None


def plan_fill(gs, tgis, dbif, optical: str, sar: str, output: str, *, flag_output=None, bands=None,
              sar_bands=None, mask=None, mask_band=None, valid_classes=None, model=None, save_model=None,
              tile_size=32, memory_mb=None, block_size=None, overwrite=False, dates="observed") -> Plan:
    """Resolve the inputs through TGIS and check everything that needs no pixel; FusionError on bad input.
    ``dates``: see :func:`date_setting`."""
    setting = date_setting(dates)
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
    try:
        series = anydate.plan_dates(opt.start_time, anydate.requested_times(setting, opt.start_time))
    except ValueError as exc:
        raise FusionError(f"dates={dates}: {exc}") from None
    outputs = [(t, o) for t, r in enumerate(series.itertuples()) for o in r.outputs]
    plan = Plan(optical_id, sar_id, mask_id, bands, sar_bands, mask_band,
                [int(c) for c in (valid_classes or DEFAULT_VALID_CLASSES)], opt, sar_table,
                (len(series), len(channels), rows, cols),
                output_maps(output, flag_output, bands, [o for _, o in outputs]), output, flag_output,
                dates=series, outputs=outputs)
    _check_outputs(gs, tgis, dbif, plan, save_model, overwrite)
    if model:
        dates = [dict(start_time=temporal.iso(r.start_time), sar_gap_days=None, query=bool(r.query))
                 for r in series.itertuples()]
        check_model(ckpt, model, channels, dates)
        plan.checkpoint = ckpt
        plan.halo = int(ckpt["tile_size"])  # its inference windows
    else:
        _check_tile_size(tile_size, rows, cols)
        plan.halo = int(tile_size)  # the training tiles and the inference windows of the model trained here
    plan.block_size = block_size
    plan.blocks = block_plan(rows, cols, block_size, plan.halo)
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
    queries = plan.dates[plan.dates["query"]] if plan.dates is not None else plan.dates
    if queries is not None and len(queries):  # the dates asked for without an optical acquisition
        plan.query_sar = anydate.pair_queries(queries.start_time, sar, max_gap_days, coverage="data_fraction")
        plan.query_sar.index = queries.index
        plan.notes.append(f"{len(plan.outputs)} output date(s): {len(queries)} without an optical acquisition "
                          f"on their day ({int(plan.query_sar.sar_id.notna().sum())} with SAR within "
                          f"{max_gap_days:g} d)")


# --- reading, validity ---------------------------------------------------------------------------------------


def groups_state(plan: Plan) -> dict:
    """The maps of every date in channel order, as :func:`stfuse.cube.read_cube` takes them: the optical bands,
    the validity slot (validity map, class band, or None), the paired SAR bands (None where unpaired)."""
    best = plan.pairs[plan.pairs["rank"] == 1].set_index("optical_id")
    sar = plan.sar_table.set_index("id")
    groups = []
    series = plan.dates if plan.dates is not None else anydate.plan_dates(plan.opt.start_time, None)
    for d in series.itertuples():
        outputs = [temporal.iso(o) for o in d.outputs]
        if d.query:  # no optical acquisition: optical bands and validity slot absent (NaN: never clear)
            sar_id, gap = plan.query_sar.loc[d.Index, "sar_id"], plan.query_sar.loc[d.Index, "gap_days"]
            maps = [None] * (len(plan.bands) + 1)
            maps += [sar.loc[sar_id, b] if sar_id is not None else None for b in plan.sar_bands]
            groups.append(dict(maps=maps, optical_id=None, start_time=temporal.iso(d.start_time), sar_id=sar_id,
                               sar_gap_days=None if gap is None else float(gap), query=True, outputs=outputs))
            continue
        r = plan.opt.iloc[d.optical]
        row = r.to_dict()
        slot = row.get("valid") if plan.mask else (row[plan.mask_band] if plan.mask_band else None)
        sar_id = best.sar_id.get(r.id)
        maps = [row[b] for b in plan.bands] + [slot]
        maps += [sar.loc[sar_id, b] if sar_id is not None else None for b in plan.sar_bands]
        groups.append(dict(maps=maps, optical_id=r.id, start_time=temporal.iso(r.start_time), sar_id=sar_id,
                           sar_gap_days=None if sar_id is None else float(best.gap_days[r.id]), query=False,
                           outputs=outputs))
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
                series = getattr(plan, "dates", None)
                pos = int(series.optical.iloc[t]) if series is not None else t  # query dates hold no mask map
                raise FusionError(f"mask={plan.mask}: map <{plan.opt.valid.iloc[pos]}> holds values other than 0, 1 "
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


def train_in_place(block_cubes: dict, plan_blocks: list, region_shape: tuple[int, int], channels, dates, workdir, *,
                   epochs: int, tile_size: int, seed: int = 0, threads=None, device="auto") -> tuple[Path, dict]:
    """Export the training tiles of every block into ``workdir`` (``block_cubes``: block id -> its read-window
    cube; :func:`stfuse.tiles.export_block_tiles`), join them into one tile store
    (:func:`stfuse.tiles.merge_tile_store`: what one export of the whole region writes) and train the
    workflow's default model on it; (model.pt, summary)."""
    from . import tiles, train

    workdir = Path(workdir)
    params = dict(size=int(tile_size), overlap=0, min_valid_fraction=0.0, block_size=int(tile_size),
                  val_fraction=0.25, seed=seed)
    try:
        dirs = []
        for block in plan_blocks:
            dirs.append(workdir / "block_tiles" / block.id)
            tiles.export_block_tiles(block_cubes[block.id], channels, dates, block, *region_shape, dirs[-1],
                                     **params)
        tiles.merge_tile_store(dirs, workdir / "tiles", **params)
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
    from .ingest import register_strds

    band_lines, flag_lines = [], []
    # one map set per output time (``dates``): observed, every date at its start time
    entries = plan.outputs or [(t, pd.Timestamp(d["start_time"])) for t, d in enumerate(dates)]
    for i, (t, when) in enumerate(entries):
        when = pd.Timestamp(when)
        label, start = temporal.iso(when), when.strftime("%Y-%m-%d %H:%M:%S")  # UTC, as TGIS stores it
        for b, band in enumerate(plan.bands):
            name = plan.maps[(i, band)]
            grassio.write_map(filled[t, b], name, overwrite=overwrite, history=history,
                              title=f"{band} {label} gap-filled with {plan.sar} by stfuse")
            band_lines.append(f"{name}|{start}|{band}")
        name = plan.maps[(i, "flag")]
        grassio.write_map(np.asarray(flags[t], dtype=np.float32), name, overwrite=overwrite, history=history,
                          title=f"1 = filled by stfuse, {label}")
        flag_lines.append(f"{name}|{start}|filled")
        if progress:
            progress(0.8 + 0.2 * (i + 1) / len(entries), None)
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
            strds = register_strds(gs, tgis, plan.output, band_lines, tmp,
                                   f"{plan.optical} gap-filled with {plan.sar}", history)
            flag = register_strds(gs, tgis, plan.flag_output, flag_lines, tmp, f"filled-cell flags of {strds}",
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
               epochs: int = 5, tile_size: int = 32, memory_mb: float | None = 4096, block_size=None,
               workdir=None, overwrite: bool = False, dry_run: bool = False, threads=None, device="auto", seed: int = 0,
               command: str | None = None, progress=None, dates="observed") -> dict:
    """Fill the gaps of STRDS ``optical`` with STRDS ``sar`` into STRDS ``output`` of the current mapset.

    Runs in an active GRASS session, over its computational region. ``model``: a checkpoint the workflow
    trained (``results/<study>/main/model/model.pt``); without it a model is trained in place for ``epochs``
    on tiles of ``tile_size`` cells in ``workdir`` (a temporary directory when None, deleted after), and
    ``save_model`` keeps it. ``block_size``: the edge (cells) of the spatial blocks the region is processed in,
    one at a time (None: one block, the whole region); the maps are the same whatever it is, bit for bit, and
    ``memory_mb`` bounds one block's need. ``progress(fraction, message)`` is told how far the run is.
    ``dates``: the start times of the output, ``"observed"`` (the optical dates), a step (an offset alias such as
    ``"5D"`` or ``"SMS"``, from the first to the last optical UTC day) or dates/times (a comma list or a list, UTC);
    see :mod:`stfuse.anydate`.
    ``dry_run``: checks and pairing only, nothing read beyond one SAR band, nothing written. FusionError for bad
    input, before anything is written. Returns what was written: STRDS ids, maps, dates, pairing, the model used.
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
                         block_size=block_size, overwrite=overwrite, dates=dates)
    finally:
        dbif.close()
    say(0.02, f"{len(plan.opt)} optical dates ({', '.join(plan.bands)}), {len(plan.sar_table)} SAR granules "
              f"({', '.join(plan.sar_bands)}), region {plan.shape[2]} x {plan.shape[3]} in {len(plan.blocks)} "
              f"block(s), ~{plan.nbytes / 2**20:.1f} MB in memory")
    pair_with_sar(plan, max_gap_days)
    for note in plan.notes:
        say(0.05, note)
    result = dict(optical=plan.optical, sar=plan.sar, mask=plan.mask, bands=plan.bands, sar_bands=plan.sar_bands,
                  shape=list(plan.shape), estimated_mb=plan.nbytes / 2**20, pairing=plan.notes[0],
                  blocks=len(plan.blocks), block_size=max(max(b.rows, b.cols) for b in plan.blocks), halo=plan.halo,
                  output_times=[temporal.iso(pd.Timestamp(o)) for _, o in plan.outputs],
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
        filled_fraction = [float(flags[t].mean()) for t in range(len(dates))]  # before the block files go
    say(1.0, f"registered {strds} and {flag_strds} in {time.perf_counter() - t0:.0f} s")
    result.update(strds=strds, flag_strds=flag_strds, mapset=gs.gisenv()["MAPSET"], model=model_text,
                  dates=dates, filled_fraction=filled_fraction,
                  maps={f"{t}:{k}": v for (t, k), v in plan.maps.items()}, seconds=time.perf_counter() - t0)
    return result


def _grass_region(gs) -> dict:
    """The current computational region as a region dict (the keys :meth:`stfuse.blocks.Block.bounds` reads)."""
    r = gs.region()
    return dict(west=float(r["w"]), east=float(r["e"]), north=float(r["n"]), south=float(r["s"]),
                res_x=float(r["ewres"]), res_y=float(r["nsres"]), rows=int(r["rows"]), cols=int(r["cols"]))


def _read_block(gs, groups: dict, plan: Plan, block, region: dict, path: Path) -> np.ndarray:
    """The cube of ``block``'s read window, read from GRASS into the ``.npy`` file ``path`` (memory-mapped), its
    validity slot turned into ``valid`` (:func:`derive_validity`). The read window is set for these reads only
    (``GRASS_REGION`` in this process's environment, which grassio's helpers inherit): the session's region
    and WIND file are never changed."""
    shape = (plan.shape[0], plan.shape[1], block.read_rows, block.read_cols)
    path.parent.mkdir(parents=True, exist_ok=True)
    cube = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
    whole = (block.read_rows, block.read_cols) == (region["rows"], region["cols"])
    saved = os.environ.get("GRASS_REGION")
    if not whole:
        b = block.bounds(region)
        os.environ["GRASS_REGION"] = gs.region_env(n=repr(b["north"]), s=repr(b["south"]), e=repr(b["east"]),
                                                   w=repr(b["west"]), rows=b["rows"], cols=b["cols"])
    try:
        got = grassio.region_shape()
        if got != shape[2:]:
            raise RuntimeError(f"block {block.id}: the GRASS region is {got[0]} x {got[1]} cells, its read window "
                               f"{block.read_rows} x {block.read_cols}")
        cube_mod.read_cube(groups, cube)
    finally:
        if not whole:
            if saved is None:
                os.environ.pop("GRASS_REGION", None)
            else:
                os.environ["GRASS_REGION"] = saved
    derive_validity(cube, plan)
    cube.flush()
    return cube


def _fill(plan: Plan, tmp, *, model, save_model, epochs, tile_size, threads, device, seed, say):
    """Read the blocks' cubes, get a model (load or train), infer block by block: (filled, flags, dates, what the
    model was); filled and flags are :class:`stfuse.cube.Mosaic` over the blocks' core files in ``tmp``."""
    import grass.script as gs

    from . import infer
    from .register import file_sha256
    from .train import load_checkpoint

    groups = groups_state(plan)
    channels = groups["channels"]
    n_dates, _, rows, cols = plan.shape
    n_bands, tmp = len(plan.bands), Path(tmp)
    region = _grass_region(gs)
    if (region["rows"], region["cols"]) != (rows, cols):
        raise RuntimeError(f"the computational region changed since the plan ({rows} x {cols} cells, now "
                           f"{region['rows']} x {region['cols']})")
    cubes, seen, clear = {}, 0, np.zeros(n_dates, dtype=np.int64)
    for i, block in enumerate(plan.blocks):
        say(0.06 + 0.04 * i / len(plan.blocks), f"reading {n_dates} dates x {plan.shape[1]} channels from GRASS"
            + (f", block {block.id} ({i + 1} of {len(plan.blocks)})" if len(plan.blocks) > 1 else ""))
        cubes[block.id] = _read_block(gs, groups, plan, block, region, tmp / "blocks" / block.id / "cube.npy")
        valid = blocks_mod.crop_core(cubes[block.id][:, n_bands], block)  # counted over the cores: exact sums
        seen += int(np.isfinite(valid).any(axis=0).sum())
        clear += (valid == 1).reshape(n_dates, -1).sum(axis=1)
    for g, n in zip(groups["groups"], clear):  # as cube_dates: the clear share of the cells observed some date
        g["clear_fraction"] = float(n / seen) if seen else 0.0
    dates = cube_mod.cube_dates(groups)
    if model:
        checkpoint, model_text = plan.checkpoint, f"checkpoint {model} sha256 {file_sha256(model)[:16]}"
    else:
        say(0.1, f"training a {MODEL} model in place: {epochs} epoch(s) on {tile_size}-cell tiles")
        path, summary = train_in_place(cubes, plan.blocks, (rows, cols), channels, dates, tmp, epochs=epochs,
                                       tile_size=tile_size, seed=seed, threads=threads, device=device)
        if save_model:
            _save_copy(path, save_model)
        checkpoint = str(path)
        loss = summary.get("best_val_loss")
        model_text = (f"{MODEL} trained in place, {summary['last_epoch']} epoch(s), best validation loss "
                      + (f"{loss:.4g}" if isinstance(loss, float) else str(loss))
                      + (f", saved as {save_model}" if save_model else ""))
    ckpt = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
    files = {"filled": {}, "filled_flag": {}}
    for i, block in enumerate(plan.blocks):
        say(0.6 + 0.2 * i / len(plan.blocks), "inference over the whole region" if len(plan.blocks) == 1 else
            f"inference, block {block.id} ({i + 1} of {len(plan.blocks)})")
        core = (block.rows, block.cols)
        shapes = {"filled": ((n_dates, n_bands) + core, np.float32),
                  "prediction": ((n_dates, n_bands) + core, np.float32),
                  "filled_flag": ((n_dates,) + core, np.uint8)}
        paths = {key: tmp / "blocks" / block.id / f"{key}.npy" for key in shapes}
        out = {key: np.lib.format.open_memmap(paths[key], mode="w+", dtype=dtype, shape=shape)
               for key, (shape, dtype) in shapes.items()}
        res = infer.predict_block(ckpt, cubes[block.id], channels, dates, block, rows, cols, batch_size=8,
                                  device=device, threads=threads, out=out)
        for arr in out.values():
            arr.flush()
        del out, res
        for key in files:
            files[key][block.id] = paths[key]
        cubes[block.id] = None  # this block's cube is no longer needed
    return (cube_mod.Mosaic(files["filled"], plan.blocks), cube_mod.Mosaic(files["filled_flag"], plan.blocks),
            dates, model_text)
