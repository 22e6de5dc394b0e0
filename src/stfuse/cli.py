"""The ``stfuse`` command: run a study, check a config without running it, show a study's benchmark.

::

    stfuse run [CONFIG] [--cores N] [--dry-run] [TARGET ...] [-- SNAKEMAKE ARGS]
    stfuse check CONFIG          # schema + every DAG-time check + the block plan; writes nothing
    stfuse scores CONFIG|STUDY   # the benchmark table of a finished study (results/<study>/benchmark)

Paths in a config (a manifest, static layers) are relative to the workflow's directory, where
Snakemake runs (README "Run your own study"); ``stfuse`` runs and checks there too, so a config
behaves the same whether it is given to ``snakemake --configfile`` or to ``stfuse``. ``--workflow``
names another clone; by default it is the clone this package is installed from (``make setup``
installs it editable).

Only ``check`` and ``scores`` run in this process, and neither imports torch or GRASS.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

__all__ = ["main", "workflow_root", "check_config", "plan_text"]

SCHEMA = Path("workflow") / "schemas" / "config.schema.yaml"
DEFAULT_CONFIG = Path("config") / "config.yaml"


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


def workflow_root(given: str | None = None) -> Path:
    """The clone whose Snakefile runs: ``given``, else the one this package lives in."""
    root = Path(given).resolve() if given else Path(__file__).resolve().parents[2]
    if not (root / "Snakefile").is_file() or not (root / SCHEMA).is_file():
        where = f"--workflow {given}" if given else f"{root} (where this stfuse is installed from)"
        raise CliError(f"no stfuse workflow at {where}: Snakefile or {SCHEMA} missing; pass --workflow with the "
                       "path of a clone of the stfuse repository")
    return root


def _config_path(path: str | None, root: Path) -> Path:
    if path is None:
        return root / DEFAULT_CONFIG
    p = Path(path).expanduser()
    p = p if p.is_absolute() else Path.cwd() / p
    if not p.is_file():
        raise CliError(f"config {path} does not exist (looked at {p})")
    return p.resolve()


def _load_yaml(path: Path) -> dict:
    import yaml

    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise CliError(f"config {path} is not valid YAML: {err}") from None
    if not isinstance(config, dict):
        raise CliError(f"config {path} must be a mapping of keys, got {type(config).__name__}")
    return config


def check_config(path: Path, root: Path) -> dict:
    """The config at ``path`` validated as the workflow validates it (Snakemake's schema validation, defaults
    filled in, then :func:`stfuse.config.check`), relative paths taken from ``root``. Returns the filled config;
    raises CliError naming the config and the key at fault."""
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    from . import config as stconfig

    config = _load_yaml(path)
    here = Path.cwd()
    os.chdir(root)  # relative paths in a config are the workflow directory's
    try:
        validate(config, schema=str(root / SCHEMA))
        stconfig.check(config)
    except WorkflowError as err:
        raise CliError(f"config {path}: {err}") from None
    except ValueError as err:
        raise CliError(f"config {path}: {err}") from None
    finally:
        os.chdir(here)
    return config


def plan_text(config: dict) -> str:
    """What a study will do, from its config alone (no raster read): input, region and block plan."""
    from . import blocks
    from . import config as stconfig

    inputs = config["input"]
    kind = next(k for k in ("synthetic", "manifest", "grass_project") if k in inputs)
    lines = [f"study {config['study']}: input {kind}"
             + (f" ({inputs[kind]})" if kind != "synthetic" else "")]
    size = config["tiles"]["size"]
    known = stconfig.region_size(config)
    halo = blocks.halo_for(config.get("blocks") or {}, size)
    bsize = (config.get("blocks") or {}).get("size", blocks.DEFAULT_SIZE)
    if known is None:
        lines.append(f"region: from the data (planned when ingest_project reads it); blocks of {bsize} cells, "
                     f"halo {halo}")
    else:
        width, height, _where = known
        plan = blocks.study_plan({"rows": height, "cols": width}, config.get("blocks") or {}, size)
        rows = len({b.brow for b in plan})
        big = max(plan, key=lambda b: b.read_rows * b.read_cols)
        lines.append(f"region: {width} x {height} cells; blocks of {bsize} cells, halo {halo}: {len(plan)} blocks "
                     f"({rows} x {len(plan) // rows}), the largest read {big.read_rows} x {big.read_cols} cells "
                     f"(core + halo); each block stage runs {len(plan)} jobs")
    lines.append(f"tiles {size}² (overlap {config['tiles']['overlap']}), model {config['train']['model']}, "
                 f"{config['train']['epochs']} epochs"
                 + (f" of {config['train']['samples_per_epoch']} samples"
                    if config["train"].get("samples_per_epoch") else ""))
    return "\n".join(lines)


def _study_of(arg: str, root: Path) -> str:
    p = Path(arg)
    if p.suffix in (".yaml", ".yml") or p.is_file():
        return _load_yaml(_config_path(arg, root))["study"]
    return arg


def cmd_check(args) -> int:
    root = workflow_root(args.workflow)
    path = _config_path(args.config, root)
    config = check_config(path, root)
    print(f"{path}: OK")
    print(plan_text(config))
    return 0


def cmd_scores(args) -> int:
    root = workflow_root(args.workflow)
    study = _study_of(args.study, root)
    bench = root / "results" / study / "benchmark"
    summary = bench / "summary.md"
    if not summary.is_file():
        raise CliError(f"no benchmark for study {study!r} yet: {summary} does not exist; run "
                       f"'stfuse run <its config>' first")
    print(summary.read_text().rstrip())
    print(f"\n(full table: {bench / 'scores.csv'})")
    return 0


def snakemake_command(root: Path, config: Path | None, cores: int, targets: list[str], dry_run: bool,
                      extra: list[str]) -> list[str]:
    # targets before --configfile, which takes several values
    cmd = [sys.executable, "-m", "snakemake", "-s", str(root / "Snakefile"), "--cores", str(cores), *targets]
    if dry_run:
        cmd.append("--dry-run")
    cmd += extra
    if config is not None:
        cmd += ["--configfile", str(config)]
    return cmd


def cmd_run(args) -> int:
    root = workflow_root(args.workflow)
    items = list(args.items)
    given = items.pop(0) if items and Path(items[0]).suffix in (".yaml", ".yml") else None
    args.targets = items
    config = _config_path(given, root) if given else None
    if config is not None:
        check_config(config, root)  # a bad config stops here, with the same message as the DAG's
    cmd = snakemake_command(root, config, args.cores, args.targets, args.dry_run, args.snakemake_args)
    print("+ " + " ".join(cmd[2:]), f"(in {root})", file=sys.stderr, flush=True)
    return subprocess.call(cmd, cwd=root)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="stfuse", description="Fill cloud gaps in Sentinel-2 time series with Sentinel-1, inside GRASS GIS.",
        epilog="Each command's own --help says more. The workflow itself: snakemake --cores N (README).")
    parser.add_argument("--version", action="version", version=f"stfuse {__version__}")
    parser.add_argument("--workflow", help="a clone of the stfuse repository (default: the one stfuse is "
                                           "installed from)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run a study end to end (or up to TARGETs) with Snakemake",
                         description="Check the config, then run the workflow on it with Snakemake in the workflow "
                                     "directory. Arguments after -- go to Snakemake as they are.")
    run.add_argument("items", nargs="*", metavar="[CONFIG] TARGET",
                     help="a study config (a .yaml file; default: the demo, config/config.yaml), then the rules or "
                          "files to make (default: everything)")
    run.add_argument("--cores", "-c", type=int, default=os.cpu_count() or 1, help="default: all CPUs")
    run.add_argument("--dry-run", "-n", action="store_true", help="list the jobs, run nothing")
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check", help="check a config (and its manifest) without running anything",
                           description="Validate a study config as the workflow does (schema, defaults, every "
                                       "check that names a key) and print its block plan. Writes nothing.")
    check.add_argument("config")
    check.set_defaults(func=cmd_check)

    scores = sub.add_parser("scores", help="show the benchmark table of a finished study",
                            description="Print results/<study>/benchmark/summary.md of a study.")
    scores.add_argument("study", help="a study config or a study name")
    scores.set_defaults(func=cmd_scores)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    args.snakemake_args = extra
    try:
        return args.func(args)
    except CliError as err:
        print(f"stfuse {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
