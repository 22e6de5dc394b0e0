"""Rule predict_block: blended tiled inference over one block (the whole region's window grid, cut) for
every optical date; core-sized outputs (std.npy too when config train.uncertainty is not none).

torch's thread count is the config's infer.threads, not snakemake.threads: --cores scales the latter down,
and results are bit-identical only for the same thread count (see stfuse.train).
"""
from pathlib import Path

from stfuse import logs
from stfuse.steps.predict import predict_block_step

logs.setup(snakemake.log[0])
params = snakemake.params.infer
predict_block_step(snakemake.input.model, Path(snakemake.input.cube).parent, Path(snakemake.output.filled).parent,
                   holdout_json=snakemake.input.holdout[0] if snakemake.input.holdout else None,
                   overlap=params["overlap"], batch_size=params["batch_size"], device=params["device"],
                   threads=params["threads"], std=snakemake.params.std)
