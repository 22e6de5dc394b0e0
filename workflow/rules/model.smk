# Stages 5-7: training, tiled inference, registration of the filled series back into GRASS.
# Two variants run the same rules: `main` (all observations; its filled series is registered) and
# `heldout` (the benchmark's hidden cells removed; only the benchmark reads it).

# with an uncertainty head (config train.uncertainty, or an adopted checkpoint's: common.smk), inference
# also writes each block's std.npy and registration the STRDS <optical>_filled_std
UNCERTAIN = UNCERTAINTY != "none"
STD_OUTPUT = (
    {"std": f"{RESULTS}/{{variant}}/blocks/{{block}}/infer/std.npy"}
    if UNCERTAIN
    else {}
)
STD_INPUT = (
    {"std": per_block(f"{RESULTS}/main/blocks/{{block}}/infer/std.npy")}
    if UNCERTAIN
    else {}
)


rule train_model:
    input:
        index=f"{RESULTS}/{{variant}}/tiles/index.csv",
        clear_fraction=f"{RESULTS}/{{variant}}/tiles/clear_fraction.npy",
        channels=f"{RESULTS}/{{variant}}/tiles/channels.json",
        stats=f"{RESULTS}/{{variant}}/tiles/stats.json",
        # the tile store's tiles stay in the blocks' files (read a date at a time, never concatenated)
        tiles=per_block(f"{RESULTS}/{{variant}}/blocks/{{block}}/tiles/tiles.npy"),
        summaries=per_block(f"{RESULTS}/{{variant}}/blocks/{{block}}/tiles/tiles.json"),
        # train.model as a checkpoint (adopted: no training) or train.init_from (fine-tuned from)
        weights=train_checkpoint_files,
    output:
        model=f"{RESULTS}/{{variant}}/model/model.pt",
        history=f"{RESULTS}/{{variant}}/model/history.csv",
        curve=report(
            f"{RESULTS}/{{variant}}/model/loss.png",
            caption="../report/loss.rst",
            category="Training",
            labels={"variant": "{variant}"},
        ),
    log:
        f"{LOGS}/{{variant}}/train.log",
    benchmark:
        f"{BENCH}/{{variant}}/train.tsv"
    conda:
        "../../envs/torch.yaml"
    # scheduling hint only: torch's thread count is config train.threads (in params.train), so
    # results do not depend on --cores
    threads: 2
    resources:
        mem_mb=8000,
        runtime=120,
    params:
        train=section("train"),
        k_neighbours=section("pairing", "neighbours"),
        adopt=TRAIN_CHECKPOINT,
    script:
        "../scripts/train.py"


rule predict_block:
    input:
        model=f"{RESULTS}/{{variant}}/model/model.pt",
        cube=f"{RESULTS}/blocks/{{block}}/cube/cube.npy",
        meta=f"{RESULTS}/blocks/{{block}}/cube/cube.json",
        holdout=holdout_info,
    output:
        **STD_OUTPUT,
        filled=f"{RESULTS}/{{variant}}/blocks/{{block}}/infer/filled.npy",
        prediction=f"{RESULTS}/{{variant}}/blocks/{{block}}/infer/prediction.npy",
        flags=f"{RESULTS}/{{variant}}/blocks/{{block}}/infer/flags.npy",
        info=f"{RESULTS}/{{variant}}/blocks/{{block}}/infer/infer.json",
    log:
        f"{LOGS}/{{variant}}/blocks/{{block}}/infer.log",
    benchmark:
        f"{BENCH}/{{variant}}/blocks/{{block}}/infer.tsv"
    group:
        "predict"
    conda:
        "../../envs/torch.yaml"
    # scheduling hint only: torch's thread count is config infer.threads
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        infer=section("infer"),
        std=UNCERTAIN,
    script:
        "../scripts/predict_block.py"


rule register_filled:
    input:
        **STD_INPUT,
        project=f"{RESULTS}/ingest/project.json",
        optical=f"{RESULTS}/ingest/{OPTICAL[0]}.json",
        sar=f"{RESULTS}/ingest/{SAR[0]}.json",
        meta=per_block(f"{RESULTS}/blocks/{{block}}/cube/cube.json"),
        filled=per_block(f"{RESULTS}/main/blocks/{{block}}/infer/filled.npy"),
        flags=per_block(f"{RESULTS}/main/blocks/{{block}}/infer/flags.npy"),
        model=f"{RESULTS}/main/model/model.pt",
    output:
        state=f"{RESULTS}/register/filled.json",
    log:
        f"{LOGS}/register/register.log",
    benchmark:
        f"{BENCH}/register/register.tsv"
    conda:
        "../../envs/grass.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    script:
        "../scripts/register.py"


rule train:
    input:
        stage_targets("train"),


rule infer:
    input:
        stage_targets("infer"),


rule register:
    input:
        stage_targets("register"),
