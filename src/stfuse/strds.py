"""A PyTorch dataset read straight from GRASS STRDS: no tile export, no file between GRASS and the model.

:class:`StrdsDataset` samples (tile, optical date) pairs of the current computational region and
builds each sample's model input with :class:`stfuse.dataset.InputAssembler`, the code training
(:class:`stfuse.dataset.GapFillDataset`) and inference (:mod:`stfuse.infer`) use, so its samples
equal those of tiles exported from the same maps with :func:`stfuse.tiles.export_tiles` (same
``stats.json``, same tile, same date; tested). What comes from where:

* the series (:func:`open_series`, inside a GRASS session): the optical STRDS (bands by semantic
  label, :func:`stfuse.temporal.granules`), its validity STRDS (0/1 maps, default
  ``<optical>_valid`` in the optical STRDS's mapset, as ingest writes it), the SAR STRDS, each
  optical date paired with SAR by :func:`stfuse.pairing.pair_sensors` exactly as the pairing stage
  does (SAR granules without data in the region are passed over), optional static maps; channels
  in the workflow's order (:func:`stfuse.cube.channel_layout`);
* the tile grid: :func:`stfuse.tiles.tile_origins` over the region current when the series was
  opened (``size``, ``overlap``), or the ``origins`` given (e.g. an export's ``index.csv``);
* normalisation: a ``stats.json`` as :func:`stfuse.tiles.export_tiles` writes it, or the doc
  :func:`compute_stats` returns (the same statistics over a pixel mask of the region).

Reading: a sample reads only the maps it lacks, in its tile's window, with one
:func:`stfuse.grassio.read_maps` call: the target date's SAR and static maps, and the optical and
validity maps of the target date and its K previous and K next dates (the assembler reads no SAR or
static channel but the target date's). The window is passed as ``GRASS_REGION`` in the reader's
``env`` (:meth:`StrdsSeries.env`), so no WIND file is written and readers in several processes run
side by side. Each process keeps the optical and validity maps read of its last ``cache_tiles``
tiles (a bounded LRU cache), so consecutive dates of one tile, which share neighbours, read about
one new date each. With the temporal prior on (``prior=True``, the default of ``export_tiles``), the
prior needs the tile's whole series (:mod:`stfuse.prior`: per pixel, so a tile's prior is that
window of the region's prior, bit for bit): the first sample of a tile reads its optical and
validity maps at every date and the prior is cached with them. Iterate tile by tile
(``shuffle=False``, or a sampler that groups a tile's dates) to make the cache pay; shuffled
samples read their dates (with the prior: the tile's whole series) anew each.

Processes: the dataset pickles small (map names, the region, the CRS; never an open file, array
of pixels or GRASS state) and works with ``DataLoader(num_workers > 0)`` under ``fork`` and
``spawn``: each process writes its own gisrc file (a copy of the session's GISDBASE,
LOCATION_NAME and MAPSET, removed when the process ends) and starts its own grassio server, so
workers never share a session's state and need no WIND file, lock or TGIS. The session that
opened the series may even be closed before the data is read. Every map id is fully qualified, so
the mapset search path does not matter; a raster MASK in the session's mapset applies, as in
every GRASS module.

Samples: the dict of :class:`stfuse.dataset.GapFillDataset` (``image``, ``mask``, ``target``,
``target_valid``, ``metadata``) plus torchgeo-style metadata: ``crs`` (``"EPSG:<code>"`` where
the project has one, else its WKT), ``bounds`` (west, south, east, north of the tile, in CRS
units), ``transform`` (the tile's GDAL geotransform: west, ew-res, 0, north, 0, -ns-res),
``start_time`` (UTC, ISO 8601 with ``Z``) and ``labels`` / ``target_labels`` (the names of the
input channels, e.g. ``B04@t``, ``valid@t-1``, ``VV@sar``, and of the target bands). The
default ``collate_fn`` batches it; :func:`stack_samples` stacks the tensors and keeps the rest
as lists (torchgeo's way).

Nothing is written to GRASS. Opening a series runs TGIS in the session, which, like every
``t.*`` module, creates the current mapset's temporal database if it has none.
"""

from __future__ import annotations

import json
import logging
import multiprocessing.util
import numbers
import os
import tempfile
from collections import OrderedDict
from pathlib import Path

import numpy as np

from stfuse._optional import require_torch

torch = require_torch(__name__)
from torch.utils.data import Dataset  # noqa: E402

