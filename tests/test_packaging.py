"""The installed package: every console script pyproject.toml declares must resolve to a callable."""

import importlib
import tomllib

import pytest
import yaml

from _scene import ROOT


def test_every_console_script_points_at_a_callable():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for name, target in project.get("scripts", {}).items():
        module, _, attr = target.partition(":")
        # an ImportError here is what a user typing the command would get
        assert callable(getattr(importlib.import_module(module), attr)), f"console script {name} -> {target}"


# A sitecustomize on PYTHONPATH hides torch from every Python process it reaches (Snakemake's job scripts
# too), as if it were not installed.
NO_TORCH = '''
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, _NoTorch())
'''


def _without_torch(tmp_path):
    import os

    site = tmp_path / "no_torch"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(NO_TORCH)
    return dict(os.environ, PYTHONPATH=str(site))


def test_ml_modules_name_the_extra_without_torch(tmp_path):
    import subprocess
    import sys

    code = ("import stfuse, stfuse.ingest, stfuse.pairing, stfuse.tiles, stfuse.cube, stfuse.baselines, "
            "stfuse.benchmark, stfuse.steps.score\n"
            "try:\n    import stfuse.train\nexcept ModuleNotFoundError as e:\n    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_without_torch(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "stfuse.train needs PyTorch" in proc.stdout and "stfuse[ml]" in proc.stdout


def test_pyproject_keeps_torch_in_the_ml_extra():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(d.split("[")[0].split("=")[0].strip() == "torch" for d in project["dependencies"])
    assert "torch" in project["optional-dependencies"]["ml"]


@pytest.mark.workflow
@pytest.mark.grass
def test_ingest_and_pairing_run_without_torch(tmp_path):
    """The non-ML stages, as real Snakemake jobs, with torch hidden from every process."""
    import subprocess
    import sys
    from pathlib import Path

    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    config["study"] = "notorch"
    config["input"]["synthetic"].update(width=32, height=32, start="2021-05-01", end="2021-06-30")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(config))
    cmd = [str(Path(sys.executable).with_name("snakemake")), "-s", str(ROOT / "Snakefile"), "--directory",
           str(tmp_path), "--cores", "2", "pairing", "--configfile", str(cfg)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_without_torch(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "results/notorch/pairing/pairs.csv").is_file()
    hidden = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, env=_without_torch(tmp_path))
    assert hidden.returncode != 0, "torch was not hidden: the test would prove nothing"
