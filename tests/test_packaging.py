"""The installed package: every console script pyproject.toml declares must resolve to a callable."""

import importlib
import tomllib

from _scene import ROOT


def test_every_console_script_points_at_a_callable():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for name, target in project.get("scripts", {}).items():
        module, _, attr = target.partition(":")
        # an ImportError here is what a user typing the command would get
        assert callable(getattr(importlib.import_module(module), attr)), f"console script {name} -> {target}"
