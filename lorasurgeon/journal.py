"""The journal of a resumable run: each finished step's result kept as one file in a folder inside OUT's
temporary (the writer's scratch folder, never published), so a run killed at 90 % resumes at 90 %.

An entry is `<key>.safetensors`: the step's tensors, and in the header's metadata its JSON record and a digest
of the tensor bytes. The key is the caller's hash of everything the result depends on (for extract: the two
tensors' places, their files' sizes and mtimes, the rule, the device type, the threads, the torch version),
so an entry computed from a changed input or with other options is never used: it is not looked up. Entries
are written under a temporary name and renamed, so a killed run leaves whole entries or none; they are not
fsync'd one by one (a process killed keeps them in the page cache), and one that a machine crash damaged
fails its digest and is computed again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from lorasurgeon.checkpoint import write_all
from lorasurgeon.errors import InputError
from lorasurgeon.header import build_header, dtype_name, read_header, read_into, torch_dtype

SUFFIX = ".safetensors"
PART = ".part"
RECORD, DIGEST = "record", "digest"

Entry = tuple[dict[str, torch.Tensor], dict[str, Any]]


class Journal:
    """Entries in `folder`, by key (a file-name-safe string)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.damaged = 0  # entries found but unreadable, so computed again
        folder.mkdir(parents=True, exist_ok=True)

    def keys(self) -> set[str]:
        """The keys with an entry (not yet checked: `get` checks)."""
        return {p.name.removesuffix(SUFFIX) for p in self.folder.iterdir() if p.name.endswith(SUFFIX)}

    def put(self, key: str, tensors: dict[str, torch.Tensor], record: dict[str, Any]) -> None:
        """Keep one step's result: written beside its final name, then renamed onto it."""
        flat = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
        data = [t.reshape(-1).view(torch.uint8).numpy() for t in flat.values()]
        digest = hashlib.blake2b(digest_size=16)
        for chunk in data:
            digest.update(chunk.data)
        entries = [(name, dtype_name(t.dtype), tuple(t.shape)) for name, t in flat.items()]
        metadata = {RECORD: json.dumps(record), DIGEST: digest.hexdigest()}
        part = self.folder / f"{key}{PART}"
        with open(part, "wb", buffering=0) as f:
            write_all(f, memoryview(build_header(entries, metadata)))
            for chunk in data:
                write_all(f, chunk.data)
        os.replace(part, self.folder / f"{key}{SUFFIX}")

    def clear(self) -> None:
        """Drop every entry (the run failed in a way a resumed run would meet again)."""
        for path in self.folder.iterdir():
            path.unlink(missing_ok=True)

    def get(self, key: str) -> Entry | None:
        """The entry under `key`, or None when there is none or it is damaged (then counted in `damaged`)."""
        path = self.folder / f"{key}{SUFFIX}"
        if not path.is_file():
            return None
        try:
            return _read(path)
        except (InputError, OSError, ValueError, KeyError):
            self.damaged += 1
            return None


def _read(path: Path) -> Entry:
    header = read_header(path)
    tensors: dict[str, torch.Tensor] = {}
    digest = hashlib.blake2b(digest_size=16)
    fd = os.open(path, os.O_RDONLY)
    try:
        for info in header.tensors:
            buffer = torch.empty(info.nbytes, dtype=torch.uint8)
            read_into(path, fd, buffer.numpy().data, info.start)
            digest.update(buffer.numpy().data)
            tensors[info.name] = buffer.view(torch_dtype(info.dtype)).reshape(info.shape)
    finally:
        os.close(fd)
    if digest.hexdigest() != header.metadata[DIGEST]:
        raise ValueError(f"{path}: digest mismatch")
    record = json.loads(header.metadata[RECORD])
    if not isinstance(record, dict):
        raise ValueError(f"{path}: record is not an object")
    return tensors, record
