"""Extract a LoRA adapter from a full fine-tune: per matrix ΔW = W_tuned − W_base, truncated SVD, PEFT directory.

Flow: `plan_extract` pairs the two checkpoints' tensors by name from their headers (nothing read, every
mismatch a finding); `decompose_pairs` then reads one matrix pair at a time, forms ΔW in fp32 on the device,
factorises it as B·A = U_r·diag(σ_r)·V_rᵀ with √σ in each factor, and keeps only the small factors;
`write_adapter` publishes the adapter directory atomically (shared FORMATS.md §6.4).

SVD methods, and the error each guarantees (error = ‖ΔW − B·A‖_F, measured on the factors written):
- exact: torch.linalg.svd, the Eckart–Young optimum √(Σ_{i>r} σ_i²).
- randomized: a Gaussian range finder of r + max(r, 16) columns, refined by power iterations until one more
  lowers the rank-r error² by less than 0.1 % (`linalg.randomized_svd`), at most 12; a matrix that has not
  converged by then falls back to exact. Convergence of subspace iteration is geometric, so the 0.1 % test
  bounds what is left to gain: measured ≤ 1.001 × the optimum on power-law spectra (tests/test_extract.py,
  bench/results/extract.md), where one iteration without oversampling misses it by 5-16 %.
- auto: exact for small matrices (min(m, n) ≤ 1024, where it takes milliseconds), when the sketch would
  span more than a quarter of min(m, n), or for --energy without --max-rank (the rank is unbounded);
  randomized otherwise.
"""

from __future__ import annotations

import fnmatch
import json
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorasurgeon import keys, linalg
from lorasurgeon.checkpoint import Checkpoint
from lorasurgeon.errors import (
    Finding,
    LorasurgeonError,
    MismatchError,
    NothingChangedError,
    NumericError,
    UnsupportedError,
)
from lorasurgeon.header import TensorInfo, dtype_name
from lorasurgeon.surgery import Progress
from lorasurgeon.writer import CheckpointWriter

METHODS = ("auto", "exact", "randomized")
# Module names that are nn.Embedding in transformers models: decomposed only with --include-embeddings.
EMBEDDINGS = frozenset(
    {"embed_tokens", "wte", "wpe", "word_embeddings", "embed_in", "shared", "position_embeddings", "embed_positions"}
)
# Output heads and classifiers: Linear, but left out by default, as PEFT's "all-linear" leaves them out.
HEADS = frozenset({"lm_head", "embed_out", "score", "classifier", "qa_outputs"})
EXACT_BELOW = 1024
MAX_POWER_ITERS, CONVERGENCE_TOL = 12, 1e-3
WEIGHTS_NAME, CONFIG_NAME = "adapter_model.safetensors", "adapter_config.json"


@dataclass(frozen=True)
class ExtractOptions:
    """What to extract and how; `validate` names the first bad option."""

    rank: int | None = None
    energy: float | None = None
    max_rank: int | None = None
    alpha: float | None = None
    method: str = "auto"
    targets: tuple[str, ...] = ()
    include_embeddings: bool = False
    skip_mismatched: bool = False
    curve: tuple[int, ...] = ()
    save_changed_vectors: bool = False
    seed: int = 0

    def validate(self, dry_run: bool) -> None:
        if (self.rank is None) == (self.energy is None) and not (self.curve and dry_run and self.energy is None):
            raise LorasurgeonError("give exactly one of --rank R or --energy F (or --curve with --dry-run)")
        if self.rank is not None and self.rank < 1:
            raise LorasurgeonError(f"--rank {self.rank}: must be at least 1")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise LorasurgeonError(f"--energy {self.energy}: must be in (0, 1]")
        if self.max_rank is not None and (self.energy is None or self.max_rank < 1):
            raise LorasurgeonError(f"--max-rank {self.max_rank}: needs --energy and must be at least 1")
        if self.method not in METHODS:
            raise LorasurgeonError(f"--method {self.method}: expected one of {', '.join(METHODS)}")
        if any(r < 1 for r in self.curve):
            raise LorasurgeonError(f"--curve {','.join(map(str, self.curve))}: ranks must be at least 1")
        if self.alpha is not None and not self.alpha > 0:
            raise LorasurgeonError(f"--alpha {self.alpha}: must be positive")
        self._validate_targets()

    def _validate_targets(self) -> None:
        for pattern in self.targets:
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as e:
                    raise LorasurgeonError(f"--target {pattern!r}: not a valid regular expression ({e})") from None

    def sketch_rank(self, shape: tuple[int, int]) -> int:
        """How many singular triplets to compute for a matrix: the rank bound, the curve's largest rank."""
        bound = self.rank or self.max_rank or min(shape)
        return min(max(bound, *self.curve), min(shape)) if self.curve else min(bound, min(shape))


