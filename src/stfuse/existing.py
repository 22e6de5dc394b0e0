"""Use STRDS of an existing GRASS project as input, without writing into any of the user's mapsets.

The pipeline creates mapsets of its own inside the user's project (marked, replaced on rerun), puts the
user's mapsets on their search path, and reads the STRDS through TGIS. Validity maps derived from the
optical mask band are written into the pipeline's mapset only. The mapsets are named after the study
(`stfuse_<study>`, `stfuse_<study>_<sensor>`, `stfuse_<study>_<stage>` by default), and each records the
study that made it: two studies in one project never replace each other's results.

The STRDS values are read as they are: the config's per-sensor scale, offset and nodata (which the
manifest import applies) are refused for this input (`check_config`, when the DAG is built).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import pandas as pd

from . import grass
from .config import check_date_count
from .ingest import derive_validity_strds, grid_dict, iso_utc, map_name
from .manifest import Grid
from .temporal import DatasetError, granules

log = logging.getLogger("stfuse.existing")


# One error type for everything wrong with the user's project or STRDS.
InputError = DatasetError


def _mapset_of(strds_id: str) -> str:
    if "@" not in strds_id:
        raise InputError(f"config key input.grass_project.strds: '{strds_id}' must be name@mapset")
    return strds_id.split("@", 1)[1]


def check_strds(tgis, strds_id: str, sensor: str, spec: dict) -> pd.DataFrame:
    """Granules (start_time + one map id column per band and mask band) of a user's STRDS."""
    wanted = list(spec["bands"]) + ([spec["mask"]["band"]] if spec.get("mask") else [])
    try:
        return granules(tgis, strds_id, wanted)
    except DatasetError as err:
        raise InputError(f"{err} (sensor {sensor})") from None


def default_mapset(study: str) -> str:
    """The pipeline's mapset (and prefix of its other mapsets) in a user's project when the config names none."""
    return f"stfuse_{study}"


def check_config(config: dict) -> None:
    """DAG-time checks of `input: grass_project`: the STRDS are read as they are, so scale, offset and
    nodata other than 1, 0 and null are refused, naming the key (ValueError)."""
    if "grass_project" not in config.get("input", {}):
        return
    neutral = {"scale": 1.0, "offset": 0.0, "nodata": None}
    for sensor, spec in config.get("sensors", {}).items():
        for key, value in neutral.items():
            got = spec.get(key, value)
            if got != value:
                raise ValueError(
                    f"config key sensors.{sensor}.{key}: {got!r} would be ignored: input.grass_project reads the "
                    "STRDS values as they are; scale them first with t.rast.algebra (or r.mapcalc) or leave "
                    "scale 1 / offset 0 / nodata null"
                )


def prepare_project(project_dir, mapset: str, strds: dict, sensors: dict, region: dict, *,
                    study: str | None = None, replace_foreign: bool = False, neighbours: int | None = None) -> dict:
    """Check the user's STRDS and record the study region; creates only the pipeline's own mapset.

    With `neighbours` (config pairing.neighbours), an optical STRDS with too few granules is refused.
    """
    project_dir = Path(project_dir).resolve()
    if not (project_dir / "PERMANENT" / "DEFAULT_WIND").is_file():
        raise InputError(f"config key input.grass_project.path: {project_dir} is not a GRASS project")
    for sensor in sensors:
        if sensor not in strds:
            raise InputError(f"config key input.grass_project.strds lacks sensor '{sensor}'")
    with grass.own_session(project_dir, mapset, study=study, stage="ingest", replace_foreign=replace_foreign) as gs:
        import grass.temporal as tgis

        _search(gs, strds.values())
        tgis.init()
        first = {}
        for sensor, spec in sensors.items():
            df = check_strds(tgis, strds[sensor], sensor, spec)
            if spec["role"] == "optical" and neighbours is not None:
                try:
                    check_date_count(len(df), neighbours, f"STRDS {strds[sensor]} (sensor {sensor})")
                except ValueError as err:
                    raise InputError(str(err)) from None
            first[sensor] = df[spec["bands"][0]].iloc[0]
        optical = next(s for s, spec in sensors.items() if spec["role"] == "optical")
        if region.get("from", "data") == "explicit":
            b = region["bounds"]
            gs.run_command("g.region", n=b["north"], s=b["south"], e=b["east"], w=b["west"], res=region["resolution"])
        else:
            gs.run_command("g.region", raster=first[optical])
        reg = gs.region()
        epsg = gs.parse_command("g.proj", flags="g").get("srid", "")
        wkt = gs.read_command("g.proj", flags="w").strip()
    grid = Grid(int(epsg.split(":")[-1]) if epsg.upper().startswith("EPSG:") else None, wkt,
                reg["w"], reg["n"], reg["ewres"], reg["nsres"], reg["cols"], reg["rows"])
    return dict(project=str(project_dir), source="grass_project", mapset=mapset, strds=strds,
                crs_wkt=wkt, region=grid_dict(grid), study=study, replace_foreign_maps=bool(replace_foreign))


def _search(gs, strds_ids) -> None:
    mapsets = sorted({_mapset_of(s) for s in strds_ids})
    gs.run_command("g.mapsets", mapset=",".join(mapsets), operation="add", quiet=True)


def ingest_sensor(project_state: dict, sensor: str, spec: dict) -> dict:
    """JSON state of one user STRDS; for optical sensors, validity maps in the pipeline's own mapset."""
    from .ingest import set_region, grid_from_project

    project = project_state["project"]
    mapset = f"{project_state['mapset']}_{sensor}"
    strds_id = project_state["strds"][sensor]
    with grass.own_session(project, mapset, study=project_state.get("study"), stage="ingest",
                           replace_foreign=project_state.get("replace_foreign_maps", False)) as gs:
        import grass.temporal as tgis

        _search(gs, [strds_id])
        tgis.init()
        grid = grid_from_project(project_state)
        set_region(gs, grid)
        df = check_strds(tgis, strds_id, sensor, spec)
        names = {(r["start_time"], b): r[b] for _, r in df.iterrows() for b in df.columns if b not in ("id", "start_time")}
        dates = list(df.start_time)
        valid_strds = None
        mask_band = (spec.get("mask") or {}).get("band")
        if spec["role"] == "optical":  # with or without a mask band
            with tempfile.TemporaryDirectory(prefix="stfuse_valid_") as tmp:
                valid_strds = derive_validity_strds(gs, tgis, sensor, spec, dates, names, tmp)
    granules = []
    for when in dates:
        g = {"start_time": iso_utc(when), "maps": {b: names[(when, b)] for b in spec["bands"]}}
        if mask_band:
            g["mask_band"] = names[(when, mask_band)]
        if valid_strds:
            g["valid"] = f"{map_name(sensor, 'valid', when)}@{mapset}"  # as derive_validity_strds names it
        granules.append(g)
    log.info("%s: %d granules of %s, validity in %s", sensor, len(dates), strds_id, valid_strds)
    return dict(sensor=sensor, role=spec["role"], mapset=mapset, strds=strds_id, valid_strds=valid_strds,
                bands=list(spec["bands"]), mask_band=mask_band, region=grid_dict(grid), granules=granules,
                project=project)
