"""Rule tiles_block: the training tiles a block owns (the whole region's tile grid and split, cut), their
clear fractions and the moments of the block's training cells."""
from pathlib import Path

from stfuse import logs
from stfuse.steps.tiles import tiles_block_step

logs.setup(snakemake.log[0])
tiles_block_step(Path(snakemake.input.cube).parent, Path(snakemake.output.tiles).parent,
                 holdout_json=snakemake.input.holdout[0] if snakemake.input.holdout else None,
                 **snakemake.params.tiles)
