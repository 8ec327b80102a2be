"""Report: what a checkpoint or an adapter holds, from its headers (and, with stats, its tensors), as dataclasses.

Header-only by default: names, dtypes, shapes and metadata. An adapter is described from its header and
adapter_config.json even when the merge refuses it (DoRA, embeddings, replacement tensors), with the parameter
rules of FORMATS.md §8: every stored tensor counts in full, except kohya `.alpha` scalars. `--fail-on` rules
are parsed and judged here; rendering lives in render.py.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from lorasurgeon import keys, lycoris
from lorasurgeon.adapter import WEIGHTS_NAME, load_adapter
from lorasurgeon.checkpoint import Checkpoint, read_json
from lorasurgeon.errors import Finding, InputError, LorasurgeonError, MismatchError, UnsupportedError
from lorasurgeon.header import DTYPES, FLOAT_DTYPES, TensorInfo
from lorasurgeon.lora_config import CONFIG_NAME, LoraConfig

if TYPE_CHECKING:
    from lorasurgeon.surgery import Progress

T = TypeVar("T")
SCHEMA_VERSION = "1"
# kohya / sd-scripts suffixes -> the PEFT role they play (FORMATS.md §5.1); `.alpha` is a scalar, not a parameter.
KOHYA_ROLES: dict[str, str] = {
    ".lora_down.weight": "lora_A",
    ".lora_up.weight": "lora_B",
    ".alpha": "alpha",
    ".dora_scale": "lora_magnitude_vector",
}
# A name's category, first match wins: norms (with their biases), embeddings, other biases.
CATEGORIES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("norm", re.compile(r"norm|(^|\.)ln_?\w*\.")),
    ("embedding", re.compile(r"embed|(^|\.)(wte|wpe|lm_head)\.")),
    ("bias", re.compile(r"\.bias$")),
)
ANY_CATEGORY = re.compile("|".join(f"(?:{pattern.pattern})" for _, pattern in CATEGORIES))  # one search for most names
NUMEL = operator.attrgetter("numel")
BLOCK = re.compile(r"^(.*?\.)(\d+)\.(.+)$")  # the first numbered segment: a repeated block
RULE = re.compile(r"^(?:(nan|inf|mismatch)|(rank|params)>(\d+(?:\.\d+)?)([kmb]?)|dtype(!=|==)(\w+))$")
COUNT_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9}
DTYPE_ALIASES = {"fp64": "F64", "fp32": "F32", "fp16": "F16", "bf16": "BF16", "float": "F32", "half": "F16"}
RULE_HELP = "nan, inf, mismatch, rank>N, params>N (K/M/B suffixes), dtype!=X, dtype==X"


@dataclass(frozen=True)
class Count:
    """Tensors, parameters and bytes of one slice of the input (a dtype, a category, a group, a shard)."""

    name: str
    tensors: int
    parameters: int
    bytes: int
    repeat: int = 1  # groups: how many identical blocks this row stands for (×N); totals are per block
    indices: str = ""  # groups: which block indices, e.g. "0-31"
    metadata: dict[str, str] = field(default_factory=dict)  # shards: the header's __metadata__


@dataclass(frozen=True)
class TensorStats:
    name: str
    dtype: str
    nan: int
    inf: int
    min: float | None
    max: float | None
    mean: float | None
    std: float | None


@dataclass(frozen=True)
class ModuleReport:
    """One adapted module: its tensors' roles, rank/alpha/scale, parameters and the base matrix it changes."""

    module: str
    kind: str  # "linear" | "conv" | "embedding" | "replacement" | "tokens" | "unpaired" | a LyCORIS algorithm
    tensors: dict[str, str]  # role (lora_A, lora_B, lora_magnitude_vector, replacement:weight, ...) -> key
    dtype: str
    parameters: int
    rank: int | None = None
    alpha: float | None = None
    scale: float | None = None
    base_shape: tuple[int, ...] | None = None
    delta_norm: float | None = None  # --stats: ‖scale·BA‖_F (null when the scale is unknown)
    delta_spectral_norm: float | None = None
    stable_rank: float | None = None

    @property
    def base_parameters(self) -> int | None:
        return math.prod(self.base_shape) if self.base_shape else None

    @property
    def reduction(self) -> float | None:
        """1 − LoRA parameters / base matrix parameters (1024×1024 at r=8: 1 − 16,384/1,048,576 = 98.44 %)."""
        base = self.base_parameters
        return 1 - self.parameters / base if base else None


