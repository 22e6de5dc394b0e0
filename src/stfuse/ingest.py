"""Import a checked manifest into GRASS: one STRDS per sensor, plus a validity STRDS for optical sensors.

Process start-up per map, not pixels, dominates ingest (r.in.gdal ~69 ms, t.register ~50 ms per map
measured here), so each band of a sensor is imported by ONE r.in.gdal call on a GDAL VRT that stacks
all its dates, already resampled to the study grid, scaled to physical units and with nodata set; all
maps of a sensor are renamed by one g.rename call and registered by one t.register call.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import tempfile
import time
from pathlib import Path
from xml.sax.saxutils import escape

import pandas as pd

from .manifest import Grid

log = logging.getLogger("stfuse.ingest")


def map_name(sensor: str, band: str, when: pd.Timestamp) -> str:
    return f"{sensor}_{band}_{when.strftime('%Y%m%dT%H%M%S')}"


def valid_strds_name(sensor: str) -> str:
    return f"{sensor}_valid"


def _fmt(x: float) -> str:
    return "nan" if isinstance(x, float) and math.isnan(x) else repr(float(x))


def build_vrt(rows: pd.DataFrame, grid: Grid, *, scale=1.0, offset=0.0, nodata=None,
              resampling="nearest", as_float=True) -> str:
    """A VRT with one band per row (in row order) on `grid`; sources are placed by georeference."""
    out_nodata = "nan" if as_float else "-32768"
    bands = []
    for i, r in enumerate(rows.itertuples(), start=1):
        src_nodata = r.file_nodata if nodata is None else nodata
        # Where the source lands on the study grid, in (fractional) destination pixels.
        dx = float((r.west - grid.west) / grid.res_x)
        dy = float((grid.north - r.north) / grid.res_y)
        dw = float(r.width * r.res_x / grid.res_x)
        dh = float(r.height * r.res_y / grid.res_y)
        nodata_xml = "" if src_nodata is None else f"<NODATA>{_fmt(src_nodata)}</NODATA>"
        scale_xml = f"<ScaleOffset>{float(offset)!r}</ScaleOffset><ScaleRatio>{float(scale)!r}</ScaleRatio>" if as_float else ""
        bands.append(
            f'<VRTRasterBand dataType="{"Float32" if as_float else "Int16"}" band="{i}">'
            f"<NoDataValue>{out_nodata}</NoDataValue>"
            f'<ComplexSource resampling="{resampling}">'
            f'<SourceFilename relativeToVRT="0">{escape(r.path)}</SourceFilename><SourceBand>1</SourceBand>'
            f'<SrcRect xOff="0" yOff="0" xSize="{r.width}" ySize="{r.height}"/>'
            f'<DstRect xOff="{dx!r}" yOff="{dy!r}" xSize="{dw!r}" ySize="{dh!r}"/>'
            f"{nodata_xml}{scale_xml}</ComplexSource></VRTRasterBand>"
        )
    return (
        f'<VRTDataset rasterXSize="{grid.width}" rasterYSize="{grid.height}">'
        f"<SRS>{escape(grid.crs_wkt)}</SRS>"
        f"<GeoTransform>{grid.west!r},{grid.res_x!r},0,{grid.north!r},0,{-grid.res_y!r}</GeoTransform>"
        + "".join(bands)
        + "</VRTDataset>"
    )


def set_region(gs, grid: Grid, *, default: bool = False) -> None:
    gs.run_command(
        "g.region", n=grid.north, s=grid.south, w=grid.west, e=grid.east,
        ewres=grid.res_x, nsres=grid.res_y, flags="s" if default else "", quiet=True,
    )


def grid_dict(grid: Grid) -> dict:
    return dict(epsg=grid.epsg, west=grid.west, east=grid.east, south=grid.south, north=grid.north,
                res_x=grid.res_x, res_y=grid.res_y, cols=grid.width, rows=grid.height)


def _wait(imports, sensor, keep=0) -> None:
    """Wait for the oldest (proc, band) imports until at most ``keep`` run; a failure is reported
    with ITS band, after the other imports still running have ended (nothing runs on behind it)."""
    while len(imports) > keep:
        proc, band = imports.pop(0)
        if proc.wait() != 0:
            for other, _ in imports:
                other.wait()
            imports.clear()
            raise RuntimeError(f"r.in.gdal failed while importing {sensor} band {band} "
                               "(see the messages above)")


def import_sensor(gs, rows: pd.DataFrame, grid: Grid, sensor: str, spec: dict, *, title: str = "",
                  workers: int = 2) -> dict:
    """Import one sensor's rows into the current mapset and register its STRDS.

    Runs inside a grass.session on the pipeline's own mapset. Returns the JSON-able state manifest.
    """
    import grass.temporal as tgis

    mapset = gs.gisenv()["MAPSET"]
    set_region(gs, grid)
    t0 = time.perf_counter()
    mask_band = (spec.get("mask") or {}).get("band")
    bands = list(spec["bands"]) + ([mask_band] if mask_band else [])
    renames, register_lines, imports = [], [], []
    names = {}
    tgis.init()
    with tempfile.TemporaryDirectory(prefix="stfuse_ingest_") as tmp:
        for k, band in enumerate(bands, start=1):
            brows = rows[rows.semantic_label == band].sort_values("start_time")
            log.info("%s: importing band %s (%d/%d), %d dates, %.0f s so far", sensor, band, k, len(bands),
                     len(brows), time.perf_counter() - t0)
            is_mask = band == mask_band
            vrt = Path(tmp) / f"{band}.vrt"
            vrt.write_text(build_vrt(
                brows, grid, scale=1.0 if is_mask else spec.get("scale", 1.0),
                offset=0.0 if is_mask else spec.get("offset", 0.0), nodata=spec.get("nodata"),
                resampling="nearest" if is_mask else spec.get("resampling", "nearest"), as_float=not is_mask,
            ))
            stack = f"stfuse_stack_{band}"
            imports.append((gs.start_command("r.in.gdal", input=str(vrt), output=stack, flags="o", quiet=True),
                            band))
            _wait(imports, sensor, keep=workers - 1)  # bands import side by side; each writes only its own maps
            n = len(brows)
            for i, when in enumerate(brows.start_time, start=1):
                new = map_name(sensor, band, when)
                renames += [f"{stack}.{i}" if n > 1 else stack, new]
                names[(when, band)] = new
                register_lines.append(f"{new}|{when.strftime('%Y-%m-%d %H:%M:%S')}|{band}")
        _wait(imports, sensor)
        log.info("%s: imported %d maps in %.1f s", sensor, len(register_lines), time.perf_counter() - t0)
        gs.run_command("g.rename", raster=",".join(renames), quiet=True)

        strds = register_strds(gs, tgis, sensor, register_lines, tmp,
                          title or f"{sensor} ({spec['role']})", f"stfuse ingest of {sensor}, bands {', '.join(bands)}")
        dates = sorted(rows.start_time.unique())
        valid_strds = None
        if spec["role"] == "optical":  # with or without a mask band: every optical sensor gets its validity
            valid_strds = derive_validity_strds(gs, tgis, sensor, spec, dates, names, tmp)
    log.info("%s: %d maps, %d dates registered in %.1f s", sensor, len(register_lines), len(dates),
             time.perf_counter() - t0)
    granules = []
    for when in dates:
        g = {"start_time": iso_utc(when), "maps": {b: f"{names[(when, b)]}@{mapset}" for b in spec["bands"]}}
        if mask_band:
            g["mask_band"] = f"{names[(when, mask_band)]}@{mapset}"
        if valid_strds:
            g["valid"] = f"{map_name(sensor, 'valid', when)}@{mapset}"
        granules.append(g)
    return dict(sensor=sensor, role=spec["role"], mapset=mapset, strds=strds, valid_strds=valid_strds,
                bands=list(spec["bands"]), mask_band=mask_band, region=grid_dict(grid), granules=granules)


def iso_utc(when: pd.Timestamp) -> str:
    """A tz-aware time as manifests write it: ISO 8601 in UTC, to the second, with ``Z``."""
    return when.tz_convert("UTC").strftime("%Y-%m-%dT%H:%M:%SZ")


@contextlib.contextmanager
def _tgis_version_cached():
    """Answer TGIS's database-version question once instead of once per map object.

    GRASS 8.2 opens a new database connection (and asks its C-library helper process for the temporal
    mapsets) for every map object it builds just to read that version: ~45 % of registration time. The
    version cannot change during one registration.
    """
    try:
        import grass.temporal.metadata as md
    except ImportError:
        yield
        return
    original = getattr(md, "get_tgis_db_version_from_metadata", None)
    if original is None:
        yield
        return
    version = original()
    md.get_tgis_db_version_from_metadata = lambda metadata=None: version
    try:
        yield
    finally:
        md.get_tgis_db_version_from_metadata = original


def register_strds(gs, tgis, name, lines, tmp, title, description) -> str:
    """Create the absolute-time STRDS ``name`` in the current mapset and register maps of that mapset in it, in
    process (no t.create / t.register start-up). ``lines``: ``map|start time|semantic label`` (t.register's
    file format; map names without @mapset); ``tmp``: a folder for the registration file. Refuses a STRDS that
    already exists (RuntimeError). Returns its id ``name@mapset``."""
    mapset = gs.gisenv()["MAPSET"]
    reg = Path(tmp) / f"{name}.txt"
    # Fully qualified names: t.register otherwise runs one g.findfile process per map (~48 ms each).
    reg.write_text("".join(f"{line.replace('|', f'@{mapset}|', 1)}\n" for line in lines))
    # In-process TGIS: t.create and t.register would each pay ~1.3 s of Python and TGIS start-up.
    strds_id = f"{name}@{mapset}"
    dbif = tgis.SQLDatabaseInterfaceConnection()
    dbif.connect()
    try:
        ds = tgis.dataset_factory("strds", strds_id)
        if ds.is_in_db(dbif):
            raise RuntimeError(f"STRDS {strds_id} already exists in a mapset that should be new")
        # TGIS pastes these into SQL between single quotes without escaping them (GRASS 8.2): double them
        ds.set_initial_values(temporal_type="absolute", semantic_type="mean", title=title.replace("'", "''"),
                              description=description.replace("'", "''"))
        ds.insert(dbif)
        with _tgis_version_cached():
            tgis.register_maps_in_space_time_dataset("raster", strds_id, file=str(reg), dbif=dbif)
    finally:
        dbif.close()
    return strds_id


def derive_validity_strds(gs, tgis, sensor, spec, dates, names, tmp) -> str:
    """The validity STRDS `<sensor>_valid`, one map per date, made in the current mapset from the sensor's
    imported maps (``names``: {(date, band): map id}; ``spec``: the sensor's config section; ``tmp``: a
    folder for the r.mapcalc and registration files); returns its id.

    With a mask band: 1 where the class is clear and every band has data, 0 elsewhere, null where the mask
    has no class (no data). Without one (``mask: null`` or absent; nodata is the product's only mask): 1
    where every band has data, 0 where only some bands have data, null where no band has data, so that
    cells the sensor never observes (outside its footprint) are null on every date, as with a mask band.
    """
    mask = spec.get("mask") or None
    classes = mask.get("valid_classes", [4, 5, 6, 7, 11]) if mask else None
    exprs, lines = [], []
    for when in dates:
        # Quoted: map ids from a user's project may hold dots and @mapset.
        bands_ok = " && ".join(f'!isnull("{names[(when, b)]}")' for b in spec["bands"])
        out = map_name(sensor, "valid", when)
        if mask:
            cls = f'"{names[(when, mask["band"])]}"'
            clear = " || ".join(f"{cls} == {c}" for c in classes)
            exprs.append(f"{out} = if(isnull({cls}), null(), if(({clear}) && {bands_ok}, 1, 0))")
        else:
            none_ok = " && ".join(f'isnull("{names[(when, b)]}")' for b in spec["bands"])
            exprs.append(f"{out} = if({none_ok}, null(), if({bands_ok}, 1, 0))")
        lines.append(f"{out}|{when.strftime('%Y-%m-%d %H:%M:%S')}|valid")
    expr_file = Path(tmp) / f"{sensor}_valid.mapcalc"
    expr_file.write_text("\n".join(exprs) + "\n")
    # One r.mapcalc process evaluates every date's expression in a single pass.
    gs.run_command("r.mapcalc", file=str(expr_file), quiet=True)
    what = (f"1 = clear ({mask['band']} in {classes}) with data in every band, 0 = not clear" if mask else
            "1 = data in every band (no mask band: nodata is the only mask), 0 = in some bands only, null = none")
    return register_strds(gs, tgis, valid_strds_name(sensor), lines, tmp, f"{sensor} validity", what)


def write_state(state: dict, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(state, indent=1) + "\n")


# --- Steps of the workflow (one function per rule; rule scripts only pass paths and config) ---

from .grass import PROJECT_MARKER  # noqa: E402  (re-exported: ingest.PROJECT_MARKER)


def prepare_project(manifest_path, sensors: dict, region: dict, project_dir, checked_csv, tile_size=None, *,
                    study: str | None = None, replace_foreign: bool = False) -> dict:
    """Check the whole manifest, then (re)create the pipeline's GRASS project with the study region.

    Nothing is written before every check has passed; the project folder is only ever touched when it
    carries stfuse's marker, and on a rerun only what stfuse made is deleted, after every check
    (stfuse.grass.rebuild_project: no mapset in use, each of stfuse's mapsets of this study and holding
    only what stfuse wrote there). A user's mapset added to the project is kept, and PERMANENT with it.
    """
    import json

    from . import grass
    from .manifest import load

    df, grid = load(manifest_path, sensors, region, tile_size=tile_size)
    project_dir = Path(project_dir)
    if project_dir.exists():
        if not (project_dir / PROJECT_MARKER).exists():
            raise grass.GrassError(f"{project_dir} exists and was not made by stfuse; refusing to replace it")
    crs = dict(epsg=grid.epsg) if grid.epsg is not None else dict(georef=df.path.iloc[0])
    kept = project_dir.exists() and grass.rebuild_project(project_dir, study=study, replace_foreign=replace_foreign,
                                                          **crs)
    if not kept:
        grass.create_project(project_dir, crs.get("epsg"), georef=crs.get("georef"))
    (project_dir / PROJECT_MARKER).write_text(json.dumps(dict(made_by="stfuse", study=study)) + "\n")
    with grass.session(project_dir) as gs:
        set_region(gs, grid, default=True)
    out = df.assign(start_time=[iso_utc(t) for t in df.start_time],
                    file_nodata=["none" if v is None else repr(float(v)) for v in df.file_nodata])
    Path(checked_csv).parent.mkdir(parents=True, exist_ok=True)
    out.to_csv(checked_csv, index=False)
    counts = df.groupby("sensor").start_time.nunique().to_dict()
    log.info("manifest %s: %d rasters, dates per sensor %s, region %s", manifest_path, len(df), counts, grid_dict(grid))
    return dict(project=str(project_dir.resolve()), source="manifest", manifest=str(Path(manifest_path).resolve()),
                crs_wkt=grid.crs_wkt, region=grid_dict(grid), rasters=len(df), dates=counts, study=study,
                replace_foreign_maps=bool(replace_foreign))


def read_checked(checked_csv) -> pd.DataFrame:
    df = pd.read_csv(checked_csv, converters={"file_nodata": lambda v: None if v == "none" else float(v)})
    df["start_time"] = pd.to_datetime(df.start_time, utc=True)
    return df


def grid_from_project(state: dict) -> Grid:
    r = state["region"]
    return Grid(r["epsg"], state["crs_wkt"], r["west"], r["north"], r["res_x"], r["res_y"], r["cols"], r["rows"])


def ingest_sensor(project_state: dict, checked_csv, sensor: str, spec: dict) -> dict:
    """Import one sensor into its own mapset `ingest_<sensor>` (replaced on rerun)."""
    from . import grass

    project = project_state["project"]
    mapset = f"ingest_{sensor}"
    df = read_checked(checked_csv)
    with grass.own_session(project, mapset, study=project_state.get("study"), stage="ingest",
                           replace_foreign=project_state.get("replace_foreign_maps", False)) as gs:
        state = import_sensor(gs, df[df.sensor == sensor], grid_from_project(project_state), sensor, spec)
    state["project"] = project
    return state
