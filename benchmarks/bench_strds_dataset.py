"""Reading speed of StrdsDataset (straight from GRASS STRDS) against GapFillDataset (exported tiles) and xarray-grass.

Makes a synthetic scene (default 256 x 256 cells, ~30 optical dates over 5 months, SAR every 6 days),
ingests it into a throwaway GRASS project in a temporary directory, runs pairing, groups and the cube
read the workflow's way and exports tiles with ``export_tiles`` (size 64, overlap 16). Then, for the
training tiles of that export, both datasets give the same samples (tests/test_strds_dataset.py); each
configuration iterates ``DataLoader(ds, batch_size=16, num_workers=W)`` over the first ``--samples``
samples (``sequential``: tile by tile, as the prior's tile cache likes it; ``shuffled``: a seeded
permutation) ``--runs`` times and the median is printed as a Markdown table, with the machine and date.
Worker start-up is included in every run (no persistent workers).

What each row does -- the figures compare reading, not the same work:

* ``GapFillDataset``: model-ready samples (normalised inputs, mask, target; with the prior its
  channels) from the exported tiles' files; the export itself is not timed.
* ``StrdsDataset``: the same samples, read from the STRDS per tile window (grassio) and built the
  same way, the prior computed from the tile's whole series (``open_series`` is not timed).
* ``xarray-grass`` (optional: only where ``import xarray_grass`` works; not in requirements): raw
  values only, no normalisation, prior or sample assembly. The optical, validity and SAR STRDS are
  opened with ``xarray.open_dataset(<mapset>, engine=xarray_grass, strds=<id>)`` (one Dataset each);
  for each distinct tile the samples touch, the tile's (T, C, 64, 64) float32 of all T dates
  (optical bands + valid + paired SAR, the cube's channels) is ``isel`` + ``.values`` of it, in the
  benchmark's process (it needs the GRASS session there; no DataLoader workers). Which map goes to
  which (date, channel) comes from ``open_series`` (xarray-grass has no semantic-label filter and no
  pairing) and a tile is checked equal to the series' own raw read. Its backend reads a map whole on
  first access and keeps it for the Dataset's life, so each run opens the Datasets anew: ``read``
  excludes opening (like the two datasets, whose construction is not timed), ``open + read``
  includes it. Its cost is about one whole-region read of every map touched, whatever the tile
  count, so tiles/s grows with the tiles read. xarray-grass 0.5.0 lists mapsets with ``g.mapsets
  -p format=json`` (GRASS >= 8.4): under GRASS 8.2 that one metadata call is shimmed. The skip is
  printed when xarray-grass is not installed.

``tiles`` is the number of distinct tiles of the samples read; ``tiles/s`` is the unit common to all
rows (a dataset's sample reads part of its tile: 5 dates without the prior, the whole series with it).

Usage::

    python benchmarks/bench_strds_dataset.py [--size 256] [--months 5] [--samples 96] [--runs 3] [--json out.json]

Figures of ``nice -n 19 .venv/bin/python benchmarks/bench_strds_dataset.py --runs 3`` on the development
VM (2 shared CPUs, load ~3.6 from other jobs; Python 3.11.7, torch 2.13.0+cpu, GRASS 8.2.1, xarray-grass
0.5.0), 2026-12-01 20:24-20:32 UTC: three invocations, each the median of 3 runs; the median of the three
(range), 96 samples = 4 tiles sequential, 13 tiles shuffled; scene 31 dates x 7 channels x 256 x 256:

| row | prior | workers | sequential samples/s | sequential tiles/s | shuffled samples/s | shuffled tiles/s |
| --- | --- | --- | --- | --- | --- | --- |
| GapFillDataset | on | 0 | 112 (104-113) | 4.7 | 113 (111-120) | 15.3 |
| GapFillDataset | on | 2 | 361 (329-373) | 15.0 | 341 (279-347) | 46.2 |
| StrdsDataset | on | 0 | 75 (72-78) | 3.1 | 9.9 (9.9-10.9) | 1.35 |
| StrdsDataset | on | 2 | 49 (47-51) | 2.0 | 11.1 (10.9-11.4) | 1.50 |
| xarray-grass, read | raw | 1 process | - | 2.6 (2.3-2.7) | - | 8.2 (8.2-8.5) |
| xarray-grass, open + read | raw | 1 process | - | 1.25 (1.16-1.31) | - | 4.2 (4.0-4.2) |
| GapFillDataset | off | 0 | 373 (113-600) | 15.5 | 343 (114-1231) | 46.4 |
| StrdsDataset | off | 0 | 60 (58-83) | 2.5 | 24 (23-25) | 3.3 |
| StrdsDataset | off | 2 | 60 (58-65) | 2.5 | 32 (26-32) | 4.4 |

Tile by tile, StrdsDataset builds model-ready samples with the prior about as fast as xarray-grass
only reads the raw tiles (3.1 against 2.6 tiles/s, 1.25 with opening); shuffled, xarray-grass's
whole-map cache wins (8.2 tiles/s against 1.35: StrdsDataset rereads a tile's whole series for the
prior when its 8-tile cache misses). Use StrdsDataset (or exported tiles, faster still) to feed a
model; use xarray-grass to look at raw values in xarray where the maps touched fit in memory.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from stfuse import bridge, grass, ingest, strds, synthetic  # noqa: E402
from stfuse.dataset import GapFillDataset  # noqa: E402

from _scene import sensors  # noqa: E402

TILE = dict(size=64, overlap=16, min_valid_fraction=0.05, block_size=128, val_fraction=0.25, seed=0)
K, MIN_VALID, BATCH = 2, 0.05, 16


def build_scene(root: Path, size: int, months: int) -> tuple[dict, float]:
    """Scene -> GRASS project -> pairing, groups, cube -> tiles (both variants); (project state, seconds)."""
    t0 = time.perf_counter()
    end = (dt.date(2021, 4, 1) + dt.timedelta(days=30 * months)).isoformat()
    scene = synthetic.make_scene(root / "scene", seed=1, width=size, height=size, start="2021-04-01", end=end)
    checked = root / "checked.csv"
    state = ingest.prepare_project(scene, sensors(), {}, root / "grassdata" / "bench", checked)
    states = {s: ingest.ingest_sensor(state, checked, s, spec) for s, spec in sensors().items()}
    bridge.pairing_step(state, states["S2"], states["S1"], root / "pairing", max_gap_days=6)
    bridge.groups_step(state, states["S2"], states["S1"], root / "pairing", root / "groups.json")
    bridge.cube_step(state, root / "groups.json", root / "cube")
    for prior in (True, False):
        bridge.tiles_step(root / "cube", root / f"tiles_{prior}", prior=prior, **TILE)
    grass.own_mapset(state["project"], "bench")
    with grass.session(state["project"], "bench") as gs:
        gs.run_command("g.mapsets", mapset="ingest_S2,ingest_S1", operation="add", quiet=True)
    return state, time.perf_counter() - t0


def datasets(root: Path, state: dict, prior: bool):
    """(GapFillDataset, StrdsDataset) over the same training tiles and statistics."""
    tiles_dir = root / f"tiles_{prior}"
    ref = GapFillDataset(tiles_dir, "train", k_neighbours=K, min_target_valid=MIN_VALID)
    with grass.session(state["project"], "bench"):
        series = strds.open_series("S2@ingest_S2", ["B02", "B03", "B04", "B08"], "S1@ingest_S1", ["VV", "VH"],
                                   max_gap_days=6)
    ds = strds.StrdsDataset(series, stats=tiles_dir / "stats.json", size=TILE["size"], overlap=TILE["overlap"],
                            k_neighbours=K, prior=prior, origins=list(zip(ref.index.row, ref.index.col)),
                            min_target_valid=MIN_VALID)
    assert len(ds) == len(ref), (len(ds), len(ref))
    return ref, ds


def run_once(ds, pick, workers: int) -> float:
    loader = DataLoader(Subset(ds, pick), batch_size=BATCH, num_workers=workers)
    t0 = time.perf_counter()
    n = sum(len(batch["image"]) for batch in loader)
    assert n == len(pick)
    return time.perf_counter() - t0


def tiles_of(ds, pick) -> list[int]:
    """The distinct tiles of the samples ``pick``, in the order they are first met."""
    return list(dict.fromkeys(ds.item(i)[0] for i in pick))


def xarray_grass_version() -> str | None:
    """xarray-grass's version, or None when it is not installed (the row is then skipped)."""
    if importlib.util.find_spec("xarray_grass") is None:
        return None
    from importlib.metadata import version

    return version("xarray-grass")