@dataclass(frozen=True)
class CheckResult:
    base: str
    findings: tuple[Finding, ...]
    touched_parameters: int
    base_parameters: int


@dataclass(frozen=True)
class Rule:
    text: str
    name: str  # nan | inf | mismatch | rank | params | dtype!= | dtype==
    limit: int = 0
    dtype: str = ""


@dataclass(frozen=True)
class Hit:
    rule: str
    reason: str


@dataclass(frozen=True)
class Report:
    """Everything `lorasurgeon report` says about PATH; `fired` lists the --fail-on rules that hold."""

    kind: str  # "checkpoint" | "adapter"
    path: str
    format: str  # checkpoint: file | index | dir; adapter: peft | kohya | diffusers
    totals: Count
    by_dtype: tuple[Count, ...]
    categories: tuple[Count, ...]
    groups: tuple[Count, ...]
    shards: tuple[Count, ...]
    metadata: dict[str, str]
    config: dict[str, Any] = field(default_factory=dict)
    modules: tuple[ModuleReport, ...] = ()
    findings: tuple[Finding, ...] = ()
    check: CheckResult | None = None
    stats: tuple[TensorStats, ...] | None = None
    fired: tuple[Hit, ...] = ()

    @property
    def lora_parameters(self) -> tuple[int, int]:
        """(parameters of the LoRA factors, parameters of the base matrices they adapt)."""
        paired = [m for m in self.modules if m.base_parameters]
        return sum(m.parameters for m in paired), sum(m.base_parameters or 0 for m in paired)

    @property
    def targets(self) -> dict[str, int]:
        """Module name (last path component) -> how many matrices of that name the adapter changes."""
        out: dict[str, int] = {}
        for m in self.modules:
            out[m.module.rpartition(".")[2]] = out.get(m.module.rpartition(".")[2], 0) + 1
        return dict(sorted(out.items()))


def parse_rule(text: str) -> Rule:
    """`rank>64`, `params>50M`, `dtype!=bf16`, `nan`, ... -> Rule; anything else is a usage error (exit 2)."""
    match = RULE.match(text.strip().lower().replace(" ", ""))
    if not match:
        raise LorasurgeonError(f"--fail-on {text!r}: unknown rule; expected one of {RULE_HELP}")
    flag, counted, number, suffix, op, dtype = match.groups()
    if flag:
        return Rule(text, flag)
    if counted:
        return Rule(text, counted, limit=int(float(number) * COUNT_SUFFIXES[suffix]))
    name = DTYPE_ALIASES.get(dtype, dtype.upper())
    if name not in DTYPES:
        raise LorasurgeonError(f"--fail-on {text!r}: unknown dtype {dtype!r}; expected e.g. bf16, fp16, fp32, F8_E4M3")
    return Rule(text, f"dtype{op}", dtype=name)


