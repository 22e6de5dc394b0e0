"""Rule holdout: evaluation dates and the cells hidden on them (real cloud masks of other dates)."""
from pathlib import Path

import numpy as np

from stfuse import benchmark, bridge, logs

logs.setup(snakemake.log[0])
p = snakemake.params.benchmark
cube, meta = bridge.load_cube(Path(snakemake.input.cube).parent)
hidden, _ = benchmark.choose_holdout(cube, meta, min_clear=p["min_clear"], seed=p["seed"],
                                     min_fraction=p["min_mask_fraction"], max_fraction=p["max_mask_fraction"],
                                     max_dates=p["max_dates"])
np.save(snakemake.output.hidden, hidden)
