"""Write the gap-filled series back into GRASS as an STRDS that t.rast.* modules use like any other.

Per optical date and band, a map `<sensor>_filled_<band>_<stamp>` (observed value where the pixel was
clear, the model's prediction elsewhere) and per date a flag map `<sensor>_filledflag_<stamp>` (1 where
the value was filled), written with the fast writer into the pipeline's own mapset, registered as
STRDS `<sensor>_filled` (band names as semantic labels, the optical start times) and
`<sensor>_filled_flag`. With a model that has an uncertainty head, also per date and band a map
`<sensor>_filled_std_<band>_<stamp>` (the predictive standard deviation in the band's units, 0 where the
value was observed), registered as STRDS `<sensor>_filled_std` (band names as semantic labels, the same
start times). With config infer.dates other than observed, the maps are those of the requested times
(each date's ``outputs`` in cube.json, :mod:`stfuse.anydate`): one map set per time, at that start time.
Lineage (checkpoint and config hashes, input STRDS) goes into the STRDS descriptions and every map's history.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from . import grassio
from .anydate import output_times
from .grass import stage_session
from .ingest import register_strds
from .logs import Progress

log = logging.getLogger("stfuse.register")


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def config_sha256(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def provenance_text(config: dict, command: str | None = None) -> str:
    """What made a filled series, for its maps' history and its STRDS description: the command, the stfuse
    version and the whole config as YAML (with the schema's defaults filled in, as the run used it)."""
    import yaml

    from . import __version__

    head = [f"stfuse {__version__}"] + ([f"command: {command}"] if command else [])
    return "\n".join(head + ["config:", yaml.safe_dump(config, sort_keys=False, default_flow_style=False).rstrip()])


def register_filled(project_state: dict, optical_state: dict, sar_state: dict, dates: list[dict],
                    filled, flags, *, checkpoint_sha: str, config_sha: str, provenance: str | None = None,
                    std=None) -> dict:
    """Write and register the filled series; returns the JSON-able state (STRDS ids, maps, lineage).

    ``provenance`` (:func:`provenance_text`): appended to every map's history and to the STRDS' description.

    ``filled`` (T, B, H, W) and ``flags`` (T, H, W): arrays, or anything with ``shape`` that gives a
    map's array for ``[t, b]`` / ``[t]`` (e.g. :class:`stfuse.cube.Mosaic` over the blocks' files).

    ``std`` (T, B, H, W), the same kinds: the predictive standard deviation (:mod:`stfuse.infer`), written
    and registered as ``<sensor>_filled_std``; the state then has ``std_strds``."""
    t0 = time.perf_counter()
    sensor, bands = optical_state["sensor"], optical_state["bands"]
    n_dates = len(dates)
    if filled.shape[:2] != (n_dates, len(bands)) or flags.shape[0] != n_dates:
        raise ValueError(
            f"filled {filled.shape} / flags {flags.shape} do not match {n_dates} dates x {len(bands)} bands"
        )
    if std is not None and tuple(std.shape) != tuple(filled.shape):
        raise ValueError(f"std {tuple(std.shape)} does not match filled {tuple(filled.shape)}")
    lineage = (f"stfuse gap-filling; checkpoint sha256 {checkpoint_sha[:16]}; config sha256 {config_sha[:16]}; "
               f"inputs {optical_state['strds']}, {optical_state['valid_strds']}, {sar_state['strds']}")
    history = lineage if provenance is None else f"{lineage}\n{provenance}"
    # one map set per output time (config infer.dates): a date answers 0, 1 or more times; without any
    # ``outputs`` key (observed mode, an older cube.json) every date answers its own start_time
    entries = output_times(dates)
    reads = []
    with stage_session(project_state, "register", reads) as gs:
        import grass.temporal as tgis

        tgis.init()
        mapset = gs.gisenv()["MAPSET"]
        band_lines, flag_lines, std_lines, granules = [], [], [], []
        progress = Progress(log, f"writing {sensor} filled maps", len(entries), "dates")
        for t, out_time in entries:
            d = dict(dates[t], start_time=out_time)
            when = pd.Timestamp(d["start_time"])
            stamp, start = when.strftime("%Y%m%dT%H%M%S"), when.strftime("%Y-%m-%d %H:%M:%S")
            maps = {}
            for b, band in enumerate(bands):
                name = f"{sensor}_filled_{band}_{stamp}"
                grassio.write_map(filled[t, b], name, title=f"{sensor} {band} {d['start_time']} gap-filled",
                                  history=history)
                band_lines.append(f"{name}|{start}|{band}")
                maps[band] = f"{name}@{mapset}"
            std_maps = {}
            for b, band in enumerate(bands if std is not None else ()):
                name = f"{sensor}_filled_std_{band}_{stamp}"
                grassio.write_map(std[t, b], name, history=history,
                                  title=f"{sensor} {band} {d['start_time']} predictive std of the filled value")
                std_lines.append(f"{name}|{start}|{band}")
                std_maps[band] = f"{name}@{mapset}"
            flag = f"{sensor}_filledflag_{stamp}"
            flag_t = np.asarray(flags[t])  # one read (a Mosaic of blocks stitches it anew on each read)
            grassio.write_map(flag_t.astype(np.float32), flag, title=f"1 = filled by stfuse, {d['start_time']}",
                              history=history)
            flag_lines.append(f"{flag}|{start}|filled")
            granules.append(dict(start_time=d["start_time"], maps=maps, flag=f"{flag}@{mapset}",
                                 filled_fraction=float(flag_t.mean()), **({"std": std_maps} if std_maps else {})))
            progress.step()
        with tempfile.TemporaryDirectory(prefix="stfuse_register_") as tmp:
            strds = register_strds(gs, tgis, f"{sensor}_filled", band_lines, tmp, f"{sensor} gap-filled", history)
            flag_strds = register_strds(gs, tgis, f"{sensor}_filled_flag", flag_lines, tmp,
                                        f"{sensor} filled-pixel flags", "1 where stfuse filled the value. " + history)
            std_strds = None if std is None else register_strds(
                gs, tgis, f"{sensor}_filled_std", std_lines, tmp, f"{sensor} predictive std of the filled values",
                "Predictive standard deviation of each filled value (0 where observed). " + history)
    log.info("registered %s and %s: %d dates x %d bands in %.1f s", strds, flag_strds, len(entries), len(bands),
             time.perf_counter() - t0)
    return dict(strds=strds, flag_strds=flag_strds, **({"std_strds": std_strds} if std is not None else {}),
                mapset=mapset, bands=bands, lineage=lineage,
                checkpoint_sha256=checkpoint_sha, config_sha256=config_sha, granules=granules)