def make_report(
    path: Path,
    base: Path | None = None,
    stats: bool = False,
    rules: Iterable[Rule] = (),
    on_progress: Callable[[Progress], None] | None = None,
) -> Report:
    """Describe `path` (a checkpoint in any layout, or an adapter); see the module docstring. The data pass
    runs with `stats`, and whenever a nan or inf rule needs it."""
    rules = list(rules)
    stats = stats or any(rule.name in ("nan", "inf") for rule in rules)
    target, config_path = _locate(path)
    with Checkpoint.open(target) as ckpt:
        if _has_lora_keys(ckpt) or (config_path is not None and target.name == WEIGHTS_NAME):
            report = _adapter_report(path, ckpt, read_json(config_path) if config_path else None)
            if base is not None:
                report = replace(report, check=_check(path, base))
        elif base is not None:
            raise LorasurgeonError(f"{path}: is a checkpoint, not an adapter; --base is only for adapters")
        else:
            report = _checkpoint_report(path, ckpt)
        if stats:
            report = _with_stats(report, ckpt, on_progress)
    return replace(report, fired=tuple(judge(report, rules)))


def _locate(path: Path) -> tuple[Path, Path | None]:
    """(what to open, the adapter_config.json that goes with it): a PEFT directory (or its named sub-directory)
    gives its adapter_model.safetensors; any other directory or file is opened as it is."""
    folders = [path] if path.is_dir() else []
    if folders and not any(path.glob("*.safetensors*")):  # PEFT's sub-directory per named adapter
        folders += sorted(p for p in path.iterdir() if (p / CONFIG_NAME).is_file())
    for folder in folders:
        if (folder / WEIGHTS_NAME).is_file():
            return folder / WEIGHTS_NAME, folder / CONFIG_NAME if (folder / CONFIG_NAME).is_file() else None
    config = path.parent / CONFIG_NAME
    return path, config if path.is_file() and config.is_file() else None


def _split(name: str) -> tuple[str, str]:
    """(module, role) of an adapter key in PEFT, diffusers or kohya naming (LyCORIS roles: their suffix)."""
    for suffix, role in KOHYA_ROLES.items():
        if name.endswith(suffix):
            return name[: -len(suffix)], role
    module, lycoris_role = keys.split_kohya_key(name)
    if lycoris_role is not None and keys.kohya_component(module):
        return module, lycoris_role
    key = keys.split_peft_key(name)
    return key.module, key.role if key.role != "replacement" else f"replacement:{key.param}"


def _has_lora_keys(ckpt: Checkpoint) -> bool:
    # every LoRA role's suffix holds "lora_" or "token_adapter"; the substring test spares _split on big checkpoints
    return any(
        ("lora_" in name or "token_adapter" in name) and not _split(name)[1].startswith("replacement")
        for name in ckpt.tensors
    )


def _counts(infos: Iterable[TensorInfo], key: Callable[[TensorInfo], str]) -> tuple[Count, ...]:
    return _summed((key(t), (1, t.numel, t.end - t.start)) for t in infos)


def _summed(rows: Iterable[tuple[str, Sequence[int]]]) -> tuple[Count, ...]:
    """(name, (tensors, parameters, bytes)) rows added up per name, sorted by name."""
    sums: dict[str, list[int]] = {}
    for name, (tensors, parameters, size) in rows:
        row = sums.setdefault(name, [0, 0, 0])
        row[0] += tensors
        row[1] += parameters
        row[2] += size
    return tuple(Count(name, tensors, parameters, size) for name, (tensors, parameters, size) in sorted(sums.items()))


def _category(name: str, matrix: bool) -> str:
    hit = ANY_CATEGORY.search(name) and next(category for category, pattern in CATEGORIES if pattern.search(name))
    return hit or ("matrix" if matrix else "other")


