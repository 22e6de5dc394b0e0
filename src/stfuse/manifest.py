"""Read and check a raster manifest (path, sensor, semantic_label, start_time) against a study config.

Every check runs before anything is written to GRASS, and every error names the manifest, its line
and the file or key at fault. Times: an explicit offset (+02:00) is converted to UTC; a time without
any zone is refused, because GRASS has no time zones and guessing would shift the series silently.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

log = logging.getLogger("stfuse.manifest")

COLUMNS = ["path", "sensor", "semantic_label", "start_time"]
FLOAT32_MAX = 3.4028234663852886e38


class ManifestError(ValueError):
    """The manifest or a file it lists is unusable; the message names the line and file."""


@dataclass(frozen=True)
class Grid:
    """A north-up raster grid in one CRS."""

    epsg: int | None
    crs_wkt: str
    west: float
    north: float
    res_x: float
    res_y: float
    width: int
    height: int

    def __post_init__(self):
        # Plain Python numbers: the grid ends up in VRT XML and JSON manifests.
        for key in ("west", "north", "res_x", "res_y"):
            object.__setattr__(self, key, float(getattr(self, key)))
        for key in ("width", "height"):
            object.__setattr__(self, key, int(getattr(self, key)))
        if self.epsg is not None:
            object.__setattr__(self, "epsg", int(self.epsg))

    @property
    def east(self) -> float:
        return self.west + self.width * self.res_x

    @property
    def south(self) -> float:
        return self.north - self.height * self.res_y


def parse_utc(text: str) -> pd.Timestamp:
    """ISO 8601 with Z or an offset -> UTC Timestamp; ValueError for naive or unparseable times."""
    text = str(text).strip()
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(f"'{text}' is not an ISO 8601 time (e.g. 2017-08-01T17:32:36Z)") from None
    if parsed.tzinfo is None:
        raise ValueError(f"'{text}' has no time zone; write UTC with a trailing Z (GRASS keeps times in UTC)")
    return pd.Timestamp(parsed.astimezone(timezone.utc))


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Parse the CSV: absolute paths, UTC times, and `line` (the CSV line number) for messages."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest {path} does not exist")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ManifestError(f"manifest {path} is not a readable CSV: {err}") from None
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ManifestError(f"manifest {path} lacks column(s) {', '.join(missing)}; expected {','.join(COLUMNS)}")
    if df.empty:
        raise ManifestError(f"manifest {path} lists no rasters")
    df = df[COLUMNS].copy()
    df["line"] = range(2, len(df) + 2)
    times, converted = [], 0
    for line, raw in zip(df["line"], df["start_time"]):
        try:
            times.append(parse_utc(raw))
        except ValueError as err:
            raise ManifestError(f"{path}:{line}: start_time {err}") from None
        converted += not raw.strip().upper().endswith(("Z", "+00:00"))
    if converted:
        log.info("%s: converted %d start times with a non-UTC offset to UTC", path, converted)
    df["start_time"] = times
    base = path.parent.resolve()
    df["path"] = [str((base / p).resolve()) if p else "" for p in df["path"]]
    for line, p in zip(df["line"], df["path"]):
        if not p:
            raise ManifestError(f"{path}:{line}: empty path")
    dup = df.duplicated(["sensor", "semantic_label", "start_time"], keep="first")
    if dup.any():
        row = df[dup].iloc[0]
        first = df[
            (df.sensor == row.sensor) & (df.semantic_label == row.semantic_label) & (df.start_time == row.start_time)
        ].iloc[0]
        raise ManifestError(
            f"{path}:{row.line}: duplicate timestamp {row.start_time.isoformat()} for {row.sensor} "
            f"{row.semantic_label} (already on line {first.line})"
        )
    _check_time_resolution(df, path)
    df.attrs["manifest"] = str(path)
    return df


def _check_time_resolution(df: pd.DataFrame, path) -> None:
    """Two acquisitions of one sensor less than 1 s apart: GRASS map names and TGIS times have
    one-second resolution, so they would collide (or blur into one acquisition)."""
    for sensor, rows in df.groupby("sensor", sort=False):
        firsts = rows.sort_values(["start_time", "line"]).drop_duplicates("start_time")
        gaps = firsts.start_time.diff().dt.total_seconds()
        close = gaps[gaps < 1.0]
        if not close.empty:
            i = firsts.index.get_loc(close.index[0])
            a, b = firsts.iloc[i - 1], firsts.iloc[i]
            raise ManifestError(
                f"{path}:{b.line}: {sensor} acquisition {b.start_time.isoformat()} is only "
                f"{close.iloc[0]:.3g} s after the one on line {a.line} ({a.start_time.isoformat()}); "
                "map names and GRASS times have one-second resolution: give all bands of one acquisition "
                "the same start_time, and distinct acquisitions times at least 1 s apart"
            )


def check_against_config(df: pd.DataFrame, sensors: dict) -> pd.DataFrame:
    """Keep the configured bands; refuse unknown sensors and dates lacking a configured band."""
    where = df.attrs.get("manifest", "manifest")
    unknown = df[~df.sensor.isin(list(sensors))]
    if not unknown.empty:
        row = unknown.iloc[0]
        raise ManifestError(
            f"{where}:{row.line}: unknown sensor '{row.sensor}'; the config names {', '.join(sensors)}"
        )
    keep = []
    for name, spec in sensors.items():
        wanted = list(spec["bands"]) + ([spec["mask"]["band"]] if spec.get("mask") else [])
        rows = df[df.sensor == name]
        if rows.empty:
            raise ManifestError(f"{where}: no rasters of sensor '{name}' (config key sensors.{name})")
        present = set(rows.semantic_label)
        for band in wanted:
            if band not in present:
                raise ManifestError(f"{where}: sensor {name} has no band '{band}' (config key sensors.{name}.bands)")
        ignored = sorted(present - set(wanted))
        if ignored:
            log.info("%s: ignoring %s bands not in the config: %s", where, name, ", ".join(ignored))
        rows = rows[rows.semantic_label.isin(wanted)]
        by_date = rows.groupby("start_time").semantic_label.agg(set)
        for when, labels in by_date.items():
            lacking = [b for b in wanted if b not in labels]
            if lacking:
                line = rows[rows.start_time == when].line.min()
                raise ManifestError(
                    f"{where}:{line}: {name} acquisition {when.isoformat()} lacks band(s) "
                    f"{', '.join(lacking)} (present on {int((by_date.apply(lambda s, b=lacking[0]: b in s)).sum())} "
                    "other dates)"
                )
        keep.append(rows)
    out = pd.concat(keep).sort_values(["sensor", "start_time", "semantic_label"]).reset_index(drop=True)
    out.attrs.update(df.attrs)
    return out


def _read_ends(ds) -> None:
    """Read the first and the last block of band 1: a file truncated after a valid header fails here,
    at the cost of two blocks (ingest reads only band 1)."""
    from rasterio.windows import Window

    block_h, block_w = ds.block_shapes[0]
    block_h, block_w = max(1, min(block_h, ds.height)), max(1, min(block_w, ds.width))
    last_row, last_col = (ds.height - 1) // block_h, (ds.width - 1) // block_w
    for row, col in {(0, 0), (last_row, last_col)}:
        ds.read(1, window=Window(col * block_w, row * block_h,
                                 min(block_w, ds.width - col * block_w), min(block_h, ds.height - row * block_h)))


def inspect_rasters(df: pd.DataFrame) -> pd.DataFrame:
    """Open every file's header and read its first and last block: missing, unreadable, truncated or
    off-CRS files are errors naming the line."""
    import rasterio
    from rasterio.errors import RasterioIOError
    where = df.attrs.get("manifest", "manifest")
    info = []
    ref_crs, ref_line = None, None
    for line, p in zip(df["line"], df["path"]):
        if not Path(p).is_file():
            raise ManifestError(f"{where}:{line}: file {p} does not exist")
        try:
            with rasterio.open(p) as ds:
                crs, transform = ds.crs, ds.transform
                if ds.count < 1 or crs is None:
                    raise ManifestError(f"{where}:{line}: file {p} has no band or no CRS")
                if transform.b != 0 or transform.d != 0:
                    raise ManifestError(f"{where}:{line}: file {p} is rotated; only north-up rasters are supported")
                info.append(
                    dict(
                        crs_wkt=crs.to_wkt(),
                        epsg=crs.to_epsg(),
                        west=transform.c,
                        north=transform.f,
                        res_x=transform.a,
                        res_y=-transform.e,
                        width=ds.width,
                        height=ds.height,
                        dtype=ds.dtypes[0],
                        file_nodata=ds.nodata,
                    )
                )
                if ref_crs is None:
                    ref_crs, ref_line = crs, line
                elif crs != ref_crs:
                    raise ManifestError(
                        f"{where}:{line}: file {p} is in {crs.to_string()}, but line {ref_line} is in "
                        f"{ref_crs.to_string()}; reproject so all files share one CRS"
                    )
                try:
                    _read_ends(ds)
                except RasterioIOError as err:
                    raise ManifestError(
                        f"{where}:{line}: file {p} has a valid header but its pixels cannot be read "
                        f"(truncated or corrupt: {err.__cause__ or err})"
                    ) from None
        except RasterioIOError as err:
            raise ManifestError(f"{where}:{line}: file {p} is unreadable or corrupt ({err})") from None
    info_df = pd.DataFrame(info)
    # object dtype keeps "no nodata tag" (None) apart from a NaN tag
    info_df["file_nodata"] = pd.Series([i["file_nodata"] for i in info], dtype=object)
    out = pd.concat([df.reset_index(drop=True), info_df], axis=1)
    out.attrs.update(df.attrs)
    return out


def region_from_config(df: pd.DataFrame, sensors: dict, region: dict) -> Grid:
    """The study grid: explicit bounds, or the optical files' union extent at the finest resolution."""
    crs_wkt, file_epsg = df.crs_wkt.iloc[0], df.epsg.iloc[0]
    file_epsg = None if file_epsg is None or (isinstance(file_epsg, float) and math.isnan(file_epsg)) else int(file_epsg)
    want_epsg = region.get("epsg")
    if want_epsg is not None and file_epsg is not None and int(want_epsg) != file_epsg:
        raise ManifestError(
            f"config key region.epsg is {want_epsg} but the files are in EPSG:{file_epsg}; reproject or fix the key"
        )
    if region.get("from", "data") == "explicit":
        from .config import explicit_region_size

        try:
            width, height = explicit_region_size(region)
        except ValueError as err:
            raise ManifestError(str(err)) from None
        b, res = region["bounds"], float(region["resolution"])
        grid = Grid(file_epsg or want_epsg, crs_wkt, b["west"], b["north"], res, res, width, height)
    else:
        optical = [n for n, s in sensors.items() if s["role"] == "optical"]
        opt = df[df.sensor.isin(optical)]
        res_x, res_y = df.res_x.min(), df.res_y.min()
        west, north = opt.west.min(), opt.north.max()
        east = (opt.west + opt.width * opt.res_x).max()
        south = (opt.north - opt.height * opt.res_y).min()
        grid = Grid(file_epsg, crs_wkt, west, north, res_x, res_y, round((east - west) / res_x), round((north - south) / res_y))
    data_w, data_e = df.west.min(), (df.west + df.width * df.res_x).max()
    data_n, data_s = df.north.max(), (df.north - df.height * df.res_y).min()
    if grid.west >= data_e or grid.east <= data_w or grid.south >= data_n or grid.north <= data_s:
        raise ManifestError(
            f"region ({grid.west}, {grid.south}, {grid.east}, {grid.north}) does not overlap the data "
            f"({data_w}, {data_s}, {data_e}, {data_n})"
        )
    return grid


