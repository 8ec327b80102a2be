"""Plan: from headers (and the small factor tensors) to a flat list of per-tensor steps plus findings.

`check` and `--dry-run` are this module and nothing more. A step says which base tensor is written, in
which dtype, where its starting value comes from (the base, or an adapter's replacement tensor), and which
adapter terms are added to it; steps are in shard and file order, so the surgery reads each base file front
to back.

Replacement tensors (modules_to_save, saved embeddings, bias="all"/"lora_only", trainable-token rows) take
the base tensor's place: the output keeps the base tensor's name, shape and dtype (or --dtype), and the
adapter's values are rounded once into it; a shape that differs from the base's is an error. When the base
ties lm_head to the input embedding and the adapter changes either, the output unties them (FORMATS.md §4.1).
kohya modules are found by applying sd-scripts' naming rule to the base's tensor names, never by inverting it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from lorasurgeon import keys, linalg, lycoris, sd_names
from lorasurgeon.adapter import Adapter, LoraModule
from lorasurgeon.checkpoint import Checkpoint
from lorasurgeon.errors import Finding
from lorasurgeon.header import TensorInfo

DORA_UNMERGE = (
    "it is a DoRA module: the merged weight W' = (m/‖W+ΔW‖)·(W+ΔW) has every output row of norm m, so the "
    "per-row norms of the original W are gone and W cannot be recovered from the merged checkpoint"
)
KOHYA_UNMATCHED = (
    "no base tensor has this kohya name under sd-scripts' naming rule (applied to the base's own tensor names, to "
    "the diffusers and SAI names of its U-Net, and to the Hugging Face CLIP names of its text encoders)"
)


@dataclass(frozen=True)
class Term:
    """One adapter module's contribution to a step: factor · (B @ A), transposed for (in, out) weights.

    With `bias`, the step is the module's bias vector and the term adds factor · lora_B.bias to it. A module
    with a DoRA magnitude rescales the step's sum (the plan lets no other term share such a step). With `rows`
    (start, stop), ΔW changes only those rows of the step's tensor (q, k or v of a fused OpenCLIP in_proj_weight).
    `shape` is the changed tensor's (or rows'), in which a LyCORIS ΔW (rebuilt from flattened factors) is laid out.
    """

    adapter: int
    module: LoraModule
    factor: float
    transpose: bool
    bias: bool = False
    rows: tuple[int, int] | None = None
    shape: tuple[int, ...] = ()

    @property
    def dora(self) -> bool:
        return self.module.magnitude is not None and not self.bias


@dataclass(frozen=True)
class Source:
    """An adapter tensor whose values are written outright: the whole tensor, or the rows `indices` of it."""

    adapter: int
    tensor: TensorInfo
    indices: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Step:
    """Write `tensor` to output shard `shard` as `out_dtype`: its base value, or `replacement`'s, with `rows`
    set, plus `terms` (nothing at all: copy it unchanged). A `tensor` whose name the base lacks is an alias of
    a base tensor's bytes under a new name (an untied lm_head.weight)."""

    tensor: TensorInfo
    shard: str
    out_dtype: str
    terms: tuple[Term, ...]
    replacement: Source | None = None
    rows: tuple[Source, ...] = ()

    @property
    def touched(self) -> bool:
        return bool(self.terms or self.replacement or self.rows)


@dataclass(frozen=True)
class Plan:
    operation: str  # "merge" | "unmerge"
    base: Checkpoint
    adapters: tuple[Adapter, ...]
    weights: tuple[float, ...]
    steps: tuple[Step, ...]
    findings: tuple[Finding, ...]
    allow_nonfinite: bool = False  # NaN/Inf in inputs: warnings instead of errors
    config: dict[str, Any] | None = None  # the output config.json, when it must differ from the base's

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def changed(self) -> list[Step]:
        return [
            s
            for s in self.steps
            if s.touched or s.out_dtype != s.tensor.dtype or s.tensor.name not in self.base.tensors
        ]