def _common(path: Path, ckpt: Checkpoint, kind: str, fmt: str, infos: list[TensorInfo]) -> Report:
    shards = tuple(
        Count(
            s.name,
            len(s.header.tensors),
            sum(map(NUMEL, s.header.tensors)),
            s.header.file_size,
            metadata=s.header.metadata,
        )
        for s in ckpt.shards
    )
    metadata = {k: v for s in reversed(ckpt.shards) for k, v in s.header.metadata.items()}
    # Block numbers never decide a category and one block's tensors share their dtypes, so summing per
    # (name with digits zeroed, dtype, matrix or not) first leaves a few dozen rows to categorise and add up
    # where a 100-shard checkpoint has ~20,000 tensors: one pass over them, not one per table.
    # (bytes.translate: str.translate is ten times slower, and this loop is most of a report's own time.)
    digits_to_zero = bytes.maketrans(b"123456789", b"000000000")
    sums: dict[tuple[bytes, str, bool], list[int]] = {}
    for t in infos:
        row = sums.setdefault((t.name.encode().translate(digits_to_zero), t.dtype, len(t.shape) >= 2), [0, 0, 0])
        row[0] += 1
        row[1] += t.numel
        row[2] += t.end - t.start
    order = {name: i for i, (name, _) in enumerate(CATEGORIES)}
    categories = _summed((_category(name.decode(), matrix), row) for (name, _, matrix), row in sums.items())
    categories = tuple(sorted(categories, key=lambda c: order.get(c.name, len(order))))
    by_dtype = _summed((dtype, row) for (_, dtype, _), row in sums.items())
    (totals,) = _summed(("total", row) for row in sums.values()) or (Count("total", 0, 0, 0),)
    return Report(kind, str(path), fmt, totals, by_dtype, tuple(categories), (), shards, metadata)


def _checkpoint_report(path: Path, ckpt: Checkpoint) -> Report:
    infos = list(ckpt)
    config = {"model_type": ckpt.config.get("model_type")} if ckpt.config else {}
    return replace(_common(path, ckpt, "checkpoint", ckpt.layout, infos), groups=_groups(infos), config=config)


def _groups(infos: list[TensorInfo]) -> tuple[Count, ...]:
    """Tensors grouped by module; numbered blocks with identical contents collapse into one row ×N."""
    blocks: dict[tuple[str, str], list[TensorInfo]] = {}  # (prefix, index) -> its tensors
    singles = []
    for t in infos:
        match = BLOCK.match(t.name)
        if match:
            blocks.setdefault((match[1], match[2]), []).append(t)
        else:
            singles.append(t)
    rows = [replace(c, name=c.name or "(top level)") for c in _counts(singles, lambda t: t.name.rpartition(".")[0])]
    alike: dict[tuple[str, tuple[tuple[str, str, tuple[int, ...]], ...]], list[str]] = {}
    for (prefix, index), members in blocks.items():
        start = len(prefix) + len(index) + 1
        signature = tuple(sorted((t.name[start:], t.dtype, t.shape) for t in members))
        alike.setdefault((prefix, signature), []).append(index)
    for (prefix, _), indices in alike.items():
        (block,) = _counts(blocks[(prefix, indices[0])], lambda t: "block")
        rows.append(replace(block, name=f"{prefix}*", repeat=len(indices), indices=_ranges(sorted(map(int, indices)))))
    return tuple(sorted(rows, key=lambda c: (c.name, c.indices)))


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def _adapter_report(path: Path, ckpt: Checkpoint, config: dict[str, Any] | None) -> Report:
    infos = [t for t in ckpt if _split(t.name)[1] != "alpha"]
    grouped: dict[str, dict[str, TensorInfo]] = {}
    for info in ckpt:
        module, role = _split(info.name)
        grouped.setdefault(module, {})[role] = info
    fmt = _format(ckpt)
    alphas = {m: _kohya_alpha(ckpt, r["alpha"]) for m, r in grouped.items() if "alpha" in r}
    settings = _Settings.parse(ckpt.path, config, fmt)
    if fmt == "diffusers":
        settings = replace(settings, known=_diffusers_scales(path))
    modules = tuple(settings.module(name, roles, alphas.get(name)) for name, roles in sorted(grouped.items()))
    findings = [
        Finding("error", f"{ckpt.path}: {key} has no matching LoRA factor of matrix shape")
        for m in modules
        if m.kind == "unpaired"
        for key in m.tensors.values()
    ]
    findings += settings.findings(ckpt.path, modules)
    report = _common(path, ckpt, "adapter", fmt, infos)
    return replace(report, config=settings.summary(), modules=modules, findings=tuple(findings))


