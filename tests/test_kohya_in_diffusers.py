"""What diffusers' own kohya reader makes of per-module alphas, and the exact route around it.

diffusers (0.42) converts a kohya file's `.alpha` tensors to network_alphas, but on attention layers (to_q, to_k,
to_v, to_out) the per-module alphas it builds keep its old `processor.to_k_lora` names and match nothing, so those
modules get the file's common alpha: any sd-scripts file whose attention alphas differ loads at the wrong scale.
`convert --to diffusers` writes one alpha into lora_adapter_metadata and folds the other modules' scales into B
(the single-alpha form, formats.scale_form), or with `patterns` every module's scale, which diffusers reads exactly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_convert import diffusers_unet, float32, peft_unet, tiny_unet, unet_lora

import lorasurgeon

pytestmark = pytest.mark.oracle

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"]


def test_kohya_attention_alphas_are_lost_by_diffusers_and_kept_by_convert(tmp_path: Path) -> None:
    adapter = unet_lora(tmp_path, target_modules=TARGETS, alpha_pattern={"to_k": 2, "proj_in": 3})
    want_scalings, want = peft_unet(adapter)
    lorasurgeon.convert(adapter, tmp_path / "k.safetensors", to="kohya", base=tmp_path / "unet")
    with pytest.warns(RuntimeWarning, match=r"alpha_pattern keys did not match .*processor\.to_k_lora"):
        scalings, _ = diffusers_unet(tmp_path / "k.safetensors")
    lost = sorted(n for n, s in float32(scalings).items() if s != float32(want_scalings)[n])
    assert lost and all(".to_k" in n for n in lost)  # the caveat: attention alphas, and only they, are dropped
    assert all(float32(scalings)[n] == float32(want_scalings)[n] for n in want_scalings if "proj_in" in n)
    base = tiny_unet().state_dict()
    for patterns in (True, False):
        out = tmp_path / f"d-{patterns}.safetensors"
        lorasurgeon.convert(tmp_path / "k.safetensors", out, to="diffusers", base=tmp_path / "unet", patterns=patterns)
        scalings, fused = diffusers_unet(out)
        if patterns:
            assert float32(scalings) == float32(want_scalings)  # every module's own scale
        else:
            assert len(set(scalings.values())) == 1  # one alpha (every rank is 4), the rest folded into B
        assert all(torch.allclose(fused[k], want[k], rtol=1e-6, atol=1e-7) for k in want)
    assert sum(not torch.equal(want[k], base[k]) for k in want) >= 10  # guard: the LoRA changed them