class XarrayGrassReader:
    """A tile's raw (T, C, s, s) float32 of the series' maps, read with xarray-grass (inside a session).

    Each STRDS the series names (optical, validity, SAR) is opened with ``xarray.open_dataset(<its
    mapset>, engine=xarray_grass, strds=<id>)`` (one lazy variable per STRDS over its maps in time
    order: xarray-grass has no semantic-label filter, so the optical variable holds every band's
    maps); a tile is ``isel`` of the maps the series places at (date, channel) and of the tile's
    rows and columns, then ``.values``. Which map is where (bands by semantic label, SAR paired to
    the optical dates) comes from the series (``open_series``, not timed): xarray-grass has neither.
    xarray-grass's backend reads a map whole on first access and keeps it for the Dataset's life, so
    a run opens the Datasets anew (timed) and its first tile reads every map it touches in full.
    """

    def __init__(self, series):
        import grass.script as gs
        import xarray as xr
        import xarray_grass

        self.xr, self.engine, self.series = xr, xarray_grass.GrassBackendEntrypoint, series
        iface = xarray_grass.GrassInterface
        major, minor = (int(v) for v in gs.version()["version"].split(".")[:2])
        if (major, minor) < (8, 4) and not getattr(iface, "_stfuse_shim", False):
            # xarray-grass 0.5.0 lists the accessible mapsets with `g.mapsets -p format=json`, which
            # GRASS < 8.4 lacks; the same list the 8.2 way (metadata only: reading is untouched)
            iface.get_accessible_mapsets = staticmethod(lambda: gs.mapsets(search_path=True))
            iface._stfuse_shim = True
        self.shim = bool(getattr(iface, "_stfuse_shim", False))
        self.project = Path(gs.gisenv()["GISDBASE"]) / gs.gisenv()["LOCATION_NAME"]
        # (STRDS id, [its map ids in time order, as xarray-grass lists them when it opens the STRDS])
        probe = xarray_grass.GrassInterface()
        self.strds = [(sid, [m.id for m in probe.list_maps_in_strds(sid)]) for sid in series.strds]
        where = {m: (k, i) for k, (_, ids) in enumerate(self.strds) for i, m in enumerate(ids)}
        # per STRDS: positions to take and, for each, the (date, channel) cells it fills
        self.take = []
        for k in range(len(self.strds)):
            cells = [(where[m][1], d, c) for d, row in enumerate(series.maps) for c, m in enumerate(row)
                     if m and where[m][0] == k]
            pos = sorted({p for p, _, _ in cells})
            slot = {p: j for j, p in enumerate(pos)}
            self.take.append((pos, [(slot[p], d, c) for p, d, c in cells]))

    def open(self) -> list:
        """One lazy DataArray per STRDS (xarray-grass's Dataset of it, opened now)."""
        out = []
        for sid, _ in self.strds:
            name, _, mapset = sid.partition("@")
            ds = self.xr.open_dataset(self.project / mapset, engine=self.engine, strds=sid)
            out.append(ds[name])
        return out

    def tile(self, arrays, row0: int, col0: int, size: int) -> np.ndarray:
        T, C = len(self.series.dates), len(self.series.channels)
        out = np.full((T, C, size, size), np.nan, dtype=np.float32)
        for da, (pos, cells) in zip(arrays, self.take):
            if not pos:
                continue
            block = da.isel({da.dims[0]: pos, "y": slice(row0, row0 + size),
                             "x": slice(col0, col0 + size)}).values
            for j, d, c in cells:
                out[d, c] = block[j]
        return out