from stfuse import grassio, pairing, temporal, tiles  # noqa: E402
from stfuse.cube import channel_layout  # noqa: E402
from stfuse.dataset import DT_SCALE_DAYS, InputAssembler  # noqa: E402
from stfuse.grass import GrassError  # noqa: E402
from stfuse.ingest import valid_strds_name  # noqa: E402
from stfuse.prior import prior_channels, prior_layout  # noqa: E402

__all__ = ["StrdsSeries", "StrdsDataset", "open_series", "compute_stats", "stack_samples"]

log = logging.getLogger("stfuse.strds")

#: most bytes of maps read at once when scanning the whole region (clear fractions, statistics)
SCAN_CHUNK_BYTES = 256 * 2**20
#: tiles whose optical + validity series (and prior) a process keeps
CACHE_TILES = 8


# --- the series: what to read, picklable -------------------------------------------------------------


def _region_text(region: dict, row0: int = 0, col0: int = 0, rows: int | None = None,
                 cols: int | None = None) -> str:
    """A GRASS_REGION value for the window of ``rows`` x ``cols`` cells at (row0, col0) of ``region``.

    Rows and columns are given, so GRASS derives the resolution from them: the window's cells are
    the region's cells, exactly (grassio then reads them without resampling).
    """
    rows = region["rows"] - row0 if rows is None else rows
    cols = region["cols"] - col0 if cols is None else cols
    north = region["n"] - row0 * region["nsres"]
    west = region["w"] + col0 * region["ewres"]
    south = north - rows * region["nsres"] if row0 + rows < region["rows"] else region["s"]
    east = west + cols * region["ewres"] if col0 + cols < region["cols"] else region["e"]
    return (f"proj: {region['projection']};zone: {region['zone']};north: {north!r};south: {south!r};"
            f"east: {east!r};west: {west!r};cols: {cols};rows: {rows};")


_gisrc_files: dict[tuple[int, str], str] = {}  # (pid, gisrc text) -> this process's gisrc file