@dataclass
class _Targets:
    """What the adapters do to each tensor name, gathered while planning (mutable only here)."""

    tensors: Mapping[str, TensorInfo]
    terms: dict[str, list[Term]]
    sources: dict[str, list[Source]]
    findings: list[Finding]
    kohya: dict[str, list[str]] | None = None  # kohya module name -> tensors, built when a kohya adapter comes

    def candidates(self, adapter: Adapter, module: LoraModule) -> list[str]:
        """The base tensors `module`'s weight may be: PEFT paths with and without the model prefix, kohya
        names by sd-scripts' forward rule (FORMATS.md §1.5, §5.2)."""
        if adapter.format == "kohya":
            if self.kohya is None:
                self.kohya = keys.kohya_names(self.tensors)
            return self.kohya.get(module.module, [])
        return [c for c in keys.tensor_candidates(module.module, "weight") if c in self.tensors]


def plan_surgery(
    operation: str,
    base: Checkpoint,
    adapters: Sequence[Adapter],
    weights: Sequence[float],
    scale: float = 1.0,
    dtype: str | None = None,
    allow_nonfinite: bool = False,
) -> Plan:
    """Resolve every adapter module onto one base tensor and check that it fits (FORMATS.md §1.5, §2.2-§2.7).

    `weights[i] * scale` multiplies adapter i's own LoRA scale; `dtype` (a safetensors dtype name)
    converts every floating-point tensor, None keeps each tensor's dtype. `allow_nonfinite` turns NaN/Inf
    in the adapter factors from errors into warnings (and lets the surgery carry those of the base).
    """
    alias = _tied_alias(base)
    tensors = {**base.tensors, alias.name: alias} if alias else base.tensors
    found = _Targets(tensors, {}, {}, _quantized_findings(base))
    model_type = (base.config or {}).get("model_type")
    for index, (adapter, weight) in enumerate(zip(adapters, weights, strict=True)):
        found.findings += [_ignored(adapter, key) for key in adapter.ignored]
        if not (adapter.modules or adapter.replacements or adapter.token_rows):
            found.findings.append(Finding("error", f"{adapter.path}: the adapter selects no module to change"))
        skipped = _components_skipped(found, adapter)
        found.findings += skipped.values()
        for module in adapter.modules:
            if module.module not in skipped:
                _add_module(found, index, adapter, module, weight * scale, model_type, allow_nonfinite)
        _add_sources(found, index, adapter)
    found.findings += _combination_findings(operation, found)
    config, alias_used, untie = _untie(base, alias, found)
    steps = _steps(base, found, dtype, alias if alias_used else None)
    findings = (*found.findings, *untie)
    return Plan(operation, base, tuple(adapters), tuple(weights), steps, findings, allow_nonfinite, config)


def _add_module(
    found: _Targets,
    index: int,
    adapter: Adapter,
    module: LoraModule,
    weight: float,
    model_type: str | None,
    allow_nonfinite: bool,
) -> None:
    """Resolve one module's weight (and lora_B bias) target and record its terms, or the findings against it."""
    target, problems = _resolve(found, adapter, module, model_type, allow_nonfinite)
    found.findings += problems
    if target is None or any(p.severity == "error" for p in problems):
        return
    info, transpose, module, rows = target
    if any(t.adapter == index and _overlap(t.rows, rows) for t in found.terms.get(info.name, [])):
        found.findings.append(_error(module.a.name, info.name, "a second module of the adapter changes it too"))
        return
    shape = info.shape if rows is None else (rows[1] - rows[0], *info.shape[1:])
    term = Term(index, module, weight * module.scale, transpose, rows=rows, shape=shape)
    found.terms.setdefault(info.name, []).append(term)
    if module.bias is not None:
        bias, problem = _bias_target(found.tensors, module.module, module.bias)
        if bias is None:
            found.findings.append(_error(module.bias.name, info.name, problem))
        else:
            found.terms.setdefault(bias.name, []).append(Term(index, module, weight * module.scale, False, True))


def _overlap(rows: tuple[int, int] | None, other: tuple[int, int] | None) -> bool:
    """Whether two terms change common rows of one tensor (None: all of them)."""
    return rows is None or other is None or (rows[0] < other[1] and other[0] < rows[1])


