"""Whether one adapter module fits the base tensor it resolves to, from headers alone (shared FORMATS.md §2.2-§2.7,
§5.3): dtypes, ranks, shapes after any transpose, conv kernels and groups, DoRA magnitudes, LyCORIS factor layouts.

`place` finds the tensor a module changes and checks the fit; each check returns the problems it finds as Findings
naming the adapter tensor and the base tensor, and the plan decides what to do with them.
"""

from __future__ import annotations

import math

from lorasurgeon import lycoris
from lorasurgeon.adapter import Adapter, LoraModule
from lorasurgeon.errors import Finding, Option, Part
from lorasurgeon.formats.architectures import is_conv1d
from lorasurgeon.formats.resolution import BaseNames
from lorasurgeon.header import TensorInfo

ALGORITHM_NAMES = {"loha": "LoHa", "lokr": "LoKr", "locon-tucker": "Tucker LoCon"}


def factor_findings(module: LoraModule, info: TensorInfo, rank_source: str) -> list[Finding]:
    """What is wrong with the module's factors against `info`: dtypes, ranks (as `rank_source` states them), a
    LyCORIS dora_scale of neither axis, a grouped convolution."""
    magnitude = module.magnitude
    if module.dora == "lycoris" and magnitude is not None and lycoris.dora_axis(magnitude.shape, info.shape) is None:
        problem = (
            f"dora_scale has shape {list(magnitude.shape)}, which is neither per output nor per input of the base "
            f"shape {list(info.shape)}"
        )
        return [Finding.against(magnitude.name, info.name, problem)]
    if module.factors:
        return _lycoris_findings(module, info)
    a, b = module.a, module.b
    groups = _conv_groups(module, info)
    if groups > 1:
        problem = f"the base is a grouped convolution (groups={groups}), which PEFT cannot merge either"
        return [Finding.against(a.name, info.name, problem)]
    problems = [
        Finding.against(factor.name, info.name, f"dtype {factor.dtype} is not floating point")
        for factor in (a, b)
        if not factor.is_float
    ]
    if not info.is_float:
        problems.append(Finding.against(a.name, info.name, f"base tensor has dtype {info.dtype}, not floating point"))
    if a.shape[0] != b.shape[1]:
        problem = f"lora_B has rank {b.shape[1]} but lora_A has rank {a.shape[0]}"
        problems.append(Finding.against(b.name, info.name, problem))
    elif a.shape[0] != module.rank * max(module.experts, 1):  # an experts module's A is (r·E, in)
        problems.append(
            Finding.against(a.name, info.name, f"has rank {a.shape[0]} but {rank_source} says {module.rank}")
        )
    return problems


def _lycoris_findings(module: LoraModule, info: TensorInfo) -> list[Finding]:
    """A LoHa / LoKr module's factors: floating point, consistent with each other, and a ΔW of W's shape."""
    problems = [
        Finding.against(f.name, info.name, f"dtype {f.dtype} is not floating point")
        for f in module.factors.values()
        if not f.is_float
    ]
    if not info.is_float:
        problem = f"base tensor has dtype {info.dtype}, not floating point"
        problems.append(Finding.against(module.a.name, info.name, problem))
    fit = lycoris.layout(module.kind, {role: f.shape for role, f in module.factors.items()})
    name = ALGORITHM_NAMES[module.kind]
    if fit.problem:
        problems.append(Finding.against(module.a.name, info.name, f"the {name} module {fit.problem}"))
    elif not lycoris.fits(fit.shape, info.shape):
        problem = f"the {name} ΔW is {list(fit.shape)}, which does not fit the base shape {list(info.shape)}"
        problems.append(Finding.against(module.a.name, info.name, problem))
    return problems


def orientation(module: LoraModule, info: TensorInfo, model_type: str | None) -> tuple[bool, str | None]:
    """(transpose, problem): whether ΔW is laid out transposed to fit W, or why it does not fit at all (a LyCORIS
    dora_scale is checked by factor_findings)."""
    if module.factors:  # LoHa / LoKr: checked in full by _lycoris_findings
        return False, None
    if module.kind == "conv":
        transpose, problem = False, _conv_problem(module, info)
    elif len(info.shape) != 2:
        return False, f"base tensor has shape {list(info.shape)}, not a matrix"
    elif module.kind == "embedding":  # W is (V, d), ΔW = (B @ A)ᵀ with A (r, V), B (d, r) (FORMATS.md §2.3)
        transpose = True
        want = (module.a.shape[1], module.b.shape[0])
        problem = None if info.shape == want else f"embedding LoRA gives {list(want)}, not {list(info.shape)}"
    else:
        transpose, problem = _linear(module, info, model_type)
    magnitude = module.magnitude
    if problem is None and magnitude is not None and module.dora == "peft":
        outputs = info.shape[1 if transpose else 0]
        if magnitude.numel != outputs:
            problem = f"DoRA magnitude {magnitude.name} has {magnitude.numel} values for {info.shape} outputs"
    return transpose, problem


def _conv_groups(module: LoraModule, info: TensorInfo) -> int:
    """The `groups` of a conv base, which the checkpoint does not store: PEFT gives A the layer's full input
    channels (r, in, *k) and B the layer's groups (out, r/groups, 1, …), while W is (out, in/groups, *k)."""
    a, b, w = module.a.shape, module.b.shape, info.shape
    if module.kind != "conv" or len(w) < 2 or len(b) < 2 or not w[1] or a[1] % w[1] or not b[1]:
        return 1
    groups = a[1] // w[1]
    return groups if groups > 1 and a[0] == b[1] * groups else 1


