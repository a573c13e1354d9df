"""Fixtures of the attn_vision tests: the reference implementations and small images."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def _load(name: str, file: str):
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, HERE / file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="session")
def refs():
    """``tests/vision/references.py``: official-style BiFormer and helpers."""
    return _load("attn_vision_tests_references", "references.py")
