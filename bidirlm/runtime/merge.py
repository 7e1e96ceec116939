"""Streaming, shard-wise merging of safetensors checkpoints (`bidirlm merge`, `merge(...)`).

Methods, with mergekit's exact semantics (the same YAML gives the same tensors in both tools):

- `linear`: `sum_i w_i * x_i`, divided by `sum_i w_i` when `normalize` (default true), computed
  in float32 (float64 for float64 inputs) and rounded once to the merge dtype.
- `task_arithmetic`: `base + lambda * sum_i w_i * (x_i - base)` over the non-base models, divided
  by `sum_i w_i` when `normalize` (default false), computed in the merge dtype as mergekit does
  (set `dtype: float32` for float32 arithmetic on bf16 checkpoints).

The merge dtype is `dtype` (inputs are cast to it when read), else the promoted dtype of the
inputs; outputs are cast to `out_dtype` if set. Tensors stream one slice at a time from memory-
mapped shards through reader threads into output shards written as they fill; the output folder
appears only once complete (see `merge_io`).

YAML keys (mergekit's):

    merge_method: linear | task_arithmetic
    base_model: PATH               # task_arithmetic; linear treats it as one more input
    models:
      - model: PATH                # a local Hugging Face folder with safetensors weights
        parameters: {weight: 0.5}  # number, per-layer gradient [a, b, ...] or [{filter, value}]
    parameters: {normalize: true, lambda: 1.0, weight: ...}   # defaults for every model
    dtype: float32 | bfloat16 | float16 | float64
    out_dtype: ...
    tokenizer_source: base | PATH  # tokenizer files copied from that model

bidirlm's own keys (mergekit ignores them):

    models:
      - model: PATH
        rename: {"model.language_model.": "model."}  # prefix map applied to this model's names
        take: ["model.visual.*"]   # output names copied unmerged from this model (glob)
    exclude: ["mtp.*"]             # output names dropped (glob)
    config_from: PATH              # config.json source (default: the base, else the first model)
    tokenizer_from: PATH           # tokenizer/processor files source (default: config_from)

Every pattern and filter applies to output names (after `rename`). A tensor that is neither
taken nor excluded must exist in every model with one shape; anything else is a `MergeError`
naming the model and tensor, raised before the output folder is created.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import os
import re
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .merge_config import MergeConfig, MergeError, config_from_dict, load_config
from .merge_io import (
    INDEX_NAME,
    AtomicFolder,
    MappedFiles,
    OutEntry,
    TensorInfo,
    copy_file,
    plan_shards,
    read_checkpoint,
    shard_header,
    shard_names,
    write_json,
)

__all__ = [
    "MergeConfig",
    "MergeError",
    "MergeResult",
    "format_report",
    "load_config",
    "merge",
    "merge_from_config",
    "parse_size",
]

PIECE_BYTES = 8 * 2**20  # output bytes per work item: bounds memory whatever the tensor size
CHUNK = 1 << 15  # elements per inner step: the float32 accumulator stays in L2 cache
REPORT_NAME = "merge_report.json"
CONFIG_COPY_NAME = "merge_config.yml"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
)
VOCAB_TENSORS = re.compile(r"(embed_tokens|lm_head|wte|embed_out|word_embeddings)(\.weight)?$")
LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
TORCH_DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass(frozen=True)
class MergeResult:
    """What a merge wrote: the folder, tensor and shard counts, bytes, seconds, the report."""

    output: Path
    tensors: int
    shards: int
    bytes: int
    seconds: float
    report: dict[str, Any] | None = None


@dataclass
class _Task:
    """One output tensor: copied from one input, or merged from all of them."""

    out: OutEntry
    sources: list[TensorInfo]
    merged: bool
    method: str = "linear"
    weights: list[float] = dataclasses.field(default_factory=list)
    coef: torch.Tensor | None = None  # weights as a tensor in the arithmetic dtype
    shared: dict[str, Any] = dataclasses.field(default_factory=dict)
    load: torch.dtype | None = None  # `dtype:` cast applied when reading
    align: torch.dtype | None = None  # merge dtype
    base: int | None = None
    group: str = "other"  # report bucket


def parse_size(value: str | int) -> int:
    """'5GB' -> 5e9, '500MiB' -> 500 * 2**20, 1234 -> 1234 (decimal units as in transformers)."""
    if isinstance(value, int):
        size = value
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?I?B?)\s*", str(value).upper())
        if not m:
            raise MergeError(f"shard size {value!r} is not a size like 5GB or 500MiB")
        unit = m.group(2).rstrip("B")
        power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("I")]
        size = int(float(m.group(1)) * (1024 if unit.endswith("I") else 1000) ** power)
    if size <= 0:
        raise MergeError(f"shard size must be positive, got {value!r}")
    return size


# --- planning -------------------------------------------------------------------------------


def _renamed(config: MergeConfig, index: int, tensors: dict[str, TensorInfo]) -> dict:
    spec = config.models[index]
    out: dict[str, TensorInfo] = {}
    for name, info in tensors.items():
        new = spec.renamed(name)
        if new in out:
            raise MergeError(
                f"model {spec.label}: rename maps both {out[new].name} and {name} to {new}"
            )
        out[new] = info
    return out


def _check_shapes(name: str, infos: list[TensorInfo], labels: list[str]) -> None:
    ref = infos[0]
    for info, label in zip(infos[1:], labels[1:]):
        if info.shape == ref.shape:
            continue
        vocab = (
            VOCAB_TENSORS.search(name)
            and len(info.shape) == len(ref.shape)
            and info.shape[1:] == ref.shape[1:]
        )
        if vocab:
            raise MergeError(
                f"vocabulary size mismatch: tensor {name} has {info.shape[0]} rows in model "
                f"{label} but {ref.shape[0]} in model {labels[0]} (merging needs one tokenizer)"
            )
        raise MergeError(
            f"shape mismatch: tensor {name} is {list(info.shape)} in model {label} but "
            f"{list(ref.shape)} in model {labels[0]}"
        )


def _plan(config: MergeConfig, inputs: list[dict[str, TensorInfo]]) -> list[_Task]:
    labels = [m.label for m in config.models]
    ref = config.reference_index
    # Output order: the reference model's storage order, then names only other models have.
    order: dict[str, None] = {}
    for i in [ref] + [j for j in range(len(inputs)) if j != ref]:
        for name, _ in sorted(inputs[i].items(), key=lambda kv: (kv[1].file, kv[1].offset)):
            order.setdefault(name)
    taken: dict[str, int] = {}
    for i, spec in enumerate(config.models):
        for pattern in spec.take:
            hits = [n for n in inputs[i] if fnmatch.fnmatchcase(n, pattern)]
            if not hits:
                raise MergeError(
                    f"take pattern {pattern!r} of model {spec.label} matches no tensor"
                )
            for n in hits:
                if taken.setdefault(n, i) != i:
                    raise MergeError(
                        f"tensor {n} is taken from two models: {labels[taken[n]]} and {spec.label}"
                    )
    for pattern in config.exclude:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in order):
            raise MergeError(f"exclude pattern {pattern!r} matches no tensor")
    names = [n for n in order if not any(fnmatch.fnmatchcase(n, p) for p in config.exclude)]
    merged = [n for n in names if n not in taken]
    for i, tensors in enumerate(inputs):
        missing = [n for n in merged if n not in tensors]
        if missing:
            has = next(labels[j] for j in range(len(inputs)) if missing[0] in inputs[j])
            raise MergeError(
                f"tensor {missing[0]} is missing from model {labels[i]} (present in {has}; "
                f"{len(missing)} tensor(s) missing in all): align names with `rename`, copy "
                "them from one model with `take`, or drop them with `exclude`"
            )
    # Layer position t in [0, 1] for per-layer gradients, as mergekit: layer i of L has
    # t = i / (L - 1) (1 when L == 1); tensors outside layers use t = 0.
    layers: dict[str, set[int]] = {}
    for n in merged:
        m = LAYER.search(n)
        if m:
            layers.setdefault(n[: m.start()], set()).add(int(m.group(1)))
    load = TORCH_DTYPES[config.dtype] if config.dtype else None
    out_dtype = TORCH_DTYPES[config.out_dtype] if config.out_dtype else None
    tasks = []
    for n in names:
        m = LAYER.search(n)
        group = n[: m.end() - 1] if m else "other"
        if n in taken:
            info = inputs[taken[n]][n]
            dt = info.dtype
            if dt.is_floating_point:
                dt = out_dtype or load or dt
            tasks.append(_Task(_entry(n, dt, info.shape), [info], merged=False, group=group))
            continue
        infos = [t[n] for t in inputs]
        _check_shapes(n, infos, labels)
        if not all(i.dtype.is_floating_point for i in infos):
            # Integer buffers are not averaged: like mergekit, they must agree and are copied.
            tasks.append(_Task(_entry(n, infos[0].dtype, infos[0].shape), infos, False))
            continue
        align = load
        if align is None:
            align = infos[0].dtype
            for i in infos[1:]:
                align = torch.promote_types(align, i.dtype)
        t = 0.0
        if m:
            count = len(layers[n[: m.start()]])
            t = int(m.group(1)) / (count - 1) if count > 1 else 1.0
        task = _Task(
            _entry(n, out_dtype or align, infos[0].shape),
            infos,
            merged=True,
            method=config.method,
            shared=config.shared(n, t),
            load=load,
            align=align,
            base=config.base_index,
            group=group,
        )
        if config.method == "linear":
            task.weights = [config.weight(i, n, t) for i in range(len(infos))]
            if task.shared["normalize"] and sum(task.weights) == 0:
                raise MergeError(
                    f"weights of tensor {n} sum to 0 and normalize is true (division by zero)"
                )
            acc = torch.float64 if align == torch.float64 else torch.float32
            task.coef = torch.tensor(task.weights, dtype=acc)
        else:
            task.weights = [
                config.weight(i, n, t) for i in range(len(infos)) if i != config.base_index
            ]
            task.coef = torch.tensor(task.weights, dtype=align).unsqueeze(-1)
        tasks.append(task)
    if not tasks:
        raise MergeError("nothing to merge: every tensor is excluded")
    return tasks


def _entry(name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> OutEntry:
    return OutEntry(name, dtype, shape, math.prod(shape) * dtype.itemsize)


# --- arithmetic -----------------------------------------------------------------------------


def _linear(xs: list[torch.Tensor], task: _Task, out: torch.Tensor) -> None:
    """Write the linear merge of `xs` into `out`, with mergekit's operations (bitwise equal)."""
    w = task.coef
    acc = torch.zeros(xs[0].shape, dtype=w.dtype)
    for x, c in zip(xs, w.unbind(0)):
        acc.addcmul_(x, c)
    if task.align != out.dtype:  # mergekit rounds to the merge dtype, then to out_dtype
        if task.shared["normalize"]:
            acc.div_(w.sum())
        out.copy_(acc.to(task.align))
    elif task.shared["normalize"]:
        torch.div(acc, w.sum(), out=out)  # divides in float32, rounds once into `out`
    else:
        out.copy_(acc)


