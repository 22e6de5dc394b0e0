"""Stage groups: one imagery group (i.group) per optical acquisition -- its bands, validity, paired SAR
bands, static layers (imported onto the study grid), in the channel order of :func:`stfuse.cube.channel_layout`
-- and, for config key ``infer.dates`` other than ``observed``, one *query group* per requested time without an
optical acquisition on its UTC day (:mod:`stfuse.anydate`): no optical or validity maps (never clear), the SAR
granule nearest in time within ``pairing.max_gap_days``, the static layers. A query group gets no i.group:
there is no acquisition to group, and GRASS imagery modules expect its optical bands."""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path

import pandas as pd

from .. import anydate, temporal
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
                static: list[dict] | None = None, dates="observed", pairing: dict | None = None) -> dict:
    """One imagery group per optical acquisition: its bands, validity, paired SAR bands, static layers; and
    a query group per requested time (``dates``: the value of config key infer.dates) without an optical
    acquisition on its UTC day, its SAR paired as ``pairing`` (config section pairing: max_gap_days, mode, k)
    pairs the optical dates. Every group has ``query`` and ``outputs`` (the start times it answers); groups are
    in time order."""
    static = static or []
    pairing = pairing or {}
    t0 = time.perf_counter()
    pairing_dir = Path(pairing_dir)
    opt = pd.read_csv(pairing_dir / "optical.csv")
    sar_table = pd.read_csv(pairing_dir / "sar.csv")
    sar = sar_table.set_index("id")
    pairs = pd.read_csv(pairing_dir / "pairs.csv")
    pairs = pairs[pairs["rank"] == 1].set_index("optical_id")
    setting = anydate.parse_setting(dates)
    plan = anydate.plan_dates(opt.start_time, anydate.requested_times(setting, opt.start_time))
    queries = plan[plan["query"]]
    if len(queries) and "max_gap_days" not in pairing:
        raise ValueError(f"{anydate.KEY} asks for {len(queries)} date(s) without an optical acquisition: their "
                         "SAR pairing needs config section pairing (max_gap_days)")
    query_sar = anydate.pair_queries(queries.start_time, sar_table, float(pairing.get("max_gap_days", 0)),
                                     mode=pairing.get("mode", "nearest"), k=int(pairing.get("k", 1)),
                                     coverage="data_fraction" if "data_fraction" in sar_table else None)
    query_sar.index = queries.index
    channels = channel_layout(optical_state, sar_state, static)
    reads = [_mapset(optical_state["strds"]), _mapset(optical_state["valid_strds"]), _mapset(sar_state["strds"])]
    groups = []
    with stage_session(project_state, "groups", reads) as gs:
        mapset = gs.gisenv()["MAPSET"]
        static_maps = import_static(gs, static, project_state)
        for p in plan.itertuples():
            outputs = [temporal.iso(o) for o in p.outputs]
            if p.query:  # no optical acquisition: optical and validity absent (NaN in the cube: never clear)
                sar_id, gap = query_sar.loc[p.Index, "sar_id"], query_sar.loc[p.Index, "gap_days"]
                maps = [None] * (len(optical_state["bands"]) + 1)
                maps += [sar.loc[sar_id, b] if sar_id is not None else None for b in sar_state["bands"]]
                maps += [static_maps[s["name"]] for s in static]
                groups.append(dict(group=None, optical_id=None, start_time=temporal.iso(p.start_time),
                                   clear_fraction=0.0, sar_id=sar_id,
                                   sar_gap_days=None if gap is None else float(gap), maps=maps, query=True,
                                   outputs=outputs))
                continue
            r = opt.iloc[p.optical]
            row = r.to_dict()
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
                               sar_gap_days=float(pairs.loc[r.id, "gap_days"]) if paired else None, maps=maps,
                               query=False, outputs=outputs))
    state = dict(project=project_state["project"], mapset=mapset, channels=channels, groups=groups,
                 region=project_state["region"])
    Path(out_json).write_text(json.dumps(state, indent=1) + "\n")
    n_query = int(plan["query"].sum())
    log.info("%d imagery groups in %s (%d channels: %s) in %.1f s", len(groups) - n_query, mapset, len(channels),
             ", ".join(c["name"] for c in channels), time.perf_counter() - t0)
    if setting != anydate.OBSERVED:
        n_out = sum(len(g["outputs"]) for g in groups)
        log.info("%s: %d requested date(s): %d on an optical acquisition's day, %d query date(s) (%d with SAR "
                 "within %s d)", anydate.KEY, n_out, n_out - n_query, n_query,
                 int(query_sar["sar_id"].notna().sum()), pairing.get("max_gap_days"))
    return state
