# Stage 8: hold out cells on clear dates, then score the model (trained without them) and the baselines.
# holdout is a checkpoint: it also decides whether the data support the benchmark (holdout.json), and
# score requests the heldout variant (its tiles, training, inference) only when they do. When not, score
# writes its outputs saying why, and the run still succeeds.


# the heldout model's std (config train.uncertainty, see model.smk), for the calibration counts
HELDOUT_STD = (
    {"heldout_std": per_block(f"{RESULTS}/heldout/blocks/{{block}}/infer/std.npy")}
    if UNCERTAIN
    else {}
)


checkpoint holdout:
    input:
        meta=per_block(f"{RESULTS}/blocks/{{block}}/cube/cube.json"),
    output:
        info=f"{RESULTS}/heldout/holdout.json",
    log:
        f"{LOGS}/heldout/holdout.log",
    benchmark:
        f"{BENCH}/heldout/holdout.tsv"
    conda:
        "../../envs/eval.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        benchmark=section("benchmark"),
    script:
        "../scripts/holdout.py"


rule score_stats_block:
    input:
        cube=f"{RESULTS}/blocks/{{block}}/cube/cube.npy",
        meta=f"{RESULTS}/blocks/{{block}}/cube/cube.json",
        info=f"{RESULTS}/heldout/holdout.json",
        truth=synthetic_truth_manifest,
    output:
        stats=f"{RESULTS}/benchmark/blocks/{{block}}/stats.npz",
    log:
        f"{LOGS}/benchmark/blocks/{{block}}/score_stats.log",
    benchmark:
        f"{BENCH}/benchmark/blocks/{{block}}/score_stats.tsv"
    group:
        "score_stats"
    conda:
        "../../envs/eval.yaml"
    threads: 1
    resources:
        mem_mb=3000,
        runtime=20,
    params:
        optical=section("sensors", OPTICAL[0]),
    script:
        "../scripts/score_stats_block.py"


rule score_block:
    input:
        **HELDOUT_STD,
        cube=f"{RESULTS}/blocks/{{block}}/cube/cube.npy",
        meta=f"{RESULTS}/blocks/{{block}}/cube/cube.json",
        info=f"{RESULTS}/heldout/holdout.json",
        stats=per_block(f"{RESULTS}/benchmark/blocks/{{block}}/stats.npz"),
        heldout=per_block(f"{RESULTS}/heldout/blocks/{{block}}/infer/filled.npy"),
        main=main_filled_for_truth,
        truth=synthetic_truth_manifest,
    output:
        parts=f"{RESULTS}/benchmark/blocks/{{block}}/parts.npz",
        quicklook=f"{RESULTS}/benchmark/blocks/{{block}}/quicklook.npz",
        block=f"{RESULTS}/benchmark/blocks/{{block}}/block.json",
    log:
        f"{LOGS}/benchmark/blocks/{{block}}/score.log",
    benchmark:
        f"{BENCH}/benchmark/blocks/{{block}}/score.tsv"
    group:
        "score"
    conda:
        "../../envs/eval.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        benchmark=section("benchmark"),
        optical=section("sensors", OPTICAL[0]),
    script:
        "../scripts/score_block.py"


rule score:
    input:
        parts=scored_blocks,
        stats=scored_blocks_stats,
        meta=f"{RESULTS}/blocks/r0000c0000/cube/cube.json",
        info=f"{RESULTS}/heldout/holdout.json",
    output:
        scores=f"{RESULTS}/benchmark/scores.csv",
        summary=f"{RESULTS}/benchmark/summary.md",
        # the overall tables, included in the report's landing page (../report/workflow.rst)
        summary_rst=f"{RESULTS}/benchmark/summary.rst",
        # the report shows the HTML twin (it does not render Markdown)
        summary_html=report(
            f"{RESULTS}/benchmark/summary.html",
            caption="../report/summary.rst",
            category="Benchmark",
        ),
        by_gap=report(
            f"{RESULTS}/benchmark/by_gap.png",
            caption="../report/by_gap.rst",
            category="Benchmark",
        ),
        quicklook=report(
            f"{RESULTS}/benchmark/quicklook.png",
            caption="../report/quicklook.rst",
            category="Benchmark",
        ),
        calibration=report(
            f"{RESULTS}/benchmark/calibration.png",
            caption="../report/calibration.rst",
            category="Benchmark",
        ),
    log:
        f"{LOGS}/benchmark/score.log",
    benchmark:
        f"{BENCH}/benchmark/score.tsv"
    conda:
        "../../envs/eval.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        benchmark=section("benchmark"),
        uncertainty=UNCERTAINTY,
    script:
        "../scripts/score.py"


rule benchmark:
    input:
        stage_targets("benchmark"),