def _task_arithmetic(xs: list[torch.Tensor], task: _Task, out: torch.Tensor) -> None:
    """Write mergekit's task arithmetic of `xs` into `out`, in the merge dtype as mergekit."""
    base = xs[task.base]
    others = [x for i, x in enumerate(xs) if i != task.base]
    if not others:
        out.copy_(base)
        return
    deltas = base.new_empty((len(others), *base.shape))
    for i, x in enumerate(others):
        torch.sub(x, base, out=deltas[i])
    w = task.coef
    deltas.mul_(w)
    mixed = deltas.sum(dim=0)
    if task.shared["normalize"]:
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
        mixed /= divisor
    if task.shared["lambda"] != 1:
        mixed *= task.shared["lambda"]
    out.copy_((base + mixed).to(base.dtype))


class _Stats:
    """Running dot products for the cosine similarity of each input to the reference."""

    def __init__(self, n: int) -> None:
        self.dot = [0.0] * n
        self.sq = [0.0] * n

    def add(self, other: _Stats) -> None:
        for i in range(len(self.dot)):
            self.dot[i] += other.dot[i]
            self.sq[i] += other.sq[i]


def _piece(
    task: _Task, lo: int, hi: int, files: MappedFiles, ref: int | None
) -> tuple[torch.Tensor, _Stats | None]:
    """Output elements [lo, hi) of one task (and its similarity sums when `ref` is set)."""
    views = [files.view(info, lo, hi) for info in task.sources]
    if not task.merged:
        x = views[0]
        for info, y in zip(task.sources[1:], views[1:]):
            if y.dtype != x.dtype or not torch.equal(x, y):
                raise MergeError(
                    f"tensor {task.out.name} is not floating point and differs between models "
                    f"(e.g. {info.file.parent}): take it from one model with `take`"
                )
        out = x.to(task.out.dtype) if x.dtype != task.out.dtype else x.clone()
        for info in task.sources:
            files.release(info, lo, hi)
        return out, None
    fn = _linear if task.method == "linear" else _task_arithmetic
    out = torch.empty(hi - lo, dtype=task.out.dtype)
    stats = _Stats(len(views)) if ref is not None else None
    for c in range(0, hi - lo, CHUNK):
        xs = [v[c : c + CHUNK] for v in views]
        if task.load is not None:
            xs = [x.to(task.load) for x in xs]
        xs = [x.to(task.align) for x in xs]
        fn(xs, task, out[c : c + CHUNK])
        if stats is not None:
            r = xs[ref].float()
            for i, x in enumerate(xs):
                xf = x.float()
                stats.dot[i] += float(torch.dot(xf, r))
                stats.sq[i] += float(torch.dot(xf, xf))
    for info in task.sources:
        files.release(info, lo, hi)
    return out, stats


