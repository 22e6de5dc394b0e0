"""Rule predict: blended tiled inference over the whole region for every optical date.

torch's thread count is the config's infer.threads, not snakemake.threads: --cores scales the latter down,
and results are bit-identical only for the same thread count (see stfuse.train).

The cube is memory-mapped copy-on-write (hidden cells copy only the pages they change) and the results are
written straight into their .npy files (open_memmap: the same bytes as np.save), one date at a time.
"""
from pathlib import Path

import numpy as np

from stfuse import bridge, infer, logs

logs.setup(snakemake.log[0])
hidden = np.load(snakemake.input.hidden[0]) if snakemake.input.hidden else None
cube, meta = bridge.load_cube(Path(snakemake.input.cube).parent, hidden, mmap_mode="c")
params = snakemake.params.infer
n_dates, _, height, width = cube.shape
n_bands = sum(ch["kind"] == "optical" for ch in meta["channels"])
out = {
    "filled": np.lib.format.open_memmap(snakemake.output.filled, mode="w+", dtype=np.float32,
                                        shape=(n_dates, n_bands, height, width)),
    "prediction": np.lib.format.open_memmap(snakemake.output.prediction, mode="w+", dtype=np.float32,
                                            shape=(n_dates, n_bands, height, width)),
    "filled_flag": np.lib.format.open_memmap(snakemake.output.flags, mode="w+", dtype=np.uint8,
                                             shape=(n_dates, height, width)),
}
result = infer.predict_cube(snakemake.input.model, cube, meta["channels"], meta["dates"],
                            overlap=params["overlap"], batch_size=params["batch_size"], device=params["device"],
                            threads=params["threads"], out=out)
for arr in out.values():
    arr.flush()
