"""Stage register: the filled series of every block, stitched into whole-region maps, registered as STRDS.

Each map is written from the blocks' core files one band of one date at a time (:class:`stfuse.cube.Mosaic`),
so memory holds one map of the region, never the series.
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import blocks, register
from ..cube import Mosaic


def _load(path) -> dict:
    return json.loads(Path(path).read_text())


def block_of_file(path) -> str:
    """The block id of a per-block file ``.../blocks/<id>/<stage>/<file>``."""
    return blocks.id_in_path(path)


def mosaic(paths, plan: list[blocks.Block]) -> Mosaic:
    return Mosaic({block_of_file(p): p for p in paths}, plan)


def register_step(project_json, optical_json, sar_json, cube_jsons, filled_paths, flags_paths, model_path,
                  config: dict, command: str | None = None, std_paths=None) -> dict:
    """Register the main variant's filled series (per-block ``filled.npy``/``flags.npy``) back into GRASS, with
    the command and the whole config in its maps' history and STRDS description. ``std_paths``: the blocks'
    ``std.npy`` (a model with an uncertainty head), registered as ``<optical>_filled_std``."""
    metas = [_load(p) for p in cube_jsons]
    plan = [blocks.from_dict(m["block"]) for m in metas]
    return register.register_filled(
        _load(project_json), _load(optical_json), _load(sar_json), metas[0]["dates"],
        mosaic(filled_paths, plan), mosaic(flags_paths, plan),
        std=mosaic(std_paths, plan) if std_paths else None,
        checkpoint_sha=register.file_sha256(model_path), config_sha=register.config_sha256(config),
        provenance=register.provenance_text(config, command))