# --- running --------------------------------------------------------------------------------


def _pieces(tasks: list[_Task]) -> list[tuple[int, int, int]]:
    out = []
    for k, task in enumerate(tasks):
        numel = math.prod(task.out.shape)
        step = max(1, PIECE_BYTES // task.out.dtype.itemsize)
        out.extend((k, lo, min(numel, lo + step)) for lo in range(0, numel, step))
        if numel == 0:
            out.append((k, 0, 0))
    return out


def _report(config: MergeConfig, tasks: list[_Task], stats: dict[str, _Stats]) -> dict[str, Any]:
    ref = config.reference_index
    total = _Stats(len(config.models))
    for s in stats.values():
        total.add(s)

    def cos(s: _Stats, i: int) -> float | None:
        den = math.sqrt(s.sq[i] * s.sq[ref])
        return s.dot[i] / den if den > 0 else None

    models = []
    for i, spec in enumerate(config.models):
        if i == ref:
            continue
        models.append(
            {
                "model": spec.label,
                "overall": cos(total, i),
                "groups": {g: cos(s, i) for g, s in stats.items()},
            }
        )
    return {
        "reference": config.models[ref].label,
        "metric": "cosine similarity of the flattened weights of merged tensors",
        "models": models,
    }


def format_report(report: Mapping[str, Any]) -> str:
    """A text table: one row per layer group (and `overall`), one column per compared model."""
    models = report["models"]
    if not models:
        return f"similarity: only the reference model {report['reference']}\n"
    heads = [Path(m["model"]).name or m["model"] for m in models]
    groups = ["overall", *models[0]["groups"]]
    width = max(len(g) for g in groups)
    lines = [f"cosine similarity to {report['reference']}"]
    lines.append(f"{'':<{width}}  " + "  ".join(f"{h:>12.12}" for h in heads))
    for g in groups:
        vals = [m["overall"] if g == "overall" else m["groups"][g] for m in models]
        cells = ["           -" if v is None else f"{v:12.4f}" for v in vals]
        lines.append(f"{g:<{width}}  " + "  ".join(cells))
    return "\n".join(lines) + "\n"


def _copy_side_files(config: MergeConfig, tmp: Path, dtype_name: str | None) -> None:
    cfg_src = config.config_from or config.models[config.reference_index].path
    cfg_path = cfg_src / "config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        if dtype_name:  # the dtype transformers loads the checkpoint in
            cfg["dtype"] = dtype_name
            if "torch_dtype" in cfg:
                cfg["torch_dtype"] = dtype_name
        write_json(tmp / "config.json", cfg)
    elif config.config_from is not None:
        raise MergeError(f"config_from {config.config_from} has no config.json")
    if (cfg_src / "generation_config.json").is_file():
        copy_file(cfg_src / "generation_config.json", tmp / "generation_config.json")
    tok_src = config.tokenizer_from or cfg_src
    for fname in TOKENIZER_FILES:
        if (tok_src / fname).is_file():
            copy_file(tok_src / fname, tmp / fname)


def merge_from_config(
    config: MergeConfig | str | os.PathLike,
    output: str | os.PathLike,
    *,
    shard_size: str | int = "5GB",
    threads: int | None = None,
    force: bool = False,
    report: bool = False,
    progress: bool = False,
    on_tensor: Callable[[str, int, int], None] | None = None,
) -> MergeResult:
    """Run a merge described by a `MergeConfig` or a YAML file into the folder `output`.

    `threads` reader/merge threads (default min(4, cores)); `on_tensor(name, done, total)` is
    called after each output tensor is written. Raises `MergeError` for bad inputs before the
    output is created; the output folder appears only when complete.
    """
    if not isinstance(config, MergeConfig):
        config = load_config(config)
    max_bytes = parse_size(shard_size)
    threads = threads or min(4, os.cpu_count() or 1)
    if threads < 1:
        raise MergeError(f"threads must be >= 1, got {threads}")
    output = Path(output)
    start = time.perf_counter()
    inputs = [
        _renamed(config, i, read_checkpoint(spec.path, spec.label))
        for i, spec in enumerate(config.models)
    ]
    tasks = _plan(config, inputs)
    shards = plan_shards([t.out for t in tasks], max_bytes)
    names = shard_names(len(shards))
    pieces = _pieces(tasks)
    ref = config.reference_index if report else None
    stats: dict[str, _Stats] = {}
    total_bytes = sum(t.out.nbytes for t in tasks)
    shard_of = {e.name: s for s, entries in enumerate(shards) for e in entries}
    remaining = {k: 0 for k in range(len(tasks))}
    for k, _, _ in pieces:
        remaining[k] += 1

    files = MappedFiles()
    old_threads = torch.get_num_threads()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="merge", file=sys.stderr)
    try:
        # Parallelism comes from our reader threads; torch's own pool would oversubscribe cores.
        # (work items are cache-sized chunks: intra-op threads would only add sync overhead)
        torch.set_num_threads(1)
        folder = AtomicFolder(output, force=force)
        with folder as tmp, ThreadPoolExecutor(threads) as pool:
            window = 2 * threads
            queue: deque[tuple[int, Future]] = deque()
            it = iter(pieces)

            def fill() -> None:
                while len(queue) < window:
                    nxt = next(it, None)
                    if nxt is None:
                        return
                    k, lo, hi = nxt
                    queue.append((k, pool.submit(_piece, tasks[k], lo, hi, files, ref)))

            fill()
            fh = None
            current = -1
            done = 0
            try:
                while queue:
                    k, fut = queue.popleft()
                    fill()
                    out, piece_stats = fut.result()
                    s = shard_of[tasks[k].out.name]
                    if s != current:
                        if fh is not None:
                            fh.flush()
                            os.fsync(fh.fileno())
                            fh.close()
                        fh = open(tmp / names[s], "wb")
                        fh.write(shard_header(shards[s]))
                        current = s
                    fh.write(memoryview(out.view(torch.uint8).numpy()))
                    if piece_stats is not None:
                        stats.setdefault(tasks[k].group, _Stats(len(config.models))).add(
                            piece_stats
                        )
                    if bar is not None:
                        bar.update(out.numel() * out.element_size())
                    remaining[k] -= 1
                    if remaining[k] == 0:
                        done += 1
                        if on_tensor is not None:
                            on_tensor(tasks[k].out.name, done, len(tasks))
                if fh is not None:
                    fh.flush()
                    os.fsync(fh.fileno())
            finally:
                if fh is not None:
                    fh.close()
                for _, fut in queue:
                    fut.cancel()
            if len(shards) > 1:
                write_json(
                    tmp / INDEX_NAME,
                    {
                        "metadata": {"total_size": total_bytes},
                        "weight_map": {e.name: names[s] for e, s in _flat(shards)},
                    },
                )
            _copy_side_files(config, tmp, config.out_dtype or config.dtype)
            _save_config_copy(config, tmp)
            result_report = _report(config, tasks, stats) if report else None
            if result_report is not None:
                write_json(tmp / REPORT_NAME, result_report)
            folder.commit()
    finally:
        files.close()
        torch.set_num_threads(old_threads)
        if bar is not None:
            bar.close()
    return MergeResult(
        output=output,
        tensors=len(tasks),
        shards=len(shards),
        bytes=total_bytes,
        seconds=time.perf_counter() - start,
        report=result_report,
    )


