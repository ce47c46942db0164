import os
import sys

# Tests import shared helpers (dist_utils) as top-level modules; spawned workers inherit sys.path.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

TINY_ARCH = os.path.join(os.path.dirname(__file__), "models", "tiny_test_arch.json")


@pytest.fixture
def tiny_arch() -> str:
    """A 1-layer open_clip architecture at 16×16 pixels: builds and steps in milliseconds."""
    return TINY_ARCH