def _process_gisrc(text: str) -> str:
    """This process's own gisrc file holding ``text`` (written once, removed when the process ends)."""
    key = (os.getpid(), text)
    path = _gisrc_files.get(key)
    if path is None or not os.path.exists(path):
        fd, path = tempfile.mkstemp(prefix="stfuse_strds_gisrc_")
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        _gisrc_files[key] = path
        # multiprocessing runs these at exit in the main process and in its worker processes alike
        # (atexit does not run in a forked worker), and drops a parent's on fork
        multiprocessing.util.Finalize(None, _remove, args=(path,), exitpriority=1)
    return path


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class StrdsSeries:
    """An optical series paired with SAR, resolved to map ids, in a fixed region: what a reader needs.

    Made by :func:`open_series` inside a GRASS session; afterwards it needs no session: it pickles
    (a few kB per date) and reads in any process. Attributes: ``channels`` (the cube's channel
    dicts, :func:`stfuse.cube.channel_layout` order), ``dates`` (one dict per optical date:
    ``start_time``, ``optical_id``, ``sar_id``, ``sar_time``, ``sar_gap_days``; None: no SAR),
    ``maps`` (per date, per channel, the map id or None: no SAR), ``region`` (``g.region -g`` of
    the session), ``crs_wkt``, ``epsg`` (None without one), ``strds`` (the STRDS ids read),
    ``unpaired`` (optical id -> why it has no SAR).
    """

    def __init__(self, *, channels, dates, maps, region, crs_wkt, epsg, strds, unpaired, gisbase, gisrc):
        self.channels, self.dates, self.maps = channels, dates, maps
        self.region, self.crs_wkt, self.epsg = region, crs_wkt, epsg
        self.strds, self.unpaired = strds, unpaired
        self._gisbase, self._gisrc = gisbase, gisrc

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(T, C, rows, cols) of the whole series in its region."""
        return (len(self.dates), len(self.channels), int(self.region["rows"]), int(self.region["cols"]))

    @property
    def crs(self) -> str:
        """``EPSG:<code>`` where the project has one, else its WKT."""
        return f"EPSG:{self.epsg}" if self.epsg else self.crs_wkt

    def env(self, row0: int = 0, col0: int = 0, rows: int | None = None, cols: int | None = None) -> dict:
        """A grassio ``env`` reading the window (row0, col0, rows, cols) of the region in this process."""
        env = {k: v for k, v in os.environ.items() if k not in ("WIND_OVERRIDE", "GRASS_REGION")}
        env.update(GISBASE=self._gisbase, GISRC=_process_gisrc(self._gisrc),
                   GRASS_REGION=_region_text(self.region, row0, col0, rows, cols))
        return env

    def read_cells(self, cells, row0=0, col0=0, rows=None, cols=None) -> dict:
        """``{(date, channel): (h, w) float32}`` of the (date, channel index) ``cells`` that have a map
        (a channel without one, no SAR, is left out), in the window, with one
        :func:`stfuse.grassio.read_maps` call (one set of helper processes, whatever the count)."""
        cells = [(int(d), int(c)) for d, c in cells if self.maps[d][c]]
        if not cells:
            return {}
        flat = grassio.read_maps([self.maps[d][c] for d, c in cells], env=self.env(row0, col0, rows, cols))
        return dict(zip(cells, flat))

    def read(self, dates, channels, row0=0, col0=0, rows=None, cols=None) -> np.ndarray:
        """(len(dates), len(channels), h, w) float32 of those dates and channel indices in the window;
        a channel without a map (no SAR) is NaN."""
        h = self.region["rows"] - row0 if rows is None else rows
        w = self.region["cols"] - col0 if cols is None else cols
        out = np.full((len(dates), len(channels), h, w), np.nan, dtype=np.float32)
        got = self.read_cells([(d, c) for d in dates for c in channels], row0, col0, rows, cols)
        for i, d in enumerate(dates):
            for j, c in enumerate(channels):
                if (d, c) in got:
                    out[i, j] = got[(d, c)]
        return out

    def __repr__(self) -> str:
        return (f"StrdsSeries({', '.join(self.strds)}: {len(self.dates)} dates, "
                f"{[c['name'] for c in self.channels]}, {self.region['rows']} x {self.region['cols']} cells)")


def _session_env() -> tuple[str, str]:
    """(GISBASE, the gisrc text naming the session's project and mapset); GrassError outside a session."""
    gisbase, gisrc = os.environ.get("GISBASE"), os.environ.get("GISRC")
    if not gisbase or not gisrc or not os.path.isfile(gisrc):
        raise GrassError("StrdsDataset / open_series need an active GRASS session (GISBASE and GISRC not "
                         "set): open one with stfuse.grass.session(project, mapset)")
    import grass.script as gs

    env = gs.gisenv()
    text = "".join(f"{k}: {env[k]}\n" for k in ("GISDBASE", "LOCATION_NAME", "MAPSET"))
    return gisbase, text


def _static_maps(gs, static) -> list[tuple[str, str]]:
    """(channel name, fully qualified map id) of each static map; GrassError naming a missing one."""
    if static is None:
        return []
    items = list(static.items()) if isinstance(static, dict) else [(str(m).split("@")[0], m) for m in static]
    out = []
    for name, map_id in items:
        found = gs.find_file(str(map_id), element="raster")
        if not found["file"]:
            raise GrassError(f"static map <{map_id}> (channel {name!r}) not found")
        out.append((str(name), found["fullname"]))
    return out


def _pairs(tgis, opt, sar_strds, sar_bands, max_gap_days, mode, skip_empty_sar):
    """(SAR table indexed by id, rank-1 pairs indexed by optical id, unpaired reasons), as the
    pairing stage pairs (:func:`stfuse.steps.pairing.pairing_step`)."""
    from stfuse.steps.pairing import sar_table

    state = {"strds": sar_strds, "bands": list(sar_bands)}
    sar = sar_table(tgis, state) if skip_empty_sar else temporal.granules(tgis, sar_strds, list(sar_bands))
    try:
        pairs, unpaired = pairing.pair_sensors(opt, sar, max_gap_days, mode=mode, k=1,
                                               coverage="data_fraction" if skip_empty_sar else None)
    except pairing.NoSarDataError:
        raise temporal.DatasetError(
            f"STRDS {sar_strds} has no data in the current region: none of its {len(sar)} granules has a "
            f"non-null cell there (band {sar_bands[0]})") from None
    pairs = pairs[pairs["rank"] == 1].set_index("optical_id")
    return sar.set_index("id"), pairs, dict(zip(unpaired.optical_id, unpaired.reason))


def _check_search_path(gs, strds_ids) -> None:
    """GrassError unless the mapset of every STRDS is on the session's search path (TGIS sees no other)."""
    search = gs.mapsets(search_path=True)
    for strds_id in strds_ids:
        mapset = strds_id.partition("@")[2]
        if mapset and mapset not in search:
            current = gs.gisenv()["MAPSET"]
            raise GrassError(f"STRDS {strds_id}: mapset {mapset} is not on the search path of mapset {current} "
                             f"({', '.join(search)}), so TGIS cannot see it; add it (g.mapsets mapset={mapset} "
                             "operation=add) or open the session in that mapset")


def _crs(gs) -> tuple[str, int | None]:
    wkt = gs.read_command("g.proj", flags="wf").strip()
    srid = gs.parse_command("g.proj", flags="g").get("srid", "")
    epsg = int(srid.split(":", 1)[1]) if srid.upper().startswith("EPSG:") and srid.split(":", 1)[1].isdigit() \
        else None
    return wkt, epsg


def open_series(optical: str, bands, sar: str | None = None, sar_bands=None, *, valid: str | None = None,
                static=None, max_gap_days: float = 6.0, mode: str = "nearest",
                skip_empty_sar: bool = True) -> StrdsSeries:
    """Resolve STRDS names to the map ids of every optical date, paired with SAR, in the current region.

    Call it inside a GRASS session (:func:`stfuse.grass.session`). ``optical``: the optical STRDS id
    (``S2@ingest_S2``), ``bands`` its bands by semantic label (the channel order); ``valid``: its
    validity STRDS (default ``<optical name>_valid`` in the same mapset); ``sar`` / ``sar_bands``:
    the SAR STRDS and bands (None: no SAR channels); ``static``: ``{name: map}`` or a list of maps
    (named after the map). Pairing as the workflow's: nearest SAR granule within ``max_gap_days``
    (inclusive) in ``mode`` (:data:`stfuse.pairing.MODES`); with ``skip_empty_sar`` (the workflow's
    way) each SAR granule's first band is read once to pass over granules without data in the region.
    Errors name the STRDS or map at fault (:class:`stfuse.temporal.DatasetError`,
    :class:`stfuse.grass.GrassError`).
    """
    gisbase, gisrc = _session_env()
    import grass.script as gs
    import grass.temporal as tgis

    from stfuse.steps.pairing import optical_table

    bands = [str(b) for b in bands]
    sar_bands = [str(b) for b in (sar_bands or [])]
    if not bands:
        raise ValueError(f"bands: give at least one band (semantic label) of STRDS {optical}")
    if sar is not None and not sar_bands:
        raise ValueError(f"sar_bands: give the bands (semantic labels) to read from STRDS {sar}")
    name, _, mapset = optical.partition("@")
    valid = valid or (valid_strds_name(name) + (f"@{mapset}" if mapset else ""))
    _check_search_path(gs, [optical, valid] + ([sar] if sar else []))
    tgis.init()
    opt = optical_table(tgis, {"strds": optical, "valid_strds": valid, "bands": bands})
    static_maps = _static_maps(gs, static)
    sar_rows, pairs, unpaired = (None, None, {}) if sar is None else _pairs(
        tgis, opt, sar, sar_bands, max_gap_days, mode, skip_empty_sar)
    if sar is None:
        unpaired = {i: "no SAR STRDS given" for i in opt.id}
    channels = channel_layout({"sensor": name, "bands": bands},
                              {"sensor": (sar or "").split("@")[0], "bands": sar_bands},
                              [{"name": n} for n, _ in static_maps])
    dates, maps = [], []
    for row in opt.to_dict("records"):  # (not itertuples: a semantic label need not be an identifier)
        oid = row["id"]
        paired = pairs is not None and oid in pairs.index
        sar_id = pairs.loc[oid, "sar_id"] if paired else None
        dates.append({"start_time": temporal.iso(row["start_time"]), "optical_id": oid, "sar_id": sar_id,
                      "sar_time": temporal.iso(sar_rows.loc[sar_id, "start_time"]) if paired else None,
                      "sar_gap_days": float(pairs.loc[oid, "gap_days"]) if paired else None})
        maps.append([row[b] for b in bands] + [row["valid"]]
                    + [sar_rows.loc[sar_id, b] if paired else None for b in sar_bands]
                    + [m for _, m in static_maps])
    wkt, epsg = _crs(gs)
    strds = [optical, valid] + ([sar] if sar else [])
    series = StrdsSeries(channels=channels, dates=dates, maps=maps, region=gs.region(), crs_wkt=wkt, epsg=epsg,
                         strds=strds, unpaired=unpaired, gisbase=gisbase, gisrc=gisrc)
    log.info("%s; %d of %d dates without SAR", series, len(unpaired), len(dates))
    return series


# --- whole-region scans: statistics and clear fractions ----------------------------------------------


class _RegionDates:
    """The series as a lazy (T, C, rows, cols) cube: ``[t]`` reads date t over the whole region."""

    def __init__(self, series: StrdsSeries):
        self.series, self.shape = series, series.shape

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, t: int) -> np.ndarray:
        return self.series.read([int(t)], list(range(self.shape[1])))[0]


