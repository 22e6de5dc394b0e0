# Stages 5-7: training, tiled inference, registration of the filled series back into GRASS.
# Two variants run the same rules: `main` (all observations; its filled series is registered) and
# `heldout` (the benchmark's hidden cells removed; only the benchmark reads it).


rule train_model:
    input:
        index=f"{RESULTS}/{{variant}}/tiles/index.csv",
        tiles=f"{RESULTS}/{{variant}}/tiles/tiles.npy",
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
    params:
        train=section("train"),
        k_neighbours=section("pairing", "neighbours"),
    # scheduling hint only: torch's thread count is config train.threads (in params.train), so
    # results do not depend on --cores
    threads: 2
    resources:
        mem_mb=8000,
        runtime=120,
    conda:
        "../../envs/torch.yaml"
    script:
        "../scripts/train.py"


rule predict:
    input:
        model=f"{RESULTS}/{{variant}}/model/model.pt",
        cube=f"{RESULTS}/cube/cube.npy",
        hidden=hidden_cells,
    output:
        filled=f"{RESULTS}/{{variant}}/infer/filled.npy",
        prediction=f"{RESULTS}/{{variant}}/infer/prediction.npy",
        flags=f"{RESULTS}/{{variant}}/infer/flags.npy",
    log:
        f"{LOGS}/{{variant}}/infer.log",
    benchmark:
        f"{BENCH}/{{variant}}/infer.tsv"
    params:
        infer=section("infer"),
    # scheduling hint only: torch's thread count is config infer.threads
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
    conda:
        "../../envs/torch.yaml"
    script:
        "../scripts/infer.py"


rule register_filled:
    input:
        project=f"{RESULTS}/ingest/project.json",
        optical=f"{RESULTS}/ingest/{OPTICAL[0]}.json",
        sar=f"{RESULTS}/ingest/{SAR[0]}.json",
        cube=f"{RESULTS}/cube/cube.json",
        filled=f"{RESULTS}/main/infer/filled.npy",
        flags=f"{RESULTS}/main/infer/flags.npy",
        model=f"{RESULTS}/main/model/model.pt",
    output:
        state=f"{RESULTS}/register/filled.json",
    log:
        f"{LOGS}/register/register.log",
    benchmark:
        f"{BENCH}/register/register.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../../envs/grass.yaml"
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