@dataclass(frozen=True)
class Pair:
    """One target matrix: its module path, how PEFT holds it, and the two tensors it is the difference of."""

    module: str
    kind: str  # "linear" | "embedding"
    transpose: bool  # stored (in, out): decompose ΔWᵀ (transformers Conv1D, embeddings)
    base: TensorInfo
    tuned: TensorInfo


@dataclass(frozen=True)
class ExtractPlan:
    base: Checkpoint
    tuned: Checkpoint
    pairs: tuple[Pair, ...]
    others: tuple[tuple[TensorInfo, TensorInfo], ...]  # same name and shape, not targets: compared only
    findings: tuple[Finding, ...]


@dataclass(frozen=True)
class MatrixResult:
    """One extracted matrix: its rank, how it was computed, and how much of ΔW the factors keep."""

    module: str
    tensor: str
    kind: str
    shape: tuple[int, ...]
    rank: int
    method: str  # "exact" | "randomized" | "exact (fallback)"
    energy: float  # captured fraction of ‖ΔW‖²_F
    error: float  # ‖ΔW − B·A‖_F / ‖ΔW‖_F, measured
    norm: float  # ‖ΔW‖_F
    curve: tuple[float, ...] = ()  # relative error at each --curve rank
    spectrum: tuple[float, ...] = field(default=(), repr=False)  # the singular values computed

    @property
    def adapter_params(self) -> int:
        return self.rank * (self.shape[0] + self.shape[1])


@dataclass(frozen=True)
class ChangedTensor:
    """A tensor that differs between BASE and TUNED but is not in the adapter (norms, biases, heads)."""

    name: str
    shape: tuple[int, ...]
    max_change: float


def plan_extract(base: Checkpoint, tuned: Checkpoint, options: ExtractOptions) -> ExtractPlan:
    """Pair tensors by name from the headers. Raises MismatchError for a name on one side only or differing
    shapes (warnings with `skip_mismatched`), UnsupportedError for a --target that is not a 2-D float weight."""
    findings: list[Finding] = []
    pairs: list[Pair] = []
    others: list[tuple[TensorInfo, TensorInfo]] = []
    model_type = (base.config or tuned.config or {}).get("model_type")
    for name in sorted(base.tensors.keys() | tuned.tensors.keys()):
        b, t = base.tensors.get(name), tuned.tensors.get(name)
        problem = _pair_problem(base, tuned, name, b, t)
        if problem or b is None or t is None:
            findings.append(Finding("warning" if options.skip_mismatched else "error", problem, base_key=name))
            continue
        kind = _target_kind(name, b, options)
        if kind is None:
            others.append((b, t))
            continue
        module = name.removesuffix(".weight")
        transpose = kind == "embedding" or keys.is_conv1d(model_type, module)
        pairs.append(Pair(module, kind, transpose, b, t))
    errors = [f for f in findings if f.severity == "error"]
    if errors:
        more = f" (and {len(errors) - 1} more; --skip-mismatched skips them)" if len(errors) > 1 else ""
        raise MismatchError(errors[0].message + more)
    _check_pairs(tuned, pairs, options)
    return ExtractPlan(base, tuned, tuple(pairs), tuple(others), tuple(findings))


def _pair_problem(base: Checkpoint, tuned: Checkpoint, name: str, b: TensorInfo | None, t: TensorInfo | None) -> str:
    if b is None:
        return f"{tuned.path}: tensor {name!r} is not in BASE {base.path}"
    if t is None:
        return f"{base.path}: tensor {name!r} is not in TUNED {tuned.path}"
    if b.shape != t.shape:
        return f"{tuned.path}: tensor {name!r} has shape {list(t.shape)} but {list(b.shape)} in BASE {base.path}"
    return ""


