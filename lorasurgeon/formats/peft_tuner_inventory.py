"""Every PEFT 0.21 tuner but LoRA: those lorasurgeon merges (with a line on what each is) and the reasons for
the others. A test compares this inventory with the installed PEFT's PeftType, so that a tuner added by a
later PEFT release is refused by name until it is read here.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorasurgeon.formats import peft_tuner_additive, peft_tuner_products
from lorasurgeon.formats.peft_tuner_config import TunerKind

TUNERS: dict[str, TunerKind] = {**peft_tuner_additive.TUNERS, **peft_tuner_products.TUNERS}

_PROMPT = (
    "a prompt-learning method: learned virtual tokens or key/value prefixes fed to the model at run time, "
    "with no weight to fold them into (PEFT has no merge_and_unload for it)"
)
REFUSED: dict[str, str] = {
    "PROMPT_TUNING": _PROMPT,
    "MULTITASK_PROMPT_TUNING": _PROMPT,
    "P_TUNING": _PROMPT,
    "PREFIX_TUNING": _PROMPT,
    "CPT": _PROMPT,
    "CARTRIDGE": _PROMPT,
    "ADAPTION_PROMPT": "adaption prompts with zero-init gated attention added to the model at run time; PEFT "
    "cannot merge them",
    "POLY": "Polytropon routes each task through a learned mix of LoRA skills at run time; PEFT cannot merge it",
    "XLORA": "X-LoRA mixes LoRA experts per token with a learned classifier at run time; PEFT cannot merge it",
    "LILY": "PEFT's Lily layers raise NotImplementedError on merge (their B matrices are shared and routed)",
    "SHADOW": "ShadowPEFT runs a parallel shadow network beside the model; PEFT raises NotImplementedError on merge",
    "ADAMSS": "AdaMSS scatters each subspace's update to the output rows a scikit-learn KMeans clustering of the "
    "base weight picks at load time, which the adapter does not record",
    "PSOFT": "PSOFT rebuilds its A and B from an SVD of the base weight at load time, whose singular vectors' "
    "signs (and, with psoft_svd 'lowrank', a randomized draw) decide the update; the adapter does not record them",
}


@dataclass(frozen=True)
class Description:
    """What a tuner is and what it changes, for `report`."""

    name: str
    what: str
    changes: str


DESCRIPTIONS: dict[str, Description] = {
    "IA3": Description("(IA)³", "a learned vector scaling activations", "scales W's rows (and bias) or columns"),
    "ADALORA": Description("AdaLoRA", "LoRA in SVD form, P Λ Q, with a rank budget", "adds B (A ⊙ E) · α / r₀"),
    "LOHA": Description("LoHa", "Hadamard product of two low-rank products", "adds (B₁A₁) ⊙ (B₂A₂) · α / r"),
    "LOKR": Description("LoKr", "Kronecker product of two small factors", "adds w₁ ⊗ w₂ · α / r"),
    "VERA": Description("VeRA", "shared frozen random A, B with learned scaling vectors", "adds Λ_b B Λ_d A"),
    "OFT": Description("OFT", "block-diagonal orthogonal rotation of the input", "rotates W's columns: W Rᵀ"),
    "BOFT": Description("BOFT", "butterfly product of block rotations, output scaling", "W Rᵀ, rows scaled by s"),
    "FOURIERFT": Description("FourierFT", "n learned 2-D Fourier coefficients", "adds Re(ifft2(F)) · scaling"),
    "LN_TUNING": Description("LN tuning", "retrained normalisation layers", "replaces the norm's parameters"),
    "MISS": Description("MiSS", "a shared (r, out) block tiled over W", "adds the tiled block (bat: W + WM + M)"),
    "HRA": Description("HRA", "a product of r Householder reflections", "reflects W's columns: W H"),
    "RANDLORA": Description("RandLoRA", "shared random bases with learned diagonal scalings", "adds B̂ Â · α / r"),
    "SHIRA": Description("SHiRA", "a sparse set of learned weight entries", "adds the sparse values"),
    "C3A": Description("C3A", "block-circulant update via FFT", "adds a block-circulant matrix / in"),
    "ROAD": Description("RoAd", "2-D rotations of output pairs with scales", "rotates W's rows (and bias): R W"),
    "DELORA": Description("DeLoRA", "LoRA with normalised directions and a bounded norm λ", "adds a normalised B A"),
    "WAVEFT": Description("WaveFT", "n learned wavelet coefficients", "adds IDWT(C) · scaling"),
    "GRALORA": Description("GraLoRA", "k×k blocks of low-rank updates", "adds the block low-rank ΔW · α / r"),
    "VBLORA": Description("VB-LoRA", "LoRA factors mixed from a shared vector bank", "adds B A"),
    "TRAINABLE_TOKENS": Description("trainable tokens", "retrained embedding rows", "replaces the listed rows"),
    "BEFT": Description("BEFT", "a learned bias offset", "adds to the bias"),
    "GLORA": Description("GLoRA", "generalised LoRA: W + W⊙A + B, b + b⊙D + E + WC", "changes W and the bias"),
    "HIRA": Description("HiRA", "Hadamard high-rank update W ⊙ (B A)", "scales W entrywise by 1 + B A"),
    "DEFT": Description("DEFT", "projects r directions out of W and learns new ones", "W − Q(PᵀW) + Q R"),
    "OSF": Description("OSF", "retrained bottom singular directions of W", "replaces W's low-rank part"),
    "SUPERTUNING": Description("Supertuning", "sparse learned entries (plus optional LoRA)", "adds the entries"),
    "PVERA": Description("PVeRA", "probabilistic VeRA (its mean at merge)", "adds Λ_b B Λ_d A (mean half)"),
    "UNILORA": Description("UniLoRA", "LoRA factors gathered from one shared vector", "adds B A"),
    "FROD": Description("FRoD", "W re-expressed on a shared basis V, sparse + diagonal core", "W = U (S + Λ) Vᵀ"),
    "TINYLORA": Description("TinyLoRA", "LoRA-XS on W's SVD, core Σ vᵢ Pᵢ from a tiny shared v", "adds B R A"),
    "PEANUT": Description("PEANUT", "a small nonlinear network of W", "adds f(W), f an MLP of Wᵀ"),
}


def refusal(peft_type: str) -> str | None:
    """Why lorasurgeon does not merge `peft_type`, or None when it does."""
    if peft_type in TUNERS:
        return None
    return REFUSED.get(peft_type, f"{peft_type} is not a tuner of PEFT 0.21, the version lorasurgeon reads")
