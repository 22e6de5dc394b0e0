"""Rule predict: blended tiled inference over the whole region for every optical date.

torch's thread count is the config's infer.threads, not snakemake.threads: --cores scales the latter down,
and results are bit-identical only for the same thread count (see stfuse.train).
"""
from pathlib import Path

import numpy as np

from stfuse import bridge, infer, logs

logs.setup(snakemake.log[0])
hidden = np.load(snakemake.input.hidden[0]) if snakemake.input.hidden else None
cube, meta = bridge.load_cube(Path(snakemake.input.cube).parent, hidden)
params = snakemake.params.infer
result = infer.predict_cube(snakemake.input.model, cube, meta["channels"], meta["dates"],
                            overlap=params["overlap"], batch_size=params["batch_size"], device=params["device"],
                            threads=params["threads"])
np.save(snakemake.output.filled, result["filled"])
np.save(snakemake.output.prediction, result["prediction"])
np.save(snakemake.output.flags, result["filled_flag"])