def _flat(shards: list[list[OutEntry]]) -> list[tuple[OutEntry, int]]:
    return [(e, s) for s, entries in enumerate(shards) for e in entries]


def _save_config_copy(config: MergeConfig, tmp: Path) -> None:
    """Keep the merge recipe beside its result (the YAML as written, or one built from it)."""
    text = config.source_text
    if text is None:
        import yaml

        text = yaml.safe_dump(_to_yaml_dict(config), sort_keys=False)
    with open(tmp / CONFIG_COPY_NAME, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def _to_yaml_dict(config: MergeConfig) -> dict[str, Any]:
    models = []
    for i, spec in enumerate(config.models):
        if i == config.base_index and not spec.parameters and not spec.take and not spec.rename:
            continue
        entry: dict[str, Any] = {"model": str(spec.path)}
        if spec.parameters:
            entry["parameters"] = dict(spec.parameters)
        if spec.rename:
            entry["rename"] = dict(spec.rename)
        if spec.take:
            entry["take"] = list(spec.take)
        models.append(entry)
    data: dict[str, Any] = {"merge_method": config.method, "models": models}
    if config.base_index is not None:
        data["base_model"] = str(config.models[config.base_index].path)
    optional = {
        "parameters": dict(config.parameters) or None,
        "dtype": config.dtype,
        "out_dtype": config.out_dtype,
        "exclude": list(config.exclude) or None,
        "config_from": str(config.config_from) if config.config_from else None,
        "tokenizer_from": str(config.tokenizer_from) if config.tokenizer_from else None,
    }
    data.update({k: v for k, v in optional.items() if v is not None})
    return data


def merge(
    models: Sequence[str | os.PathLike],
    weights: Sequence[float],
    output: str | os.PathLike,
    *,
    method: str = "linear",
    base: str | os.PathLike | None = None,
    normalize: bool | None = None,
    lambda_: float | None = None,
    dtype: str | None = None,
    out_dtype: str | None = None,
    rename: Mapping[str | os.PathLike, Mapping[str, str]] | None = None,
    take: Mapping[str | os.PathLike, Sequence[str]] | None = None,
    exclude: Sequence[str] = (),
    config_from: str | os.PathLike | None = None,
    tokenizer_from: str | os.PathLike | None = None,
    shard_size: str | int = "5GB",
    threads: int | None = None,
    force: bool = False,
    report: bool = False,
    progress: bool = False,
    on_tensor: Callable[[str, int, int], None] | None = None,
) -> MergeResult:
    """Merge Hugging Face checkpoint folders into `output`, streaming shard by shard.

    `models[i]` gets `weights[i]`. `method="linear"` averages (normalized by the weight sum
    unless `normalize=False`); `method="task_arithmetic"` adds the weighted task vectors
    `models[i] - base` to `base` (scaled by `lambda_`, normalized if `normalize=True`).
    `rename` and `take` are keyed by model path (as given in `models` or `base`): a prefix map
    for that model's tensor names, and glob patterns of output names copied from that model
    unmerged. `exclude` drops output names. See the module docstring for dtypes and YAML.

    Example (the omnimodal text-backbone merge, towers re-attached unmerged):

        merge(["enc", "vl", "asr"], [1, 1, 1], "omni",
              rename={"vl": {"model.language_model.": "model."},
                      "asr": {"thinker.model.": "model.", "thinker.lm_head.": "lm_head."}},
              take={"vl": ["model.visual.*"], "asr": ["thinker.audio_tower.*"]})
    """
    models = list(models)
    weights = list(weights)
    if len(weights) != len(models):
        raise MergeError(f"got {len(weights)} weights for {len(models)} models")
    if method == "linear" and base is not None:
        raise MergeError("base is used by method='task_arithmetic' only")
    keyed = {"rename": dict(rename or {}), "take": dict(take or {})}
    known = [str(m) for m in models] + ([str(base)] if base is not None else [])
    for what, mapping in keyed.items():
        for key in mapping:
            if str(key) not in known:
                raise MergeError(f"{what} names model {str(key)!r}, which is not in models/base")
    entries: list[dict[str, Any]] = []
    for m, w in zip(models, weights):
        entry: dict[str, Any] = {"model": str(m), "parameters": {"weight": float(w)}}
        for what, mapping in keyed.items():
            value = next((v for k, v in mapping.items() if str(k) == str(m)), None)
            if value is not None:
                entry[what] = dict(value) if what == "rename" else list(value)
        entries.append(entry)
    data: dict[str, Any] = {"merge_method": method, "models": entries}
    if base is not None:
        data["base_model"] = str(base)
        if str(base) not in map(str, models):
            base_extra = {
                what: mapping[k]
                for what, mapping in keyed.items()
                for k in mapping
                if str(k) == str(base)
            }
            if base_extra:  # the base needs its own entry to carry rename/take
                base_entry: dict[str, Any] = {"model": str(base)}
                for what, value in base_extra.items():
                    base_entry[what] = dict(value) if what == "rename" else list(value)
                entries.append(base_entry)
    params = {}
    if normalize is not None:
        params["normalize"] = bool(normalize)
    if lambda_ is not None:
        params["lambda"] = float(lambda_)
    if params:
        data["parameters"] = params
    optional = {
        "dtype": dtype,
        "out_dtype": out_dtype,
        "exclude": list(exclude) or None,
        "config_from": config_from,
        "tokenizer_from": tokenizer_from,
    }
    data.update(
        {
            k: (str(v) if isinstance(v, os.PathLike) else v)
            for k, v in optional.items()
            if v is not None
        }
    )
    return merge_from_config(
        config_from_dict(data),
        output,
        shard_size=shard_size,
        threads=threads,
        force=force,
        report=report,
        progress=progress,
        on_tensor=on_tensor,
    )
