"""Rule cube_block: read one spatial block (core + halo) of every imagery group into a block cube."""
import json
from pathlib import Path

from stfuse import logs
from stfuse.steps.cube import cube_block_step

logs.setup(snakemake.log[0])
project = json.loads(Path(snakemake.input.project).read_text())
cube_block_step(project, snakemake.input.groups, snakemake.wildcards.block, Path(snakemake.output.cube).parent,
                blocks_config=snakemake.params.blocks, tile_size=snakemake.params.tile_size)
