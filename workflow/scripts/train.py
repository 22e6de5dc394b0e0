"""Rule train_model: self-supervised training on exported tiles; resumes from last.pt after a kill."""
from pathlib import Path

from stfuse import logs, train

logs.setup(snakemake.log[0])
params = dict(snakemake.params.train)
train.train(Path(snakemake.input.index).parent, Path(snakemake.output.model).parent,
            k_neighbours=snakemake.params.k_neighbours, threads=snakemake.threads, **params)
