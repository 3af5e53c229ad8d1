"""Shared test setup: tiny weights go to a private cache, never to the user's home."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

_CACHE = tempfile.mkdtemp(prefix="grand-test-cache-")
# Set at import so that subprocesses and Ray workers started by tests inherit it.
os.environ.setdefault("GRAND_CACHE_DIR", _CACHE)


def pytest_sessionfinish(session, exitstatus):  # noqa: ARG001
    shutil.rmtree(_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_cfg():
    from grand_pipeline.config import load_config

    return load_config("tiny-lite")
