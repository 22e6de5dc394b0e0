"""Rule train_model: self-supervised training on exported tiles; resumes from last.pt after a kill.

torch's thread count is the config's train.threads (in params.train), not snakemake.threads: --cores scales
the latter down, and results are bit-identical only for the same thread count (see stfuse.train).
"""
from pathlib import Path

from stfuse import logs, train

logs.setup(snakemake.log[0])
params = dict(snakemake.params.train)
train.train(Path(snakemake.input.index).parent, Path(snakemake.output.model).parent,
            k_neighbours=snakemake.params.k_neighbours, **params)
