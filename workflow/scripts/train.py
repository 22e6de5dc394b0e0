"""Rule train_model: self-supervised training on exported tiles; resumes from last.pt after a kill.

torch's thread count is the config's train.threads (in params.train), not snakemake.threads: --cores scales
the latter down, and results are bit-identical only for the same thread count (see stfuse.train).

An inference-only study (train.model names a checkpoint, params.adopt): nothing is trained; the checkpoint is
checked against the study's channels and adopted (stfuse.train.adopt_checkpoint), same outputs.
"""
from pathlib import Path

from stfuse import logs, train

logs.setup(snakemake.log[0])
params = dict(snakemake.params.train)
# train.neighbours: the model's temporal window, null = pairing.neighbours
k_neighbours = params.pop("neighbours", None)
k_neighbours = snakemake.params.k_neighbours if k_neighbours is None else k_neighbours
tiles_dir, out_dir = Path(snakemake.input.index).parent, Path(snakemake.output.model).parent
if snakemake.params.adopt:
    train.adopt_checkpoint(snakemake.params.adopt, tiles_dir, out_dir, k_neighbours=k_neighbours, key="train.model")
else:
    train.train(tiles_dir, out_dir, k_neighbours=k_neighbours, **params)