def _bias_target(tensors: Mapping[str, TensorInfo], module: str, bias: TensorInfo) -> tuple[TensorInfo | None, str]:
    """The base bias a lora_B bias is added to (FORMATS.md §2.6); PEFT refuses a layer without one."""
    names = [c for c in keys.tensor_candidates(module, "bias") if c in tensors]
    if not names:
        return None, "lora_bias needs a bias in the base layer, and this layer has none (PEFT refuses it too)"
    info = tensors[names[0]]
    if info.shape != bias.shape:
        return None, f"lora_B.bias has shape {list(bias.shape)} but {info.name} has {list(info.shape)}"
    return info, ""


def _components_skipped(found: _Targets, adapter: Adapter) -> dict[str, Finding]:
    """kohya and diffusers modules of a pipeline component the base does not hold (the text encoder's, when
    BASE is `unet/`): skipped with a warning each. In a single-file SD/SDXL checkpoint every component is present,
    and a module that matches nothing is an error, as is every module when none matches."""
    if adapter.format not in ("kohya", "diffusers"):
        return {}
    if adapter.format == "kohya" and any(n.startswith("model.diffusion_model.") for n in found.tensors):
        return {}
    component = keys.kohya_component if adapter.format == "kohya" else lambda m: m.partition(".")[0]
    present = {component(m.module) for m in adapter.modules if found.candidates(adapter, m)}
    if not present:
        return {}
    return {
        m.module: Finding(
            "warning", f"{m.a.name}: the base holds no {component(m.module)} modules, so it is skipped", m.a.name
        )
        for m in adapter.modules
        if component(m.module) not in present
    }


def _add_sources(found: _Targets, index: int, adapter: Adapter) -> None:
    """Record the adapter's replacement tensors and trainable-token rows against the base tensors they set."""
    wanted: list[tuple[str, str, TensorInfo, tuple[int, ...] | None]]
    wanted = [(r.module, r.param, r.tensor, None) for r in adapter.replacements]
    wanted += [(t.module, "weight", t.tensor, t.indices) for t in adapter.token_rows]
    for module, param, tensor, indices in wanted:
        names = [c for c in keys.tensor_candidates(module, param) if c in found.tensors]
        if not names:
            found.findings.append(_error(tensor.name, None, f"it sets {module}.{param}, which is not in the base"))
            continue
        info = found.tensors[names[0]]
        problem = _source_problem(info, tensor, indices)
        if problem:
            found.findings.append(_error(tensor.name, info.name, problem))
        else:
            found.sources.setdefault(info.name, []).append(Source(index, tensor, indices))
    found.findings += _unsaved(found, index, adapter)


def _unsaved(found: _Targets, index: int, adapter: Adapter) -> list[Finding]:
    """modules_to_save parameters the file lacks: PEFT >= 0.15 fails to load such an adapter (FORMATS.md §4.3).

    PEFT wraps every module whose path ends with an entry (a plain string suffix, no dot boundary).
    """
    saved = adapter.config.get("modules_to_save") or []
    saved = [saved] if isinstance(saved, str) else saved
    set_here = {name for name, sources in found.sources.items() if any(s.adapter == index for s in sources)}
    problem = "it is in modules_to_save but the adapter holds no tensor for it, so PEFT cannot load the adapter"
    return [
        _error(str(adapter.path), name, problem)
        for name in found.tensors
        if name not in set_here and any(name.rpartition(".")[0].endswith(str(e)) for e in saved)
    ]


def _source_problem(info: TensorInfo, tensor: TensorInfo, indices: tuple[int, ...] | None) -> str | None:
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


def _combination_findings(operation: str, found: _Targets) -> list[Finding]:
    """What cannot be combined on one tensor, or cannot be undone (FORMATS.md §2.7, §3, §4.5)."""
    problems = []
    for name, sources in found.sources.items():
        if operation == "unmerge":
            problem = "unmerge cannot restore it: the adapter holds its new values, not the original ones"
            problems += [_error(s.tensor.name, name, problem) for s in sources]
        elif len(sources) > 1 and not _disjoint_rows(sources):
            problems.append(_error(sources[1].tensor.name, name, "another adapter already sets these values"))
        elif any(s.indices is not None for s in sources) and name in found.terms:
            problem = "trainable token rows and a LoRA on the same tensor cannot be merged in a defined order"
            problems.append(_error(sources[0].tensor.name, name, problem))
    for name, terms in found.terms.items():
        dora = next((t for t in terms if t.dora), None)
        if dora is None:
            continue
        key = dora.module.a.name
        if operation == "unmerge":
            problems.append(_error(key, name, f"DoRA cannot be unmerged: {DORA_UNMERGE}"))
        elif len([t for t in terms if not t.bias]) > 1:
            problems.append(_error(key, name, "a DoRA module must be the only adapter changing its weight"))
        elif abs(dora.factor - dora.module.scale) > 1e-12 * abs(dora.module.scale):
            problems.append(_error(key, name, "a DoRA module can only be merged with weight 1 and scale 1"))
    return problems


