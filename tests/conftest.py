"""Session-cached fixtures: tiny real models and PEFT adapters (see builders.py).

Every test merges in blocks of a few rows (`small_blocks`): with the production block size a tiny model's
tensor is one block, and the oracle tests would never see the block boundaries of a real model's merge.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
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


@pytest.fixture(scope="module")
def rich(tmp_path_factory: pytest.TempPathFactory, llama_dir: Path) -> Path:
    """r=8 rsLoRA with a rank and an alpha pattern: heterogeneous scales and ranks in one adapter."""
    from builders import save_adapter

    path = tmp_path_factory.mktemp("rich") / "lora"
    patterns = {"rank_pattern": {"down_proj": 6}, "alpha_pattern": {"o_proj": 4}}
    return save_adapter(llama_dir, path, seed=3, r=8, lora_alpha=16, use_rslora=True, **patterns)


@pytest.fixture(scope="module")
def partial(tmp_path_factory: pytest.TempPathFactory, llama_dir: Path) -> Path:
    """r=2 on three of the seven projections: another rank, alpha and target set."""
    from builders import save_adapter

    path = tmp_path_factory.mktemp("partial") / "lora"
    return save_adapter(llama_dir, path, seed=4, r=2, lora_alpha=3, target_modules=["q_proj", "v_proj", "down_proj"])


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[str]:
    """A local Ray instance for the module (2 CPUs, the repository importable on its workers); yields its GCS
    address, for drivers in other processes. Skips where the ray extra is not installed."""
    ray = pytest.importorskip("ray")
    root = Path(__file__).resolve().parent.parent
    path = os.pathsep.join([str(root), str(root / "tests"), os.environ.get("PYTHONPATH", "")])
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=80 * 2**20,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": path}},
    )
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


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