def _diffusers_scales(path: Path) -> dict[str, tuple[int, float, float]]:
    """(rank, alpha, scale) per module of a diffusers file as the merge reads it: its lora_adapter_metadata, else
    its `.alpha` tensors, else alpha = rank (FORMATS.md §5.6); nothing for a file the merge refuses (the check
    and the findings say why)."""
    try:
        adapter = load_adapter(path)
    except LorasurgeonError:
        return {}
    with adapter.source:
        return {m.module: (m.rank, m.alpha, m.scale) for m in adapter.modules}


def _kohya_alpha(ckpt: Checkpoint, info: TensorInfo) -> float:
    """A kohya `.alpha` scalar: the one tensor value a header-only report reads (it is the format's config)."""
    value = ckpt.read(info).double().reshape(-1) if info.numel == 1 and info.dtype != "BOOL" else None
    if value is None or not math.isfinite(value.item()):
        raise InputError(f"{ckpt.path}: {info.name} must hold one finite number, the alpha")
    return float(value.item())


def _format(ckpt: Checkpoint) -> str:
    """The adapter format by the same rules load_adapter uses, so report and merge never disagree."""
    if keys.is_kohya(ckpt.tensors):
        return "kohya"
    metadata = {k: v for s in ckpt.shards for k, v in s.header.metadata.items()}
    return "diffusers" if keys.is_diffusers(ckpt.tensors, metadata) else "peft"