def _disjoint_rows(sources: list[Source]) -> bool:
    """True when the sources only set rows, and no row twice (a whole replacement conflicts with anything)."""
    if any(s.indices is None for s in sources):
        return False
    rows = [i for s in sources for i in s.indices or ()]
    return len(rows) == len(set(rows))


def _tied_alias(base: Checkpoint) -> TensorInfo | None:
    """lm_head.weight as an alias of the input embedding's bytes, when the base ties them and stores only the
    embedding (transformers' default for tied models); None when lm_head is stored or nothing is tied."""
    if base.config is None or not base.config.get("tie_word_embeddings", True):
        return None
    embed = keys.input_embedding(base.tensors)
    if embed is None or keys.OUTPUT_EMBEDDING in base.tensors:
        return None
    return base.tensors[embed]._replace(name=keys.OUTPUT_EMBEDDING)


def _untie(
    base: Checkpoint, alias: TensorInfo | None, found: _Targets
) -> tuple[dict[str, Any] | None, bool, list[Finding]]:
    """(output config, whether the lm_head alias is written, warning) for a tied base (FORMATS.md §4.1).

    PEFT's adapter changes the input and output embeddings separately (only trainable-token rows stay tied),
    so when it changes either, the output stores both and sets tie_word_embeddings false; otherwise
    transformers would re-tie them on load and lose one of the two.
    """
    if base.config is None or not base.config.get("tie_word_embeddings", True):
        return None, False, []
    embed = keys.input_embedding(base.tensors)
    if embed is None:
        return None, False, []
    names = [n for n in (embed, keys.OUTPUT_EMBEDDING) if n in found.terms or _replaced(found, n)]
    if not names:
        return None, False, []
    if alias is not None:  # trainable-token rows are tied in PEFT: the new lm_head gets them too
        rows = [s for s in found.sources.get(embed, []) if s.indices is not None]
        found.sources.setdefault(alias.name, []).extend(rows)
    message = (
        f"{embed} and {keys.OUTPUT_EMBEDDING}: the base ties them and the adapter changes {' and '.join(names)}; "
        f"the output stores {keys.OUTPUT_EMBEDDING} as its own tensor and sets tie_word_embeddings to false "
        "in config.json, so both keep the values the adapter gives them"
    )
    finding = Finding("warning", message, None, names[0])
    return {**base.config, "tie_word_embeddings": False}, alias is not None, [finding]


def _replaced(found: _Targets, name: str) -> bool:
    return any(s.indices is None for s in found.sources.get(name, []))


def _steps(base: Checkpoint, found: _Targets, dtype: str | None, alias: TensorInfo | None) -> tuple[Step, ...]:
    """One step per base tensor in shard and file order; an untied lm_head follows its embedding."""
    steps = []
    for shard in base.shards:
        for info in shard.header.tensors:
            for tensor in (info, alias) if alias and _same_bytes(info, alias) else (info,):
                sources = found.sources.get(tensor.name, [])
                whole = next((s for s in sources if s.indices is None), None)
                rows = tuple(s for s in sources if s.indices is not None)
                out_dtype = dtype if dtype and tensor.is_float else tensor.dtype
                terms = tuple(found.terms.get(tensor.name, ()))
                steps.append(Step(tensor, shard.name, out_dtype, terms, whole, rows))
    return tuple(steps)


def _same_bytes(info: TensorInfo, alias: TensorInfo) -> bool:
    return (info.path, info.start) == (alias.path, alias.start)