def _conv_problem(module: LoraModule, info: TensorInfo) -> str | None:
    """Why a ConvNd LoRA (A (r, in, *k), B (out, r, 1, …)) does not fit W (out, in, *k), if it does not."""
    a, b = module.a.shape, module.b.shape
    if len(info.shape) != len(a) or len(b) != len(a) or any(k != 1 for k in b[2:]):
        return f"conv LoRA factors {list(a)} and {list(b)} do not fit the base shape {list(info.shape)}"
    if info.shape != (b[0], *a[1:]):
        return f"B @ A gives {[b[0], *a[1:]]}, which does not fit the base shape {list(info.shape)}"
    return None


def _linear(module: LoraModule, info: TensorInfo, model_type: str | None) -> tuple[bool, str | None]:
    """Whether ΔW is transposed to fit W (FORMATS.md §2.2): by architecture when known, else by shape."""
    out_features, in_features = module.b.shape[0], module.a.shape[1]
    if model_type is not None:
        transpose = is_conv1d(model_type, module.module)
    elif out_features != in_features:
        transpose = info.shape == (in_features, out_features)
    else:
        transpose = module.fan_in_fan_out
    want = (in_features, out_features) if transpose else (out_features, in_features)
    if info.shape != want:
        layout = "(in, out) as a Conv1D" if transpose else "(out, in)"
        return (
            transpose,
            f"B @ A is {out_features}x{in_features}, which does not fit the base shape "
            f"{list(info.shape)} stored {layout}",
        )
    return transpose, None


def bias_target(names: BaseNames, module: str, bias: TensorInfo) -> tuple[TensorInfo | None, str]:
    """The base bias a lora_B bias is added to (FORMATS.md §2.6); PEFT refuses a layer without one."""
    found = names.named(module, "bias")
    if not found:
        return None, "lora_bias needs a bias in the base layer, and this layer has none (PEFT refuses it too)"
    info = names.tensors[found[0]]
    if info.shape != bias.shape:
        return None, f"lora_B.bias has shape {list(bias.shape)} but {info.name} has {list(info.shape)}"
    return info, ""


def source_problem(info: TensorInfo, tensor: TensorInfo, indices: tuple[int, ...] | None) -> str | None:
    """Why an adapter tensor cannot replace base tensor `info` (or set its rows `indices`), if it cannot."""
    if not tensor.is_float or not info.is_float:
        return f"replacing a {info.dtype} tensor with {tensor.dtype} values is not supported"
    if indices is None:
        if tensor.shape != info.shape:
            return (
                f"replacement has shape {list(tensor.shape)} but the base tensor has {list(info.shape)} "
                "(a resized vocabulary must be resized in the base first)"
            )
        return None
    if tensor.shape[1:] != info.shape[1:] or not all(0 <= i < info.shape[0] for i in indices):
        largest = max(indices, default=0)
        return f"trainable token rows {list(tensor.shape)} (largest index {largest}) do not fit {list(info.shape)}"
    return None


Placement = tuple[TensorInfo, bool, LoraModule, tuple[int, int] | None]


def place(
    names: BaseNames,
    adapter: Adapter,
    module: LoraModule,
    model_type: str | None,
    allow_nonfinite: bool,
) -> tuple[Placement | None, list[Finding]]:
    """The base tensor `module` changes, whether its delta is transposed, the module as it applies there (see
    BaseNames.view) and the rows it changes (None: all), or the findings against it (NaN/Inf in its factors are
    warnings with `allow_nonfinite`; then it is placed all the same)."""
    candidates = names.candidates(module)
    if not candidates:
        return None, [Finding.against(module.a.name, None, names.unmatched(module))]
    if len(candidates) > 1:
        return None, [
            Finding.against(module.a.name, None, f"target is ambiguous: {' and '.join(candidates)} both exist")
        ]
    info = names.tensors[candidates[0]]
    module, rows, unsplit = names.view(module, info)
    problems = [Finding.against(module.a.name, info.name, unsplit)] if unsplit else []
    problems = problems or factor_findings(module, info, adapter.rank_source)
    if problems:
        return None, problems
    shape = (rows[1] - rows[0], *info.shape[1:]) if rows else info.shape  # the factors must fit the rows they change
    fitted = info._replace(shape=shape, numel=math.prod(shape)) if rows else info
    transpose, problem = orientation(module, fitted, model_type)
    if problem:
        where = "" if rows is None else f" (rows {rows[0]}:{rows[1]} of the fused q/k/v tensor)"
        return None, [Finding.against(module.a.name, info.name, problem + where)]
    return (info, transpose, module, rows), nonfinite_findings(adapter, module, info, allow_nonfinite)


def nonfinite_findings(adapter: Adapter, module: LoraModule, info: TensorInfo, allow: bool) -> list[Finding]:
    """NaN/Inf in a factor (counted when the adapter was loaded) spreads over whole rows or columns of ΔW: an
    error, or with `allow` a warning."""
    problems = []
    for factor in tuple(module.factors.values()) or (module.a, module.b):
        bad = adapter.nonfinite.get(factor.name, 0)
        parts: tuple[Part, ...]
        if bad and allow:
            parts = (f"holds {bad} NaN/Inf values, merged anyway (", Option("allow_nonfinite", flag=True), ")")
            problems.append(Finding.against(factor.name, info.name, *parts, severity="warning"))
        elif bad:
            parts = (
                f"holds {bad} NaN/Inf values, which would spread over the result (",
                Option("allow_nonfinite", flag=True),
                " lets them)",
            )
            problems.append(Finding.against(factor.name, info.name, *parts))
    return problems