@dataclass(frozen=True)
class _Settings:
    """The config fields that decide rank, alpha and scale (FORMATS.md §1.3, §2.1), read without refusing."""

    config: Mapping[str, Any] | None
    fmt: str
    lora: LoraConfig | None
    known: Mapping[str, tuple[int, float, float]] = field(default_factory=dict)  # module -> (rank, alpha, scale)

    @classmethod
    def parse(cls, where: Path, config: Mapping[str, Any] | None, fmt: str) -> _Settings:
        """Check the types of the config's fields (InputError naming the file and the field), never refusing
        an adapter for what it holds: the report describes what the merge refuses."""
        lora = LoraConfig.parse(where.parent / CONFIG_NAME, config, None, refuse=False) if config is not None else None
        return cls(config, fmt, lora)

    def summary(self) -> dict[str, Any]:
        c = self.config or {}
        fields = ("peft_type", "r", "lora_alpha", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern")
        return {name: c[name] for name in fields if name in c} | {"has_config": self.config is not None}

    def rank_alpha(self, module: str, file_rank: int, kohya_alpha: float | None) -> tuple[int, float | None]:
        """The rank PEFT scales by and the alpha, or (file rank, kohya alpha or rank) without a config."""
        if self.lora is None:
            return file_rank, kohya_alpha if kohya_alpha is not None else (file_rank if self.fmt == "kohya" else None)
        return self.lora.rank_alpha(module)

    def module(self, name: str, roles: dict[str, TensorInfo], kohya_alpha: float | None) -> ModuleReport:
        counted = {r: t for r, t in roles.items() if r != "alpha"}
        first = next(iter(counted.values()))
        params = sum(t.numel for t in counted.values())
        described = ModuleReport(
            name, "replacement", {r: counted[r].name for r in sorted(counted)}, first.dtype, params
        )
        a = counted.get("lora_A") or counted.get("lora_embedding_A")
        b = counted.get("lora_B") or counted.get("lora_embedding_B")
        if "trainable_tokens_delta" in counted:
            return replace(described, kind="tokens")
        algorithm = next((keys.LYCORIS_ROLES[r] for r in counted if r in keys.LYCORIS_ROLES), None)
        if algorithm is not None:
            return _lycoris_module(described, algorithm, counted, kohya_alpha)
        if a is None or b is None or len(a.shape) < 2 or len(b.shape) < 2:
            return replace(described, kind="unpaired") if a or b else described
        rank, alpha = self.rank_alpha(name, a.shape[0], kohya_alpha)
        rsl = self.lora is not None and self.lora.use_rslora
        scale = None if alpha is None else alpha / (math.sqrt(rank) if rsl else rank)
        if name in self.known:
            rank, alpha, scale = self.known[name]
        shape: tuple[int, ...]
        if "lora_embedding_A" in counted:  # A (r, V), B (d, r): the embedding is (V, d)
            kind, shape = "embedding", (a.shape[1], b.shape[0])
        else:  # A (r, in, *k), B (out, r, 1...): the weight is (out, in, *k)
            kind, shape = ("linear" if len(a.shape) == 2 else "conv"), (b.shape[0], *a.shape[1:])
        return replace(described, kind=kind, rank=a.shape[0], alpha=alpha, scale=scale, base_shape=shape)

    def findings(self, where: Path, modules: tuple[ModuleReport, ...]) -> list[Finding]:
        found = []
        ranked = [m for m in modules if m.rank]
        if ranked and all(m.scale is None for m in ranked):
            found.append(Finding("warning", f"{where}: no {CONFIG_NAME} and no alphas, so the LoRA scale is unknown"))
        for m in ranked if self.config is not None else []:
            said = self.rank_alpha(m.module, m.rank or 0, None)[0]
            if said != m.rank:
                found.append(Finding("error", f"{where}: {m.module} has rank {m.rank} but {CONFIG_NAME} says {said}"))
        return found


def _lycoris_module(
    described: ModuleReport, algorithm: str, roles: dict[str, TensorInfo], kohya_alpha: float | None
) -> ModuleReport:
    """A LyCORIS module of a kohya file: LoHa and LoKr with the rank, alpha, scale and ΔW shape the merge uses
    (lycoris.py; a LoKr of two full matrices has scale 1); other algorithms, which the merge refuses, by name."""
    shapes = {r: t.shape for r, t in _lycoris_factors(roles).items()}
    fit = lycoris.layout(algorithm, shapes) if algorithm in lycoris.ALGORITHMS else None
    if fit is None or fit.problem:  # the merge and `check` name the problem
        return replace(described, kind=algorithm)
    rank, alpha = (fit.rank, kohya_alpha or float(fit.rank)) if fit.rank else (1, 1.0)
    return replace(described, kind=algorithm, rank=rank, alpha=alpha, scale=alpha / rank, base_shape=fit.shape)


def _lycoris_factors(roles: Mapping[str, T]) -> dict[str, T]:
    """A LyCORIS module's factors under lycoris.py's role names (the report calls kohya's lora_down / lora_up
    lora_A / lora_B, as PEFT does); its alpha and dora_scale are no factors."""
    renamed = {"lora_A": "lora_down", "lora_B": "lora_up"}
    return {
        renamed.get(r, r): v for r, v in roles.items() if r in renamed or keys.LYCORIS_ROLES.get(r, "dora") != "dora"
    }


def _check(path: Path, base_path: Path) -> CheckResult:
    """What `check` finds, and how many base parameters the adapter changes or replaces: the base tensors the
    merge would write anew, found by the merge's own name resolution (PEFT, kohya, diffusers alike)."""
    # Imported here, like linalg below: the plan and the tensor maths load torch, which a header-only report
    # does without (its import takes seconds; the report itself milliseconds).
    from lorasurgeon.plan import plan_surgery

    with Checkpoint.open(base_path) as base:
        touched: set[str] = set()
        try:
            adapter = load_adapter(path)
        except (InputError, UnsupportedError, MismatchError) as e:  # described above; the merge refuses it
            findings: tuple[Finding, ...] = (Finding("error", str(e)),)
        else:
            with adapter.source:
                plan = plan_surgery("merge", base, [adapter], [1.0])
            findings = plan.findings
            touched = {s.tensor.name for s in plan.changed if s.tensor.name in base.tensors}
        total = sum(t.numel for t in base.tensors.values())
        return CheckResult(str(base_path), findings, sum(base.tensors[n].numel for n in touched), total)


def _with_stats(report: Report, ckpt: Checkpoint, on_progress: Callable[[Progress], None] | None) -> Report:
    """One pass over the tensor data, one tensor at a time: per-tensor statistics, then per-module ΔW norms."""
    from lorasurgeon import linalg
    from lorasurgeon.surgery import Progress

    infos = list(ckpt)
    total = sum(t.nbytes for t in infos)
    stats, done = [], 0
    for i, info in enumerate(infos, 1):
        stats.append(TensorStats(info.name, info.dtype, *linalg.tensor_stats(ckpt.read(info))))
        done += info.nbytes
        if on_progress:
            on_progress(Progress(i, len(infos), done, total))
    modules = tuple(_delta_norms(ckpt, m) for m in report.modules)
    return replace(report, stats=tuple(stats), modules=modules)


def _delta_norms(ckpt: Checkpoint, m: ModuleReport) -> ModuleReport:
    from lorasurgeon import linalg

    if m.rank is None:
        return m
    if m.kind in lycoris.ALGORITHMS:
        factors = {r: ckpt.read(ckpt.tensors[k]) for r, k in _lycoris_factors(m.tensors).items()}
        if any(linalg.nonfinite_count(f) for f in factors.values()):
            return m
        fro, spectral, stable = lycoris.delta_norms(lycoris.delta(m.kind, factors, 1.0, m.base_shape or ()))
    else:
        prefix = "lora_embedding_" if m.kind == "embedding" else "lora_"
        a = ckpt.read(ckpt.tensors[m.tensors[prefix + "A"]])
        b = ckpt.read(ckpt.tensors[m.tensors[prefix + "B"]])
        if linalg.nonfinite_count(a) or linalg.nonfinite_count(b):
            return m  # the NaN/Inf are counted in the tensor statistics; a norm of them means nothing
        fro, spectral, stable = linalg.lora_delta_norms(a, b)
    scale = abs(m.scale) if m.scale is not None else None
    return replace(
        m,
        delta_norm=None if scale is None else scale * fro,
        delta_spectral_norm=None if scale is None else scale * spectral,
        stable_rank=stable,
    )


def judge(report: Report, rules: Iterable[Rule]) -> list[Hit]:
    """The rules that fire on `report`, each with the reason in words."""
    return [Hit(rule.text, reason) for rule in rules if (reason := _reason(report, rule))]


def _reason(report: Report, rule: Rule) -> str | None:
    if rule.name in ("nan", "inf"):
        bad = [s for s in report.stats or () if getattr(s, rule.name)]
        count = sum(getattr(s, rule.name) for s in bad)
        label = {"nan": "NaN", "inf": "±Inf"}[rule.name]
        return f"{count} {label} values in {len(bad)} tensors (first: {bad[0].name})" if bad else None
    if rule.name == "mismatch":
        findings = [*report.findings, *(report.check.findings if report.check else ())]
        return f"{len(findings)} findings, the first: {findings[0].message}" if findings else None
    if rule.name == "rank":
        over = [m for m in report.modules if m.rank and m.rank > rule.limit]
        top = max((m.rank or 0 for m in over), default=0)
        return f"{len(over)} modules have rank > {rule.limit} (up to {top}; first: {over[0].module})" if over else None
    if rule.name == "params":
        n = report.totals.parameters
        return f"{n:,} parameters > {rule.limit:,}" if n > rule.limit else None
    wanted = rule.name == "dtype=="
    hits = [c for c in report.by_dtype if c.name in FLOAT_DTYPES and (c.name == rule.dtype) == wanted]
    what = ", ".join(f"{c.tensors} tensors are {c.name}" for c in hits)
    return f"{what} ({'' if wanted else 'not '}{rule.dtype})" if hits else None
