# Stage 8: hold out cells on clear dates, then score the model (trained without them) and the baselines.
# holdout is a checkpoint: it also decides whether the data support the benchmark (holdout.json), and
# score requests the heldout variant (its tiles, training, inference) only when they do. When not, score
# writes its outputs saying why, and the run still succeeds.


checkpoint holdout:
    input:
        cube=f"{RESULTS}/cube/cube.npy",
    output:
        hidden=f"{RESULTS}/heldout/hidden.npy",
        info=f"{RESULTS}/heldout/holdout.json",
    log:
        f"{LOGS}/heldout/holdout.log",
    benchmark:
        f"{BENCH}/heldout/holdout.tsv"
    params:
        benchmark=section("benchmark"),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../../envs/eval.yaml"
    script:
        "../scripts/holdout.py"


rule score:
    input:
        unpack(scored_variants),
        cube=f"{RESULTS}/cube/cube.npy",
        hidden=f"{RESULTS}/heldout/hidden.npy",
        info=f"{RESULTS}/heldout/holdout.json",
        truth=synthetic_truth_manifest,
    output:
        scores=f"{RESULTS}/benchmark/scores.csv",
        summary=report(f"{RESULTS}/benchmark/summary.md", caption="../report/summary.rst", category="Benchmark"),
        by_gap=report(f"{RESULTS}/benchmark/by_gap.png", caption="../report/by_gap.rst", category="Benchmark"),
        quicklook=report(
            f"{RESULTS}/benchmark/quicklook.png", caption="../report/quicklook.rst", category="Benchmark"
        ),
    log:
        f"{LOGS}/benchmark/score.log",
    benchmark:
        f"{BENCH}/benchmark/score.tsv"
    params:
        benchmark=section("benchmark"),
        optical=section("sensors", OPTICAL[0]),
        blocks=section("blocks"),
    threads: 1
    resources:
        mem_mb=8000,
        runtime=30,
    conda:
        "../../envs/eval.yaml"
    script:
        "../scripts/score.py"


rule benchmark:
    input:
        stage_targets("benchmark"),
