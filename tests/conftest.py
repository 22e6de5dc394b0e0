"""Shared fixtures."""

from __future__ import annotations

import os
import shutil

import pytest


@pytest.fixture(scope="session")
def grass_project(tmp_path_factory):
    """An empty throwaway GRASS project (EPSG:32633), created once per test run.

    Only the project: GRASS sessions are one per process at a time, so tests open (and close) their
    own with stfuse.grass.session, in a mapset of their own made with stfuse.grass.create_mapset.
    """
    if shutil.which(os.environ.get("STFUSE_GRASS", "grass")) is None:
        pytest.skip("GRASS GIS is not installed")
    from stfuse.grass import create_project

    return create_project(tmp_path_factory.mktemp("grassdb") / "project", 32633)
