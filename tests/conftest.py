"""Test set-up: eight fake CPU devices (for mesh tests) and the offline tokenizer cache.

Both must be set before JAX or tiktoken is imported, which is why they live here.
"""

import os
from pathlib import Path

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED_DATA / "tiktoken"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not found (the shared data folder sits beside the checkout)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def shakespeare_path(shared_data: Path) -> Path:
    return shared_data / "tinyshakespeare.txt"
