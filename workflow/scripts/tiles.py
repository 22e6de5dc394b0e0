"""Rule export_tiles: (T, C, H, W) tiles, spatially blocked split, statistics on the training split."""
from pathlib import Path

import numpy as np

from stfuse import bridge, logs

logs.setup(snakemake.log[0])
hidden = np.load(snakemake.input.hidden[0]) if snakemake.input.hidden else None
bridge.tiles_step(Path(snakemake.input.cube).parent, Path(snakemake.output.tiles).parent, hidden=hidden,
                  **snakemake.params.tiles)
