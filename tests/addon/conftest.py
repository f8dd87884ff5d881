"""Fixtures for the add-on tests: a tiny .blend, a private service file, the real service."""

import os
import sys

import pytest
from addon_testlib import PYTHON, ROOT, SCENE_SCRIPT, has_module, run_python


@pytest.fixture(scope="session", autouse=True)
def service_file(tmp_path_factory):
    """A private discovery file for this session (inherited by every subprocess)."""
    path = tmp_path_factory.mktemp("pbnds-config") / "service.json"
    old = os.environ.get("PBNDS_SERVICE_FILE")
    os.environ["PBNDS_SERVICE_FILE"] = str(path)
    yield path
    if old is None:
        del os.environ["PBNDS_SERVICE_FILE"]
    else:
        os.environ["PBNDS_SERVICE_FILE"] = old


@pytest.fixture(scope="session")
def tiny_blend(tmp_path_factory):
    path = tmp_path_factory.mktemp("scene") / "tiny.blend"
    run_python(SCENE_SCRIPT, path)
    return path


@pytest.fixture(scope="session")
def service(service_file):
    """The real PBNDS service (`python -m backend.cli serve`), started through the add-on's own code."""
    if not has_module("backend.service"):
        pytest.skip("backend.service is not importable yet: the end-to-end tests need the real service")
    sys.path.insert(0, str(ROOT))
    from addon import service_process

    proc = service_process.start(PYTHON, cwd=ROOT, timeout=120)
    yield proc
    proc.stop()
