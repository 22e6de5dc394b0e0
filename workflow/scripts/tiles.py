"""Rule tiles: (T, C, H, W) tiles over the region, spatially blocked split, statistics on train."""
import json
from pathlib import Path

from stfuse import bridge, logs

logs.setup(snakemake.log[0])
project = json.loads(Path(snakemake.input.project).read_text())
bridge.tiles_step(project, snakemake.input.groups, Path(snakemake.output.tiles).parent, **snakemake.params.tiles)