def run_xarray_grass(reader, ds, tiles: list[int]) -> tuple[float, float]:
    """(seconds for opening the STRDS anew and reading ``tiles``, of which opening)."""
    t0 = time.perf_counter()
    arrays = reader.open()
    t_open = time.perf_counter() - t0
    for tile in tiles:
        r, c = ds.origins[tile]
        reader.tile(arrays, int(r), int(c), ds.size)
    return time.perf_counter() - t0, t_open


def check_xarray_grass(reader, ds, tile: int) -> None:
    """xarray-grass's read of ``tile`` equals the series' own raw read (grassio), NaN for NaN."""
    r, c = (int(v) for v in ds.origins[tile])
    got = reader.tile(reader.open(), r, c, ds.size)
    want = ds.series.read(range(len(ds.dates)), range(len(ds.series.channels)), r, c, ds.size, ds.size)
    np.testing.assert_allclose(got, want, rtol=1e-6, equal_nan=True)


def machine() -> str:
    try:
        grass_version = "GRASS " + grass.grass_config("version")
    except (OSError, subprocess.CalledProcessError, grass.GrassError):
        grass_version = "GRASS ?"
    cpu = platform.processor() or platform.machine()
    return (f"{platform.node()}, {os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}, "
            f"torch {torch.__version__}, {grass_version.strip()}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=256, help="scene width and height in cells")
    ap.add_argument("--months", type=int, default=5, help="scene length (optical every ~5 days)")
    ap.add_argument("--samples", type=int, default=96, help="samples per run")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--json", help="write the rows here too")
    args = ap.parse_args(argv)
    rows, shim = [], False
    xg = xarray_grass_version()
    if xg is None:
        print("xarray-grass is not importable here (pip install xarray-grass): its row is skipped",
              file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="stfuse_bench_strds_") as tmp:
        root = Path(tmp)
        state, setup_s = build_scene(root, args.size, args.months)
        for prior in (True, False):
            ref, ds = datasets(root, state, prior)
            n = min(args.samples, len(ds))
            orders = {"sequential": list(range(n)),
                      "shuffled": [int(i) for i in np.random.default_rng(0).permutation(len(ds))[:n]]}
            for order, pick in orders.items():
                n_tiles = len(tiles_of(ds, pick))
                for workers in args.workers:
                    for name, d in (("GapFillDataset", ref), ("StrdsDataset", ds)):
                        times = [run_once(d, pick, workers) for _ in range(args.runs)]
                        med = statistics.median(times)
                        rows.append(dict(dataset=name, prior=prior, order=order, workers=workers, samples=n,
                                         tiles=n_tiles, median_s=med, runs_s=times, samples_per_s=n / med,
                                         tiles_per_s=n_tiles / med))
                        print(f"{name:15s} prior={prior!s:5s} {order:10s} workers={workers}: "
                              f"{rows[-1]['samples_per_s']:8.1f} samples/s", file=sys.stderr, flush=True)
                if xg is None or not prior:  # raw reading knows no prior: measured once, with the prior-on tiles
                    continue
                tiles = tiles_of(ds, pick)
                with grass.session(state["project"], "bench"):
                    reader = XarrayGrassReader(ds.series)
                    check_xarray_grass(reader, ds, tiles[0])
                    got = [run_xarray_grass(reader, ds, tiles) for _ in range(args.runs)]
                for what, times in (("read", [t - o for t, o in got]), ("open + read", [t for t, _ in got])):
                    med = statistics.median(times)
                    rows.append(dict(dataset=f"xarray-grass {xg}, {what}", prior=None, order=order, workers=None,
                                     samples=None, tiles=len(tiles), median_s=med, runs_s=times,
                                     samples_per_s=None, tiles_per_s=len(tiles) / med))
                    print(f"xarray-grass    raw            {order:10s} {what:11s}: {rows[-1]['tiles_per_s']:8.2f} "
                          f"tiles/s", file=sys.stderr, flush=True)
                shim = reader.shim
        shape = (len(ds.dates), len(ds.series.channels), args.size, args.size)
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"StrdsDataset vs GapFillDataset vs xarray-grass, {when}; {machine()}"
          + ("" if xg is None else f", xarray-grass {xg}"))
    print(f"scene {shape[0]} dates x {shape[1]} channels x {shape[2]} x {shape[3]} cells, tiles {TILE['size']} "
          f"(overlap {TILE['overlap']}), K={K}, batch {BATCH}; set-up (ingest .. export) {setup_s:.1f} s; "
          f"medians of {args.runs} runs, worker start-up included\n")
    print("| dataset | prior | order | workers | samples | samples/s (median) | tiles | tiles/s (median) | runs (s) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        raw = r["prior"] is None
        print(f"| {r['dataset']} | {'n/a (raw)' if raw else 'on' if r['prior'] else 'off'} | {r['order']} "
              f"| {'1 (in-process)' if raw else r['workers']} | {'-' if raw else r['samples']} "
              f"| {'-' if raw else format(r['samples_per_s'], '.1f')} | {r['tiles']} | {r['tiles_per_s']:.2f} "
              f"| {', '.join(f'{t:.2f}' for t in r['runs_s'])} |")
    print()
    if xg is None:
        print("xarray-grass: not installed, row skipped.")
    else:
        print(f"xarray-grass rows: raw (T, C, s, s) float32 of each tile the samples touch (all {shape[0]} dates, "
              "optical + valid + paired SAR, map placement from open_series), in this process; 'read': the Datasets "
              "opened (anew each run) before the clock starts, 'open + read': opening timed too; a tile checked "
              "equal to the series' own raw read"
              + ("; GRASS < 8.4: g.mapsets listing shimmed for xarray-grass." if shim else "."))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(when=when, machine=machine(), xarray_grass=xg, rows=rows),
                                              indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