def _quantized_findings(base: Checkpoint) -> list[Finding]:
    """A quantized base cannot take an exact merge (FORMATS.md §2.11): refused, naming what shows it."""
    method = (base.config or {}).get("quantization_config")
    if method is not None:
        kind = method.get("quant_method", "unknown") if isinstance(method, dict) else "unknown"
        return [
            Finding(
                "error",
                f"{base.root / 'config.json'}: the base is quantized (quantization_config, {kind}); merging "
                "into quantized weights is not exact: merge into the original unquantized checkpoint",
            )
        ]
    for info in base:
        part = keys.quantized_part(info.name)
        if part:
            message = (
                f"{info.path.name}: {info.name} is a quantizer's {part!r} tensor, so the base is quantized; "
                "merging into quantized weights is not exact: merge into the original unquantized checkpoint"
            )
            return [Finding("error", message, None, info.name)]
    return []


def _error(adapter_key: str, base_key: str | None, problem: str) -> Finding:
    where = f"{adapter_key} -> {base_key}" if base_key else adapter_key
    return Finding("error", f"{where}: {problem}", adapter_key, base_key)


def _ignored(adapter: Adapter, key: str) -> Finding:
    return Finding(
        "warning",
        f"{key}: its module is not selected by the adapter config, so PEFT ignores it and so does lorasurgeon",
        key,
    )


def _resolve(
    found: _Targets,
    adapter: Adapter,
    module: LoraModule,
    model_type: str | None,
    allow_nonfinite: bool,
) -> tuple[tuple[TensorInfo, bool, LoraModule, tuple[int, int] | None] | None, list[Finding]]:
    """The base tensor `module` changes, whether its delta is transposed, the module as it applies there (see
    `_kohya_view`) and the rows it changes (None: all), or the findings against it."""
    candidates = found.candidates(adapter, module)
    if not candidates and adapter.format == "kohya":
        return None, [_error(module.a.name, None, KOHYA_UNMATCHED)]
    if not candidates:
        return None, [_error(module.a.name, None, f"target {module.target} is not in the base checkpoint")]
    if len(candidates) > 1:
        return None, [_error(module.a.name, None, f"target is ambiguous: {' and '.join(candidates)} both exist")]
    info = found.tensors[candidates[0]]
    module, rows, unsplit = _kohya_view(adapter, module, info)
    problems = [_error(module.a.name, info.name, unsplit)] if unsplit else _factor_findings(adapter, module, info)
    if problems:
        return None, problems
    shape = (rows[1] - rows[0], *info.shape[1:]) if rows else info.shape  # the factors must fit the rows they change
    fitted = info._replace(shape=shape, numel=math.prod(shape)) if rows else info
    transpose, problem = _fit(module, fitted, model_type, kohya=adapter.format == "kohya")
    if problem:
        where = "" if rows is None else f" (rows {rows[0]}:{rows[1]} of the fused q/k/v tensor)"
        return None, [_error(module.a.name, info.name, problem + where)]
    return (info, transpose, module, rows), _nonfinite_findings(adapter, module, info, allow_nonfinite)


def _kohya_view(
    adapter: Adapter, module: LoraModule, info: TensorInfo
) -> tuple[LoraModule, tuple[int, int] | None, str]:
    """How a kohya module meets its tensor (FORMATS.md §5.2, §5.3): 1×1 conv factors on a Linear base are used as
    matrices (sd-scripts merges an SD1 conv proj_in LoRA into SD2/SDXL's Linear proj_in so), and a q/k/v module on a
    fused OpenCLIP in_proj_weight changes its third of the rows; the problem, when the tensor does not split."""
    if adapter.format != "kohya" or not info.shape:
        return module, None, ""
    pointwise = all(k == 1 for k in (*module.a.shape[2:], *module.b.shape[2:]))
    if module.kind == "conv" and len(info.shape) == 2 and pointwise:
        module = replace(module, kind="linear")
    rows = sd_names.fused_rows(module.module, info.name, info.shape[0])
    if rows is not None and info.shape[0] % 3:
        return module, None, f"a fused q/k/v tensor of {info.shape[0]} rows does not split into three equal parts"
    return module, rows, ""