def check_value_range(df: pd.DataFrame, sensors: dict) -> None:
    """Refuse integer files whose DN range times scale plus offset leaves float32 (ingest stores
    physical values as float32; an overflow becomes inf). Float files are not checked: their dtype
    range says nothing about their values. Mask bands are imported unscaled."""
    import numpy as np

    where = df.attrs.get("manifest", "manifest")
    for name, spec in sensors.items():
        mask = (spec.get("mask") or {}).get("band")
        scale, offset = float(spec.get("scale", 1.0)), float(spec.get("offset", 0.0))
        rows = df[(df.sensor == name) & (df.semantic_label != mask)]
        for dtype, group in rows.groupby("dtype", sort=False):
            try:
                info = np.iinfo(np.dtype(dtype))
            except (TypeError, ValueError):
                continue
            reach = max(abs(float(info.min) * scale + offset), abs(float(info.max) * scale + offset))
            if reach > FLOAT32_MAX:
                row = group.iloc[0]
                raise ManifestError(
                    f"{where}:{row.line}: file {row.path} is {dtype}; its range times config key "
                    f"sensors.{name}.scale ({scale!r}) plus sensors.{name}.offset ({offset!r}) reaches "
                    f"{reach:.3g}, beyond float32 ({FLOAT32_MAX:.4g}); fix sensors.{name}.scale/offset"
                )


def check_tile_size(grid: Grid, tile_size: int) -> None:
    """``tiles.size`` must fit the study region (known here only after reading the files' headers)."""
    if tile_size is not None and int(tile_size) > min(grid.width, grid.height):
        raise ManifestError(
            f"config key tiles.size ({tile_size}) is larger than the region from the data "
            f"({grid.width} x {grid.height} cells); use a size <= {min(grid.width, grid.height)}"
        )


def load(path: str | Path, sensors: dict, region: dict | None = None,
         tile_size: int | None = None) -> tuple[pd.DataFrame, Grid]:
    """All manifest checks in order; returns the usable rows (with file headers) and the study grid.

    ``tile_size`` (config key tiles.size), when given, is checked against the region.
    """
    df = check_against_config(read_manifest(path), sensors)
    df = inspect_rasters(df)
    check_value_range(df, sensors)
    grid = region_from_config(df, sensors, region or {})
    check_tile_size(grid, tile_size)
    return df, grid