def compute_stats(series: StrdsSeries, *, prior: bool = True, pixel_mask=None, path=None) -> dict:
    """Normalisation statistics of ``series`` as ``stats.json`` holds them (:func:`stfuse.tiles.channel_stats`).

    Over the cells of ``pixel_mask`` ((rows, cols) bool; default the whole region), every date once,
    read date by date (memory: one date of the region). With ``prior`` the ``<band>_prior`` and
    ``prior_present`` entries are derived as :func:`stfuse.tiles.export_tiles` derives them. Written
    to ``path`` when given. An export's statistics cover its training tiles only: pass the union of
    their footprints as ``pixel_mask`` for the same numbers.
    """
    rows, cols = series.shape[2:]
    mask = np.ones((rows, cols), dtype=bool) if pixel_mask is None else np.asarray(pixel_mask, dtype=bool)
    if mask.shape != (rows, cols):
        raise ValueError(f"pixel_mask must have the region's shape {(rows, cols)}, got {mask.shape}")
    entries = tiles.channel_stats(_RegionDates(series), series.channels, mask)
    if prior:
        entries += tiles.prior_stats(entries, prior_layout(series.channels))
    doc = tiles.stats_document(0, int(mask.sum()), entries)
    doc.update(computed_on="region" if pixel_mask is None else "pixel_mask",
               strds=list(series.strds), note="each cell of the mask counted once per date; NaN ignored; optical "
               "bands only where valid == 1 and all bands finite; <band>_prior channels: the statistics of their band")
    if path is not None:
        tiles.write_json(path, doc)
    return doc


