"""A tiny demo project for the documentation tests: a real Snakemake run of a synthetic study up to `cube`.

docs/python-api.md and notebooks/walkthrough.ipynb assume the demo study's outputs under
``results/demo/`` of the directory they run in (what `make demo` makes in the repository root); this
makes the same tree up to the block cubes (ingest, pairing, groups, cube), on a 48 x 48 scene with 13
optical and 11 SAR dates (one block), in ~15 s.
"""

from __future__ import annotations

import re
from pathlib import Path

from _scene import write_config
from test_workflow_ingest import run_snakemake

STUDY = "demo"
SCENE = {"synthetic": {"width": 48, "height": 48, "start": "2021-05-01", "end": "2021-06-30", "seed": 1}}

_prepared: dict[str, Path] = {}


def prepare(workdir: Path) -> Path:
    """Run the workflow up to `cube` for the tiny study `demo` in ``workdir``; returns ``workdir``."""
    cfg = write_config(workdir / "demo.yaml", STUDY, SCENE)
    proc = run_snakemake(workdir, cfg, "cube")
    if proc.returncode != 0:
        raise RuntimeError(f"snakemake cube failed in {workdir}:\n{proc.stderr[-4000:]}")
    return workdir


def shared_project(tmp_path_factory) -> Path:
    """One prepared demo project per test session (the docs test and the notebook test write into
    mapsets and folders of their own, so they can share it)."""
    if "dir" not in _prepared:
        _prepared["dir"] = prepare(tmp_path_factory.mktemp("demo_project"))
    return _prepared["dir"]


FENCE = re.compile(r"^```(.*)$")
NOT_RUN = "<!-- not run -->"


def python_blocks(markdown: Path) -> list[str]:
    """The code of the ```python blocks of ``markdown`` that are meant to run, in order.

    Skipped: a block whose fence says more than ``python`` (e.g. ```python title="..."), and one whose
    previous non-blank line is ``<!-- not run -->``.
    """
    blocks, current, run, previous = [], None, False, ""
    for line in markdown.read_text().splitlines():
        fence = FENCE.match(line.strip())
        if current is None:
            if fence:
                info = fence.group(1).strip()
                current, run = [], info == "python" and previous.strip() != NOT_RUN
            elif line.strip():
                previous = line
            continue
        if fence and not fence.group(1).strip():
            if run:
                blocks.append("\n".join(current) + "\n")
            current, previous = None, "```"
        else:
            current.append(line)
    if current is not None:
        raise ValueError(f"{markdown}: a code block is not closed")
    return blocks
