"""What each non-LoRA PEFT tuner is to the plan and the commands, without torch: whether it adds a ΔW that does
not depend on W (and so sums with other adapters' terms), why its merge cannot be undone from the files, and whether
its ΔW is exactly a LoRA's B·A (which convert writes; tuner_lora computes the factors).
"""

from __future__ import annotations

from lorasurgeon.adapter import TunerModule

# The tuners whose new tensors are no W + ΔW with ΔW independent of W (tuner_products computes them): they must
# be alone on the tensors they change, and are merged with weight 1 only.
PRODUCTS = frozenset(
    {"IA3", "OFT", "BOFT", "HRA", "ROAD", "MISS", "BEFT", "HIRA", "GLORA", "DEFT", "OSF", "FROD", "PEANUT"}
)
NOT_INVERTIBLE = {
    "FROD": "FRoD divides W's coordinates on V by their column norms, which W' = U (S + Λ) Vᵀ no longer holds",
    "PEANUT": "PEANUT adds a nonlinear function of W, which lorasurgeon cannot invert",
    "OSF": "OSF replaces the bottom singular directions of W, and the adapter does not hold the original ones",
}


def is_additive(module: TunerModule) -> bool:
    """Whether the module adds to W a ΔW that does not depend on W (unmerge then subtracts it)."""
    return module.tuner not in PRODUCTS or (module.tuner == "MISS" and module.params.get("kind") != "bat")


def unmerge_refusal(module: TunerModule) -> str | None:
    """Why the module can never be unmerged from its files, or None (data can refuse too: an IA3 vector with a
    zero entry; tuner_merge.unmerge says so)."""
    if module.tuner == "DEFT" and module.params.get("method") == "qr":
        return "DEFT with decomposition_method qr projects r directions out of W, and the adapter does not hold them"
    return NOT_INVERTIBLE.get(module.tuner)


# The tuners whose ΔW is B·A for factors computed from their tensors (tuner_lora): name, and the factors.
LORA_FORMS = {
    "ADALORA": ("AdaLoRA", "A ⊙ E and B, scale α / (r₀ + 1e-5)"),
    "VERA": ("VeRA", "λ_d ⊙ A and λ_b ⊙ B of the shared projections"),
    "PVERA": ("PVeRA", "the mean half of λ_d ⊙ A, and λ_b ⊙ B"),
    "RANDLORA": ("RandLoRA", "the scaled random bases Â and B̂, rank r·⌈min(in, out)/r⌉"),
    "VBLORA": ("VB-LoRA", "A and B mixed from the vector bank"),
    "UNILORA": ("UniLoRA", "A and B gathered from the shared vector"),
    "TINYLORA": ("TinyLoRA", "A and B R, R = Σ vᵢ Pᵢ"),
    "DELORA": ("DeLoRA", "A diag(w_norm) and B diag(λ / r / (‖Aᵢ‖ ‖Bⁱ‖))"),
    "GRALORA": ("GraLoRA", "the k² blocks' factors side by side, rank k·r (+ hybrid_r)"),
}


def lora_form_refusal(module: TunerModule) -> str | None:
    """Why convert cannot write the module as a LoRA, or None."""
    if module.tuner in LORA_FORMS:
        return None
    named = ", ".join(name for name, _ in LORA_FORMS.values())
    return (
        f"the ΔW of a {module.tuner} module is no product B·A of LoRA factors (an exact LoRA form exists for {named} "
        "only); merge it instead"
    )