def _factor_findings(adapter: Adapter, module: LoraModule, info: TensorInfo) -> list[Finding]:
    magnitude = module.magnitude
    if adapter.format == "kohya" and magnitude is not None and lycoris.dora_axis(magnitude.shape, info.shape) is None:
        problem = (
            f"dora_scale has shape {list(magnitude.shape)}, which is neither per output nor per input of the base "
            f"shape {list(info.shape)}"
        )
        return [_error(magnitude.name, info.name, problem)]
    if module.factors:
        return _lycoris_findings(module, info)
    a, b = module.a, module.b
    groups = _conv_groups(module, info)
    if groups > 1:
        return [
            _error(
                a.name,
                info.name,
                f"the base is a grouped convolution (groups={groups}), which PEFT cannot merge either",
            )
        ]
    problems = []
    for factor in (a, b):
        if not factor.is_float:
            problems.append(_error(factor.name, info.name, f"dtype {factor.dtype} is not floating point"))
    if not info.is_float:
        problems.append(_error(a.name, info.name, f"base tensor has dtype {info.dtype}, not floating point"))
    if a.shape[0] != b.shape[1]:
        problems.append(_error(b.name, info.name, f"lora_B has rank {b.shape[1]} but lora_A has rank {a.shape[0]}"))
    elif a.shape[0] != module.rank:
        source = "adapter_config.json" if adapter.config else "the command line"
        problems.append(_error(a.name, info.name, f"has rank {a.shape[0]} but {source} says {module.rank}"))
    return problems


def _lycoris_findings(module: LoraModule, info: TensorInfo) -> list[Finding]:
    """A LoHa / LoKr module's factors: floating point, consistent with each other, and a ΔW of W's shape."""
    problems = [
        _error(f.name, info.name, f"dtype {f.dtype} is not floating point")
        for f in module.factors.values()
        if not f.is_float
    ]
    if not info.is_float:
        problems.append(_error(module.a.name, info.name, f"base tensor has dtype {info.dtype}, not floating point"))
    fit = lycoris.layout(module.kind, {role: f.shape for role, f in module.factors.items()})
    name = {"loha": "LoHa", "lokr": "LoKr", "locon-tucker": "Tucker LoCon"}[module.kind]
    if fit.problem:
        problems.append(_error(module.a.name, info.name, f"the {name} module {fit.problem}"))
    elif not lycoris.fits(fit.shape, info.shape):
        problem = f"the {name} ΔW is {list(fit.shape)}, which does not fit the base shape {list(info.shape)}"
        problems.append(_error(module.a.name, info.name, problem))
    return problems


def _fit(module: LoraModule, info: TensorInfo, model_type: str | None, kohya: bool) -> tuple[bool, str | None]:
    """(transpose, problem): whether ΔW is laid out transposed to fit W, or why it does not fit at all (a kohya
    dora_scale is checked by _factor_findings)."""
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
        transpose, problem = _orientation(module, info, model_type)
    magnitude = module.magnitude
    if problem is None and magnitude is not None and not kohya and magnitude.numel != info.shape[1 if transpose else 0]:
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


def _orientation(module: LoraModule, info: TensorInfo, model_type: str | None) -> tuple[bool, str | None]:
    """Whether ΔW is transposed to fit W (FORMATS.md §2.2): by architecture when known, else by shape."""
    out_features, in_features = module.b.shape[0], module.a.shape[1]
    if model_type is not None:
        transpose = keys.is_conv1d(model_type, module.module)
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


def _nonfinite_findings(adapter: Adapter, module: LoraModule, info: TensorInfo, allow: bool) -> list[Finding]:
    """NaN/Inf in a factor spreads over whole rows or columns of ΔW: an error, or with `allow` a warning."""
    problems = []
    for factor in tuple(module.factors.values()) or (module.a, module.b):
        values = adapter.source.read(factor).float()
        bad = 0 if linalg.fits(values, torch.float32) else linalg.nonfinite_count(values)  # count only on failure
        if bad and allow:
            message = f"{factor.name} -> {info.name}: holds {bad} NaN/Inf values, merged anyway (--allow-nonfinite)"
            problems.append(Finding("warning", message, factor.name, info.name))
        elif bad:
            message = f"holds {bad} NaN/Inf values, which would spread over the result (--allow-nonfinite lets them)"
            problems.append(_error(factor.name, info.name, message))
    return problems
