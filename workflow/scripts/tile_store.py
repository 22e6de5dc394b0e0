"""Rule tile_store: one index, clear fractions, channels and statistics over every block's tiles (the tiles
themselves stay in the blocks' files)."""
from pathlib import Path

from stfuse import logs
from stfuse.steps.tiles import tile_store_step

logs.setup(snakemake.log[0])
tile_store_step([Path(p).parent for p in snakemake.input.index], Path(snakemake.output.index).parent,
                **snakemake.params.tiles)
