"""Session-cached fixtures: tiny real models and PEFT adapters (see builders.py).

Every test merges in blocks of a few rows (`small_blocks`): with the production block size a tiny model's
tensor is one block, and the oracle tests would never see the block boundaries of a real model's merge.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# The suite (and CI) draws the same hypothesis examples on every run, so a failure reproduces and whether a
# change lands never depends on the draw; HYPOTHESIS_PROFILE=explore draws new examples to look for new bugs
# (each one found becomes a named test, as in test_fuzz's ONCE_INTERNAL_ERRORS). Loaded before the test
# modules, so their @settings and profiles inherit it.
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny fp32 Llama saved as a Hugging Face directory (one model.safetensors)."""
    from builders import save_model

    return save_model(tmp_path_factory.mktemp("llama") / "base")


@pytest.fixture(scope="session")
def llama_adapter(tmp_path_factory: pytest.TempPathFactory, llama_dir: Path) -> Path:
    """A PEFT LoRA (r=4, alpha=8) on all seven projections of `llama_dir`."""
    from builders import save_adapter

    return save_adapter(llama_dir, tmp_path_factory.mktemp("adapter") / "lora", r=4, lora_alpha=8)


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    from lorasurgeon import linalg

    monkeypatch.setattr(linalg, "BLOCK_ELEMENTS", 40)
    monkeypatch.setattr(linalg, "MIN_BLOCK_ROWS", 3)


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh current directory for commands that write their default output there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` skip cleanly where CUDA is not available (CI never has it)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
