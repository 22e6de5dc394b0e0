"""Per-step conda envs: every rule that runs code names one, every env parses, every pin is exact and
agrees with the pip lock used here (requirements.txt)."""

import subprocess
import sys
import re
from pathlib import Path

import pytest
import yaml

from _scene import ROOT

ENVS = sorted((ROOT / "envs").glob("*.yaml"))
# conda-forge name -> PyPI name where they differ
CONDA_TO_PIP = {"pytorch": "torch", "pyyaml": "PyYAML"}
NOT_ON_PYPI = {"python", "grass", "pip"}


def lock() -> dict:
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


def rule_blocks():
    for smk in sorted((ROOT / "workflow" / "rules").glob("*.smk")):
        text = smk.read_text()
        for m in re.finditer(r"^(?:rule|checkpoint) (\w+):\n(.*?)(?=^(?:rule|checkpoint) |\Z)", text, re.M | re.S):
            yield smk.name, m.group(1), m.group(2)


def test_every_rule_that_runs_code_names_an_existing_env():
    checked = 0
    for smk, rule, body in rule_blocks():
        if not re.search(r"^\s+(script|shell|run):", body, re.M):
            continue  # target rules only collect inputs
        m = re.search(r'^\s+conda:\n\s+"([^"]+)"', body, re.M)
        assert m, f"{smk}: rule {rule} names no conda env"
        assert (ROOT / "workflow" / "rules" / m.group(1)).resolve().is_file(), f"{smk}: rule {rule}: {m.group(1)}"
        checked += 1
    assert checked >= 10


@pytest.mark.parametrize("env", ENVS, ids=lambda p: p.name)
def test_env_parses_with_exact_pins_matching_the_lock(env):
    spec = yaml.safe_load(env.read_text())
    assert spec["channels"] == ["conda-forge", "nodefaults"]
    pins = lock()
    for dep in spec["dependencies"]:
        if isinstance(dep, dict):
            for pip_dep in dep["pip"]:
                if pip_dep.startswith("-e "):
                    continue
                name, _, version = pip_dep.partition("==")
                assert version and not re.search(r"[*<>!~,]", version), f"{env.name}: {pip_dep} is not an exact pin"
                assert pins[name.lower()] == version, f"{env.name}: {pip_dep} vs lock {pins[name.lower()]}"
            continue
        name, sep, version = dep.partition("=")
        assert sep and re.fullmatch(r"\d+(\.\d+)*", version), f"{env.name}: {dep} is not an exact pin"
        if name in NOT_ON_PYPI:
            continue
        pip_name = CONDA_TO_PIP.get(name, name).lower().replace("_", "-")
        assert pip_name in pins, f"{env.name}: {name} is not in requirements.txt"
        assert pins[pip_name] == version, f"{env.name}: {name}={version} but requirements.txt has {pins[pip_name]}"


def test_snakefile_exports_the_checkout_for_the_envs():
    """The envs' `-e ${STFUSE_ROOT}` is filled from the Snakefile, with the workflow's own folder."""
    assert re.search(r'^os\.environ\.update\(STFUSE_ROOT=workflow\.basedir\)', (ROOT / "Snakefile").read_text(), re.M)


@pytest.mark.workflow
def test_snakemake_lint_is_clean():
    """`snakemake --lint` (the catalogue's check): no lint on the Snakefile, the rules or the scripts."""
    proc = subprocess.run([str(Path(sys.executable).with_name("snakemake")), "-s", str(ROOT / "Snakefile"), "--lint"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "Congratulations, your workflow is in a good condition!" in out, out[-3000:]


@pytest.mark.parametrize("env", ENVS, ids=lambda p: p.name)
def test_env_deploys_from_snakemakes_copy(env, tmp_path):
    """Deploy the env file as Snakemake does -- a copy in <workdir>/.snakemake/conda/<hash>.yaml, from which
    conda hands the pip section to pip in that folder -- and let pip itself resolve the local entries:
    they must name this checkout (a relative `-e ../` resolved to .snakemake/ and failed)."""
    import hashlib
    import os
    import subprocess
    import sys

    conda_dir = tmp_path / "work" / ".snakemake" / "conda"
    conda_dir.mkdir(parents=True)
    copy = conda_dir / f"{hashlib.md5(env.read_bytes()).hexdigest()}.yaml"
    copy.write_bytes(env.read_bytes())
    pip_deps = next(d["pip"] for d in yaml.safe_load(copy.read_text())["dependencies"] if isinstance(d, dict))
    local = [d for d in pip_deps if d.startswith("-e ") or "/" in d or d.startswith("$")]
    assert local, f"{env.name}: stfuse itself is not installed by the env"
    req = conda_dir / "condaenv.requirements.txt"
    req.write_text("\n".join(local) + "\n")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--no-index", "--no-build-isolation",
         "--disable-pip-version-check", "-r", req.name],
        cwd=conda_dir, capture_output=True, text=True, timeout=300,
        env={**os.environ, "STFUSE_ROOT": str(ROOT)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Would install stfuse-" in proc.stdout, proc.stdout


def test_rule_files_are_snakefmt_clean():
    """The catalogue's formatting check: `snakefmt --check` changes nothing in the Snakefile and rule files."""
    proc = subprocess.run([str(Path(sys.executable).with_name("snakefmt")), "--check", "Snakefile", "workflow/rules"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