def _clear_fractions(series: StrdsSeries, origins: np.ndarray, size: int) -> np.ndarray:
    """(N, T) float32 share of clear cells of each tile at each date, as ``clear_fraction.npy`` holds it.

    Reads the optical and validity maps over the whole region, a bounded number of dates at a time.
    """
    n_opt = sum(c["kind"] == "optical" for c in series.channels)
    sub = list(range(n_opt + 1))  # channel_layout: the optical bands, then valid
    n_dates, _, rows, cols = series.shape
    step = max(1, SCAN_CHUNK_BYTES // max(1, 4 * len(sub) * rows * cols))
    counts = np.zeros((len(origins), n_dates), dtype=np.int64)
    for lo in range(0, n_dates, step):
        dates = list(range(lo, min(n_dates, lo + step)))
        chunk = series.read(dates, sub)
        counts[:, lo:lo + len(dates)] = tiles.tile_clear_counts(chunk, origins, size, series.channels[:n_opt + 1])
    return (counts / float(size * size)).astype(np.float32)


# --- the dataset -------------------------------------------------------------------------------------


def _load_stats(stats) -> tuple[dict, str]:
    """(the stats doc, where it came from) from a stats.json path or a doc."""
    if isinstance(stats, (str, os.PathLike)):
        path = Path(stats)
        if not path.is_file():
            raise FileNotFoundError(f"stats file {path} does not exist (a stats.json as export_tiles writes it)")
        return json.loads(path.read_text()), str(path)
    if isinstance(stats, dict) and "channels" in stats:
        return stats, "the stats given"
    raise ValueError("stats must be the path of a stats.json or its content (a dict with 'channels'), "
                     f"got {type(stats).__name__}")


def _check_number(name, value, low, high=None, integer=False):
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind) or value < low or (high is not None and value > high):
        span = f">= {low}" if high is None else f"within [{low}, {high}]"
        raise ValueError(f"{name} must be {'an integer' if integer else 'a number'} {span}, got {value!r}")
    return int(value) if integer else float(value)


class _TileSeries:
    """A tile's (T, C, s, s) series for :meth:`InputAssembler.build`: ``len()`` and ``[d]``.

    Holds the dates read for the sample (``blocks``: date -> (C, s, s)); any other date is read on
    access, so the assembler gets the right values whichever dates it asks for.
    """

    __slots__ = ("blocks", "n_dates", "fetch")

    def __init__(self, blocks: dict, n_dates: int, fetch):
        self.blocks, self.n_dates, self.fetch = blocks, n_dates, fetch

    def __len__(self) -> int:
        return self.n_dates

    def __getitem__(self, d: int) -> np.ndarray:
        d = int(d)
        if d not in self.blocks:
            if not 0 <= d < self.n_dates:
                raise IndexError(f"date {d} out of range for {self.n_dates} dates")
            self.blocks[d] = self.fetch(d)
        return self.blocks[d]


