"""Stage groups: one imagery group (i.group) per optical acquisition -- its bands, validity, paired SAR
bands, static layers (imported onto the study grid), in the channel order of :func:`stfuse.cube.channel_layout`."""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path

import pandas as pd

from ..cube import channel_layout
from ..grass import map_mapset as _mapset, stage_session
from ..ingest import grid_from_project

log = logging.getLogger("stfuse.steps.groups")


def import_static(gs, static: list[dict], project_state: dict) -> dict[str, str]:
    """Import static layers (e.g. a DEM) from files onto the study grid; returns name -> map id."""
    from ..ingest import build_vrt
    from ..manifest import inspect_rasters

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
