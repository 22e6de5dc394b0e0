"""Commands shown to users: Snakemake targets come before --configfile, which takes several values (in
`snakemake --configfile X benchmark`, `benchmark` is read as a second config file)."""

import re
import shlex

import yaml

from _scene import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "config").rglob("*.yaml"))]


def snakemake_commands():
    for path in DOCS:
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            text = line.lstrip("# ").split("  #")[0].strip("`$ ")
            if re.search(r"(^|/)snakemake\s", text) and "--configfile" in text:
                yield path, n, text


def test_no_target_after_configfile_in_any_documented_command():
    seen = 0
    for path, n, text in snakemake_commands():
        words = shlex.split(text.replace("`", " "))
        i = words.index("--configfile")
        trailing = [w for w in words[i + 2:] if not w.startswith("-")]
        assert not trailing, f"{path.name}:{n}: {trailing} after --configfile would be read as config files: {text}"
        seen += 1
    assert seen >= 5


def test_study_manifests_resolve_from_the_directory_snakemake_runs_in():
    """The study configs' comments and the README say: relative to the working directory (the project root)."""
    for study in sorted((ROOT / "config" / "studies").glob("*.yaml")):
        text = study.read_text()
        assert "relative to the project root" not in text, study.name
        manifest = yaml.safe_load(text)["input"].get("manifest")
        if manifest:
            assert manifest.startswith("../shared/data/"), f"{study.name}: {manifest}"