def _target_kind(name: str, info: TensorInfo, options: ExtractOptions) -> str | None:
    """ "linear", "embedding" or None (not a target), by --target patterns or the default rule."""
    module = name.removesuffix(".weight")
    leaf = module.rpartition(".")[2]
    is_matrix = name.endswith(".weight") and len(info.shape) == 2 and info.is_float
    if leaf in EMBEDDINGS and is_matrix:
        if options.include_embeddings:
            return "embedding"
        if any(_matches(p, module) for p in options.targets):
            raise UnsupportedError(f"{info.path}: {name} is an embedding; pass --include-embeddings to extract it")
        return None
    if options.targets:
        if not any(_matches(p, module) for p in options.targets) or not name.endswith(".weight"):
            return None
        if not is_matrix:
            raise UnsupportedError(
                f"{info.path}: --target selects {name}, of shape {list(info.shape)} and dtype {info.dtype}; "
                "only 2-D floating-point weights can be extracted as LoRA"
            )
        return "linear"
    return "linear" if is_matrix and leaf not in HEADS else None


def _matches(pattern: str, module: str) -> bool:
    """`re:REGEX` is a full match of the module path; anything else is a shell glob (fnmatch) on it."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], module) is not None
    return fnmatch.fnmatchcase(module, pattern)


def _check_pairs(tuned: Checkpoint, pairs: list[Pair], options: ExtractOptions) -> None:
    if not pairs:
        chosen = f"--target {' '.join(options.targets)}" if options.targets else "the default rule (2-D linear weights)"
        raise MismatchError(f"{tuned.path}: no tensor is selected by {chosen}; nothing to extract")
    for pair in pairs:
        limit = min(pair.base.shape)
        if options.rank is not None and options.rank > limit:
            raise MismatchError(
                f"{pair.tuned.path}: --rank {options.rank} exceeds min(out, in) = {limit} of {pair.tuned.name} "
                f"(shape {list(pair.base.shape)}); the largest rank it has is {limit}"
            )


def decompose_pairs(
    plan: ExtractPlan,
    options: ExtractOptions,
    device: torch.device,
    on_progress: Callable[[Progress], None] | None = None,
) -> tuple[list[MatrixResult], dict[str, torch.Tensor], list[ChangedTensor]]:
    """Read one pair at a time and decompose it; returns (results, PEFT-keyed fp32 factors, other changes).

    Targets whose ΔW is zero are left out of both. Raises NothingChangedError when every target is unchanged.
    """
    generator = torch.Generator(device=device).manual_seed(options.seed)
    results: list[MatrixResult] = []
    factors: dict[str, torch.Tensor] = {}
    total = len(plan.pairs) + len(plan.others)
    work = sum(p.base.nbytes + p.tuned.nbytes for p in plan.pairs)
    work += sum(b.nbytes + t.nbytes for b, t in plan.others)
    done = 0
    for index, pair in enumerate(plan.pairs):
        delta = read_delta(plan, pair.base, pair.tuned, device)
        if pair.transpose:
            delta = delta.T.contiguous()  # (in, out) -> (out, in): PEFT's A is (r, in), B is (out, r)
        if torch.any(delta):
            result, b, a = decompose(pair, delta, options, generator)
            results.append(result)
            factors.update(peft_factors(pair, b, a))
        del delta
        done += pair.base.nbytes + pair.tuned.nbytes
        if on_progress:
            on_progress(Progress(index + 1, total, done, work))
    changed = _changed_others(plan, device, on_progress, (len(plan.pairs), total, done, work))
    if not results:
        differ = f"; only {len(changed)} other tensors differ (e.g. {changed[0].name})" if changed else ""
        raise NothingChangedError(
            f"{plan.tuned.path}: every target matrix equals BASE {plan.base.path}, so there is nothing to "
            f"extract{differ}"
        )
    return results, factors, changed


def read_delta(plan: ExtractPlan, base: TensorInfo, tuned: TensorInfo, device: torch.device) -> torch.Tensor:
    """W_tuned − W_base in fp32 on `device` (subtracted in fp32, never in the stored dtype)."""
    delta = plan.tuned.read(tuned).to(device=device, dtype=torch.float32)
    delta -= plan.base.read(base).to(device=device, dtype=torch.float32)
    if not bool(torch.isfinite(delta).all()):
        raise NumericError(f"{tuned.path}: {tuned.name} − BASE holds NaN or Inf values; cannot extract it")
    return delta


def decompose(
    pair: Pair, delta: torch.Tensor, options: ExtractOptions, generator: torch.Generator
) -> tuple[MatrixResult, torch.Tensor, torch.Tensor]:
    """Factorise one (out, in) delta: (result, B (out, r), A (r, in)) on the CPU, with B @ A ≈ ΔW."""
    shape = (delta.shape[0], delta.shape[1])
    norm = float(torch.linalg.matrix_norm(delta).item())
    u, s, vh, method = svd(delta, options, options.sketch_rank(shape), generator)
    if options.rank is not None:
        rank = options.rank
    elif options.energy is not None:
        rank = min(linalg.energy_rank(s, norm**2, options.energy), options.max_rank or len(s))
    else:  # --curve --dry-run without a rank: report the largest curve rank
        rank = min(max(options.curve), len(s))
    b, a = linalg.split_factors(u, s, vh, rank, 1.0)  # scale 1 here; write_adapter folds lora_alpha / r in
    residual = float(torch.linalg.matrix_norm(torch.addmm(delta, b, a, alpha=-1.0)).item())
    error = residual / norm
    result = MatrixResult(
        module=pair.module,
        tensor=pair.tuned.name,
        kind=pair.kind,
        shape=shape,
        rank=rank,
        method=method,
        energy=1.0 - error**2,
        error=error,
        norm=norm,
        curve=tuple(linalg.relative_errors(s, norm**2, list(options.curve), complete=len(s) == min(shape))),
        spectrum=tuple(s.tolist()),
    )
    return result, b.cpu(), a.cpu()


def svd(
    delta: torch.Tensor, options: ExtractOptions, sketch: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """(U, σ, Vᵀ, method used), by --method and the rule in the module docstring."""
    oversample = max(sketch, 16)
    method = options.method
    if method == "auto":
        small = min(delta.shape) <= EXACT_BELOW or 4 * (sketch + oversample) > min(delta.shape)
        unbounded = options.energy is not None and options.max_rank is None
        method = "exact" if small or unbounded else "randomized"
    if method == "randomized" and sketch < min(delta.shape):
        u, s, vh, converged = linalg.randomized_svd(
            delta, sketch, oversample, MAX_POWER_ITERS, CONVERGENCE_TOL, generator
        )
        if converged:
            return u, s, vh, "randomized"
        method = "exact (fallback)"
    u, s, vh = linalg.exact_svd(delta)
    return u, s, vh, "exact" if method == "randomized" else method


def peft_factors(pair: Pair, b: torch.Tensor, a: torch.Tensor) -> dict[str, torch.Tensor]:
    """PEFT's on-disk keys (FORMATS.md §1.4) for one module's factors."""
    prefix = f"{keys.PEFT_PREFIX}{pair.module}"
    if pair.kind == "embedding":  # A (r, V), B (d, r) decompose ΔWᵀ, which is (d, V)
        return {f"{prefix}.lora_embedding_A": a.contiguous(), f"{prefix}.lora_embedding_B": b.contiguous()}
    return {f"{prefix}.lora_A.weight": a.contiguous(), f"{prefix}.lora_B.weight": b.contiguous()}


def _changed_others(
    plan: ExtractPlan,
    device: torch.device,
    on_progress: Callable[[Progress], None] | None,
    counts: tuple[int, int, int, int],
) -> list[ChangedTensor]:
    index, total, done, work = counts
    changed = []
    for b, t in plan.others:
        old, new = plan.base.read(b), plan.tuned.read(t)
        if old.dtype == new.dtype and torch.equal(old, new):  # the common case, decided without fp32 copies
            diff = 0.0
        elif b.is_float and t.is_float and t.numel:
            diff = float((new.to(device, torch.float32) - old.to(device, torch.float32)).abs().max().item())
        else:
            diff = 1.0
        del old, new
        if diff:
            changed.append(ChangedTensor(t.name, t.shape, float(diff)))
        index, done = index + 1, done + b.nbytes + t.nbytes
        if on_progress:
            on_progress(Progress(index, total, done, work))
    return changed


def adapter_config(
    plan: ExtractPlan, results: list[MatrixResult], options: ExtractOptions, saved_modules: list[str]
) -> dict[str, Any]:
    """adapter_config.json with long-standing keys only (FORMATS.md §6.4): scale alpha/r the same everywhere."""
    ranks = Counter(r.rank for r in results)
    default_rank = options.rank or ranks.most_common(1)[0][0]
    scale = 1.0 if options.alpha is None else options.alpha / default_rank  # alpha / r, the same for every module
    config = plan.base.config or plan.tuned.config or {}
    architectures = config.get("architectures") or []
    causal = any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    name = config.get("_name_or_path")
    others = [r for r in results if r.rank != default_rank]
    return {
        "alpha_pattern": {r.module: _number(scale * r.rank) for r in others},
        "base_model_name_or_path": name if isinstance(name, str) and name else None,
        "bias": "none",
        "fan_in_fan_out": any(p.transpose and p.kind == "linear" for p in plan.pairs),
        "inference_mode": True,
        "init_lora_weights": True,
        "lora_alpha": _number(scale * default_rank),
        "lora_dropout": 0.0,
        "modules_to_save": saved_modules or None,
        "peft_type": "LORA",
        "r": default_rank,
        "rank_pattern": {r.module: r.rank for r in others},
        "target_modules": target_modules(plan, [r.module for r in results]),
        "task_type": "CAUSAL_LM" if causal else None,
        "use_dora": False,
        "use_rslora": False,
    }


def target_modules(plan: ExtractPlan, extracted: list[str]) -> list[str]:
    """Short names (`q_proj`) where every module of that name was extracted, full paths otherwise, so PEFT
    targets exactly the modules that have keys (a targeted module without keys would warn at load)."""
    done = set(extracted)
    by_leaf: dict[str, set[str]] = {}
    for name, info in {**plan.tuned.tensors, **plan.base.tensors}.items():  # PEFT loads the adapter onto BASE
        if name.endswith(".weight") and len(info.shape) == 2:
            module = name.removesuffix(".weight")
            by_leaf.setdefault(module.rpartition(".")[2], set()).add(module)
    out: list[str] = []
    for leaf in sorted({m.rpartition(".")[2] for m in done}):
        out.extend([leaf] if by_leaf.get(leaf, set()) <= done else sorted(by_leaf[leaf] & done))
    return out


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


def changed_vectors(
    plan: ExtractPlan, changed: list[ChangedTensor], results: list[MatrixResult]
) -> tuple[list[str], dict[str, torch.Tensor]]:
    """--save-changed-vectors: modules with a changed 1-D tensor that are not LoRA modules, as PEFT
    modules_to_save (full paths), with every parameter of each read from TUNED (PEFT fails to load a
    modules_to_save module with a parameter missing). A changed bias of a LoRA module is not among them: PEFT
    would then no longer put LoRA on that module; it stays listed in the summary as not in the adapter."""
    lora_modules = {r.module for r in results}
    modules = sorted({c.name.rpartition(".")[0] for c in changed if len(c.shape) == 1} - lora_modules)
    tensors = {
        f"{keys.PEFT_PREFIX}{name}": plan.tuned.read(info)
        for name, info in plan.tuned.tensors.items()
        if name.rpartition(".")[0] in modules
    }
    return modules, tensors


def write_adapter(
    writer: CheckpointWriter,
    factors: dict[str, torch.Tensor],
    config: dict[str, Any],
    record: dict[str, Any],
    full: dict[str, torch.Tensor],
) -> None:
    """A PEFT adapter directory through `writer`: adapter_model.safetensors ({"format": "pt"} plus our record of
    the operation) and adapter_config.json. `factors` hold B @ A = ΔW; each is divided by √(lora_alpha / r),
    the scale PEFT multiplies back (one scale for every module: alpha_pattern follows rank_pattern). `full`
    tensors (modules_to_save) are written as they are."""
    entries = [(key, "F32", tuple(t.shape)) for key, t in factors.items()]
    entries += [(key, dtype_name(t.dtype), tuple(t.shape)) for key, t in full.items()]
    metadata = {"format": "pt", "lorasurgeon": json.dumps(record)}
    root = (config["lora_alpha"] / config["r"]) ** 0.5
    with writer.shard(WEIGHTS_NAME, entries, metadata) as stream:
        for tensor in factors.values():
            stream.write(tensor.float() / root)
        for tensor in full.values():
            stream.write(tensor)
    writer.write_json(CONFIG_NAME, config)


def default_output(tuned: Checkpoint) -> Path:
    """`<tuned name>-lora` in the current directory."""
    stem = tuned.path.name.removesuffix(".index.json").removesuffix(".safetensors")
    return Path.cwd() / f"{(tuned.root.resolve().name if tuned.layout == 'dir' else stem)}-lora"


def run(
    base: Path,
    tuned: Path,
    out: Path | None,
    options: ExtractOptions,
    device: torch.device,
    force: bool,
    dry_run: bool,
    on_progress: Callable[[Progress], None] | None,
) -> ExtractSummary:
    """plan -> decompose -> write, for lorasurgeon.extract(); OUT is checked before any SVD is computed."""
    started = time.perf_counter()
    if base.resolve() == tuned.resolve():
        raise NothingChangedError(f"{tuned}: BASE and TUNED are the same checkpoint, so there is nothing to extract")
    with Checkpoint.open(base) as base_ckpt, Checkpoint.open(tuned) as tuned_ckpt:
        plan = plan_extract(base_ckpt, tuned_ckpt, options)
        target = out if out is not None else default_output(tuned_ckpt)
        writer = None if dry_run else CheckpointWriter(target, is_dir=True, inputs=[base, tuned], force=force)
        results, factors, changed = decompose_pairs(plan, options, device, on_progress)
        saved, full = changed_vectors(plan, changed, results) if options.save_changed_vectors else ([], {})
        config = adapter_config(plan, results, options, saved)
        if writer is not None:
            record = {"operation": "extract", "base": base_ckpt.path.name, "tuned": tuned_ckpt.path.name}
            with writer:
                write_adapter(writer, factors, config, record, full)
        extracted = {r.module for r in results}
        return ExtractSummary(
            base=str(base),
            tuned=str(tuned),
            output=str(target),
            dry_run=dry_run,
            device=str(device),
            matrices=tuple(results),
            unchanged=tuple(p.tuned.name for p in plan.pairs if p.module not in extracted),
            saved_modules=tuple(saved),
            changed_other=tuple(changed),
            warnings=plan.findings,
            curve=options.curve,
            config=config,
            bytes_written=writer.bytes_written if writer is not None else 0,
            seconds=time.perf_counter() - started,
        )


@dataclass(frozen=True)
class ExtractSummary:
    """What an extraction did (or, with dry_run, would write): per matrix and in total."""

    base: str
    tuned: str
    output: str
    dry_run: bool
    device: str
    matrices: tuple[MatrixResult, ...]
    unchanged: tuple[str, ...]  # targets whose ΔW is zero: not in the adapter
    saved_modules: tuple[str, ...]  # modules_to_save (--save-changed-vectors)
    changed_other: tuple[ChangedTensor, ...]
    warnings: tuple[Finding, ...]
    curve: tuple[int, ...]
    config: dict[str, Any]
    bytes_written: int
    seconds: float

    @property
    def total_error(self) -> float:
        """‖ΔW − B·A‖_F / ‖ΔW‖_F over all extracted matrices together."""
        return _pooled([m.error for m in self.matrices], self.matrices)

    @property
    def curve_errors(self) -> tuple[float, ...]:
        return tuple(_pooled([m.curve[i] for m in self.matrices], self.matrices) for i in range(len(self.curve)))

    @property
    def adapter_params(self) -> int:
        return sum(m.adapter_params for m in self.matrices)

    @property
    def replaced_params(self) -> int:
        return sum(m.shape[0] * m.shape[1] for m in self.matrices)


def _pooled(errors: list[float], matrices: tuple[MatrixResult, ...]) -> float:
    total = sum(m.norm**2 for m in matrices)
    return (sum((e * m.norm) ** 2 for e, m in zip(errors, matrices, strict=True)) / total) ** 0.5 if total else 0.0
