"""Pairing BASE and TUNED for extract: which tensors are target matrices (ΔW to factorise), which are only compared,
and every name or shape that does not pair, all from the headers (nothing is read).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

from lorasurgeon.checkpoint import Checkpoint
from lorasurgeon.errors import Finding, LorasurgeonError, MismatchError, Option, Severity, UnsupportedError
from lorasurgeon.formats.architectures import EMBEDDINGS, HEADS, is_conv1d
from lorasurgeon.header import TensorInfo
from lorasurgeon.rank_rule import RankRule


@dataclass(frozen=True)
class ExtractOptions:
    """What to extract and how: the SVD `rule`, `alpha` (default alpha = r, scale 1), the `targets` (globs or
    `re:` regexes on module paths), what else to include, `base_name`, the base_model_name_or_path to record
    (default: BASE as given), and `patterns` (PEFT's rank/alpha patterns instead of the single-alpha form,
    formats.scale_form); `validate` names the first bad option."""

    rule: RankRule = field(default_factory=RankRule)
    alpha: float | None = None
    targets: tuple[str, ...] = ()
    include_embeddings: bool = False
    skip_mismatched: bool = False
    save_changed_vectors: bool = False
    base_name: str | None = None
    patterns: bool = False

    def validate(self, dry_run: bool) -> None:
        self.rule.validate(dry_run)
        if self.alpha is not None and not self.alpha > 0:
            raise LorasurgeonError(Option("alpha", self.alpha), ": must be positive")
        for pattern in self.targets:
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as e:
                    raise LorasurgeonError(
                        Option("targets", repr(pattern), cli="target"), f": not a valid regular expression ({e})"
                    ) from None


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
            severity: Severity = "warning" if options.skip_mismatched else "error"
            findings.append(Finding.of(severity, problem, base_key=name))
            continue
        kind = _target_kind(name, b, options)
        if kind is None:
            others.append((b, t))
            continue
        module = name.removesuffix(".weight")
        transpose = kind == "embedding" or is_conv1d(model_type, module)
        pairs.append(Pair(module, kind, transpose, b, t))
    errors = [f for f in findings if f.severity == "error"]
    if errors:
        more = (f" (and {len(errors) - 1} more; ", Option("skip_mismatched", flag=True), " skips them)")
        raise MismatchError(*errors[0].parts, *(more if len(errors) > 1 else ()))
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
            raise UnsupportedError(
                f"{info.path}: {name} is an embedding; pass ", Option("include_embeddings", flag=True), " to extract it"
            )
        return None
    if options.targets:
        if not any(_matches(p, module) for p in options.targets) or not name.endswith(".weight"):
            return None
        if not is_matrix:
            raise UnsupportedError(
                f"{info.path}: ",
                Option("targets", cli="target"),
                f" selects {name}, of shape {list(info.shape)} and dtype {info.dtype}; "
                "only 2-D floating-point weights can be extracted as LoRA",
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
        chosen = (Option("targets", " ".join(options.targets), cli="target"),) if options.targets else ()
        raise MismatchError(
            f"{tuned.path}: no tensor is selected by ", *(chosen or ("the default rule (2-D linear weights)",)),
            "; nothing to extract",
        )  # fmt: skip
    for pair in pairs:
        limit = min(pair.base.shape)
        rank = options.rule.rank
        if rank is not None and rank > limit:
            raise MismatchError(
                f"{pair.tuned.path}: ",
                Option("rank", rank),
                f" exceeds min(out, in) = {limit} of {pair.tuned.name} "
                f"(shape {list(pair.base.shape)}); the largest rank it has is {limit}",
            )
