"""Rule score: every method on the held-out cells (and, on the demo scene, under the real clouds); or, when
the holdout checkpoint found the benchmark impossible, outputs that say why. Scored in spatial blocks of
config key blocks.size cells (bounded memory; the same table as the whole region at once)."""
import json
import tempfile
from pathlib import Path

from stfuse import benchmark, logs

logs.setup(snakemake.log[0])
p, optical = snakemake.params.benchmark, snakemake.params.optical
holdout = json.loads(Path(snakemake.input.info).read_text())
out_dir = Path(snakemake.output.scores).parent
cube_dir = Path(snakemake.input.cube).parent
if not holdout["possible"]:
    benchmark.not_possible_step(out_dir, holdout)
else:
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".truth-") as tmp:
        truth = None
        if snakemake.input.truth:
            meta = json.loads((cube_dir / "cube.json").read_text())
            truth = benchmark.synthetic_truth(snakemake.input.truth[0], meta["dates"], optical["bands"],
                                              optical.get("scale", 1.0), optical.get("offset", 0.0),
                                              path=Path(tmp) / "truth.npy")
        benchmark.benchmark_step(cube_dir, snakemake.input.hidden, Path(snakemake.input.heldout).parent, out_dir,
                                 data_range=p["data_range"], whittaker_lambda=p["whittaker_lambda"],
                                 quicklook_dates=p["quicklook_dates"], truth_cube=truth,
                                 main_infer_dir=Path(snakemake.input.main).parent,
                                 block_size=snakemake.params.blocks.get("size", benchmark.DEFAULT_BLOCK_SIZE))
        del truth
