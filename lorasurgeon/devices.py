"""The torch device a command runs on, from the words `--device` takes (auto, cpu, cuda, cuda:N): checked without
torch first (its import takes seconds), then resolved; and the torch threads a piece of work runs with."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from lorasurgeon.errors import LorasurgeonError, Option

if TYPE_CHECKING:
    import torch


def resolve_device(device: str) -> torch.device:
    """The torch device `device` (auto, cpu, cuda, cuda:N) names; raises LorasurgeonError when it is none or absent."""
    check_device(device)
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LorasurgeonError(Option("device", device), ": CUDA is not available on this machine")
    return torch.device(device)


def check_device(device: str) -> None:
    """What can be said of `device` without torch (whose import takes seconds): that it names a device at all."""
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        raise LorasurgeonError(Option("device", device), ": expected auto, cpu or cuda")


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with `count` torch intra-op threads, and give back the number there was."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