class StrdsDataset(Dataset):
    """Samples (tile, optical date) of GRASS STRDS in the current region, read as they are needed.

    ``optical``: the optical STRDS id, or a :class:`StrdsSeries` from :func:`open_series` (then
    leave ``bands`` .. ``skip_empty_sar`` out); ``bands``, ``sar``, ``sar_bands``, ``valid``,
    ``static``, ``max_gap_days``, ``mode``, ``skip_empty_sar``: as for :func:`open_series` (build it
    inside a GRASS session). The model input, as :class:`stfuse.dataset.GapFillDataset` builds it
    from an export with the same parameters:

    stats
        ``stats.json`` path or doc (:func:`stfuse.tiles.export_tiles`, :func:`compute_stats`); its
        channels must be the series' (plus the prior channels with ``prior``).
    size, overlap
        The tile grid, :func:`stfuse.tiles.tile_origins` of the region; ``origins`` ((row, col)
        pairs, e.g. an export's ``index.csv`` rows of one split) takes only those tiles.
    k_neighbours, prior
        K previous and next optical dates; the temporal prior channels on or off.
    min_target_valid
        A (tile, t) is a sample only if at least this share of its cells is clear at t; above 0 the
        optical and validity maps of the whole region are read once, at construction, to know it.
    extra_mask_seed, extra_mask_fraction
        Artificial masking, as in GapFillDataset (the draw is seeded with ``[seed, index]``).
    cache_tiles
        Tiles whose optical and validity maps read (and prior) a process keeps.

    Samples are ordered tile by tile (origin order), dates in time order. See the module
    docstring for a sample's keys.
    """

    def __init__(self, optical, bands=None, sar=None, sar_bands=None, *, stats, size, overlap=0, valid=None,
                 static=None, max_gap_days=6.0, mode="nearest", skip_empty_sar=True, k_neighbours=2,
                 prior=True, origins=None, min_target_valid=0.0, extra_mask_seed=None, extra_mask_fraction=0.0,
                 cache_tiles=CACHE_TILES):
        if isinstance(optical, StrdsSeries):
            if bands is not None or sar is not None or sar_bands is not None or valid is not None \
                    or static is not None:
                raise ValueError("StrdsDataset: with a StrdsSeries, leave bands, sar, sar_bands, valid and "
                                 "static out (they are the series')")
            series = optical
        else:
            series = open_series(optical, bands, sar, sar_bands, valid=valid, static=static,
                                 max_gap_days=max_gap_days, mode=mode, skip_empty_sar=skip_empty_sar)
        self.series = series
        self._check_params(prior, min_target_valid, extra_mask_seed, extra_mask_fraction, cache_tiles)
        self.channels = series.channels + (prior_layout(series.channels) if self.prior else [])
        self.stats, where = _load_stats(stats)
        names = [c["name"] for c in self.channels]
        got = [c["name"] for c in self.stats["channels"]]
        if got != names:
            raise ValueError(f"{where}: statistics for channels {got}, but the series (prior "
                             f"{'on' if self.prior else 'off'}) has channels {names}")
        self.assembler = InputAssembler(self.channels, series.dates, self.stats["channels"], k_neighbours)
        self.k_neighbours = self.assembler.k_neighbours
        self.dates, self.n_dates = series.dates, len(series.dates)
        self.size = _check_number("size", size, 1, integer=True)
        self.overlap = _check_number("overlap", overlap, 0, integer=True)
        self.origins = self._origins(origins)
        self._items = None  # None: every (tile, date), index = tile * T + t
        self.clear_fraction = None
        if self.min_target_valid > 0:
            self.clear_fraction = _clear_fractions(series, self.origins, self.size)
            self._items = np.argwhere(self.clear_fraction >= self.min_target_valid).astype(np.int64)
        if len(self) == 0:
            log.warning("StrdsDataset(%s): no sample (no tile, or no date with >= %.3f clear cells)",
                        ", ".join(series.strds), self.min_target_valid)
        self.input_channels = list(self.assembler.input_channels)
        self.target_channels = list(self.assembler.target_channels)
        self.prior_input_indices = list(self.assembler.prior_input_indices)
        self.present_input_index = self.assembler.present_input_index
        n_opt = len(self.assembler.optical_indices)
        self._light = list(range(n_opt + 1))  # optical bands and valid: all a neighbour date needs
        self._cache, self._cache_pid = OrderedDict(), None

    def _check_params(self, prior, min_target_valid, extra_mask_seed, extra_mask_fraction, cache_tiles):
        if not isinstance(prior, bool):
            raise ValueError(f"prior must be True or False, got {prior!r}")
        self.prior = prior
        self.min_target_valid = _check_number("min_target_valid", min_target_valid, 0.0, 1.0)
        self.extra_mask_fraction = _check_number("extra_mask_fraction", extra_mask_fraction, 0.0, 1.0)
        self.extra_mask_seed = None if extra_mask_seed is None else \
            _check_number("extra_mask_seed", extra_mask_seed, 0, integer=True)
        self.cache_tiles = _check_number("cache_tiles", cache_tiles, 1, integer=True)

    def _origins(self, origins) -> np.ndarray:
        rows, cols = self.series.shape[2:]
        if origins is None:
            return np.asarray(tiles.tile_origins(rows, cols, self.size, self.overlap), dtype=np.int64).reshape(-1, 2)
        arr = np.asarray(origins, dtype=np.int64).reshape(-1, 2)
        bad = (arr[:, 0] < 0) | (arr[:, 1] < 0) | (arr[:, 0] + self.size > rows) | (arr[:, 1] + self.size > cols)
        if bad.any():
            r, c = arr[np.flatnonzero(bad)[0]]
            raise ValueError(f"origins: the tile at row {r}, col {c} (size {self.size}) does not lie inside the "
                             f"{rows} x {cols} region")
        return arr

    # ---------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.origins) * self.n_dates if self._items is None else len(self._items)

    def item(self, index: int) -> tuple[int, int]:
        """(tile number in :attr:`origins`, date index) of sample ``index``."""
        if self._items is None:
            return divmod(int(index), self.n_dates)
        tile, t = self._items[int(index)]
        return int(tile), int(t)

    def index_of(self, row: int, col: int, t: int) -> int:
        """The sample index of the tile with origin (row, col) at date t (ValueError if not a sample)."""
        hit = np.flatnonzero((self.origins[:, 0] == row) & (self.origins[:, 1] == col))
        if len(hit):
            if self._items is None:
                return int(hit[0]) * self.n_dates + int(t)
            match = np.flatnonzero((self._items[:, 0] == hit[0]) & (self._items[:, 1] == t))
            if len(match):
                return int(match[0])
        raise ValueError(f"no sample for the tile at row {row}, col {col}, date {t}")

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_cache"], state["_cache_pid"] = OrderedDict(), None  # pixels never travel to a worker
        return state

    def _window(self, tile: int) -> tuple[int, int, int, int]:
        r, c = self.origins[tile]
        return int(r), int(c), self.size, self.size

    def _tile_entry(self, tile: int) -> dict:
        """The tile's cache entry in this process (LRU of ``cache_tiles`` tiles): ``light`` (date ->
        its optical + valid block (B+1, s, s), filled as dates are read) and ``prior`` (T, B+1, s, s)
        or None. Consecutive dates of a tile share their neighbours, so sequential samples read about
        one new date each."""
        if self._cache_pid != os.getpid():  # a forked worker starts with an empty cache of its own
            self._cache, self._cache_pid = OrderedDict(), os.getpid()
        cache = self._cache
        if tile in cache:
            cache.move_to_end(tile)
        else:
            cache[tile] = {"light": {}, "prior": None}
            while len(cache) > self.cache_tiles:
                cache.popitem(last=False)
        return cache[tile]

    def _read(self, tile: int, entry: dict, dates, heavy_date: int | None) -> dict:
        """Read, in one call, the light channels of those ``dates`` the entry lacks (into it) and the
        other channels (SAR, static) of ``heavy_date``; returns the latter, channel -> (s, s)."""
        n_light, n_base = len(self._light), len(self.series.channels)
        missing = [d for d in dates if d not in entry["light"]]
        cells = [(d, c) for d in missing for c in self._light]
        if heavy_date is not None:
            cells += [(heavy_date, c) for c in range(n_light, n_base)]
        got = self.series.read_cells(cells, *self._window(tile))
        for d in missing:
            block = np.full((n_light, self.size, self.size), np.nan, dtype=np.float32)
            for c in self._light:
                if (d, c) in got:
                    block[c] = got[(d, c)]
            entry["light"][d] = block
        return {c: got[(heavy_date, c)] for c in range(n_light, n_base) if (heavy_date, c) in got}

    def _series(self, tile: int, t: int, other: int) -> _TileSeries:
        """The tile's series for sample (tile, t), the maps it needs read in one call: t in full, the
        optical + valid channels of its neighbours (and of the date lending its mask; their other
        channels NaN: the assembler reads SAR and static channels of the target date alone); with
        the prior, the optical + valid channels of every date once per tile, and its prior."""
        entry = self._tile_entry(tile)
        near = [t + off for off in self.assembler.neighbour_offsets() if 0 <= t + off < self.n_dates]
        dates = sorted(set([t] + near + ([other] if other >= 0 else [])))
        if self.prior and entry["prior"] is None:
            dates = list(range(self.n_dates))
        heavy = self._read(tile, entry, dates, t)
        if self.prior and entry["prior"] is None:
            light = np.stack([entry["light"][d] for d in range(self.n_dates)])
            entry["prior"] = prior_channels(light, self.series.channels[:len(self._light)], self.dates)[0]
        n_light, n_base = len(self._light), len(self.series.channels)

        def block(d):
            if d not in entry["light"]:  # a date the assembler was not expected to ask for
                self._read(tile, entry, [d], None)
            out = np.full((len(self.channels), self.size, self.size), np.nan, dtype=np.float32)
            out[:n_light] = entry["light"][d]
            if self.prior:
                out[n_base:] = entry["prior"][d]
            if d == t:
                for c, arr in heavy.items():
                    out[c] = arr
            return out

        return _TileSeries({}, self.n_dates, block)  # each date's block made once, when asked for

    def _mask_date(self, index: int, t: int) -> int:
        """The date whose cloud mask is borrowed (artificial masking), -1 for none: GapFillDataset's draw."""
        if self.extra_mask_fraction <= 0 or self.n_dates < 2:
            return -1
        rng = np.random.default_rng(None if self.extra_mask_seed is None else [self.extra_mask_seed, index])
        if rng.random() >= self.extra_mask_fraction:
            return -1
        other = int(rng.integers(self.n_dates - 1))
        return other + (other >= t)

    def __getitem__(self, index):
        if isinstance(index, torch.Tensor):
            index = int(index)
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"sample {index} out of range for {n} samples")
        index = int(index) % n
        tile, t = self.item(index)
        other = self._mask_date(index, t)
        series = self._series(tile, t, other)
        hide = None if other < 0 else ~self.assembler.clear(np.asarray(series[other], dtype=np.float32))
        image, mask, target, target_valid = self.assembler.build(series, t, hide)
        return self._sample(tile, t, other, image, mask, target, target_valid)

    def _sample(self, tile, t, other, image, mask, target, target_valid) -> dict:
        r0, c0, s, _ = self._window(tile)
        reg = self.series.region
        west, north = reg["w"] + c0 * reg["ewres"], reg["n"] - r0 * reg["nsres"]
        date = self.dates[t]
        return {
            "image": torch.from_numpy(image),
            "mask": torch.from_numpy(mask[None].astype(np.float32)),
            "target": torch.from_numpy(target),
            "target_valid": torch.from_numpy(target_valid[None].astype(np.float32)),
            "crs": self.series.crs,
            "bounds": (west, north - s * reg["nsres"], west + s * reg["ewres"], north),
            "transform": (west, float(reg["ewres"]), 0.0, north, 0.0, -float(reg["nsres"])),
            "start_time": date["start_time"],
            "labels": tuple(self.input_channels),
            "target_labels": tuple(self.target_channels),
            "metadata": {"tile": tile, "row": r0, "col": c0, "t": t, "start_time": date["start_time"],
                         "masked_with": other, "optical_id": date["optical_id"], "sar_id": date["sar_id"] or ""},
        }

    # ---------------------------------------------------------------------------------------------
    @property
    def n_input_channels(self) -> int:
        return len(self.input_channels)

    def input_spec(self) -> dict:
        """Plain-JSON description of the model inputs (as :meth:`GapFillDataset.input_spec`)."""
        return {"input_channels": list(self.input_channels), "target_channels": list(self.target_channels),
                "k_neighbours": self.k_neighbours, "dt_scale_days": DT_SCALE_DAYS, "size": self.size,
                "stats": {c["name"]: {"mean": c["mean"], "std": c["std"]} for c in self.stats["channels"]},
                "residual": self.assembler.residual_spec()}

    def __repr__(self) -> str:
        return (f"StrdsDataset({', '.join(self.series.strds)}, tiles={len(self.origins)} of {self.size}, "
                f"samples={len(self)}, inputs={self.n_input_channels}, k={self.k_neighbours}, prior={self.prior})")


def stack_samples(samples: list[dict]) -> dict:
    """A ``collate_fn`` in torchgeo's way: tensors stacked, every other value a list (one per sample);
    ``metadata`` a dict of lists."""
    out = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if isinstance(values[0], torch.Tensor):
            out[key] = torch.stack(values)
        elif key == "metadata":
            out[key] = {k: [v[k] for v in values] for k in values[0]}
        else:
            out[key] = values
    return out
