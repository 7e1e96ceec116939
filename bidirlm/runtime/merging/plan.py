"""Planning and arithmetic of a streaming merge: which output tensor comes from where, in
which dtype, and the per-slice kernels (mergekit's `linear` and `task_arithmetic`, bitwise).

`plan` validates the inputs against the config (missing tensors, shapes, vocabulary sizes,
`take`/`exclude` patterns) before anything is written; `compute_piece` merges one slice of one
tensor from memory-mapped inputs into a fresh output buffer.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from .config import MergeConfig, MergeError
from .io import MappedFiles, OutEntry, TensorInfo
from .report import Stats

PIECE_BYTES = 8 * 2**20  # output bytes per work item: bounds memory whatever the tensor size
CHUNK = 1 << 16  # elements per inner step: the float32 accumulator stays in L2 cache
VOCAB_TENSORS = re.compile(r"(embed_tokens|lm_head|wte|embed_out|word_embeddings)(\.weight)?$")
LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
TORCH_DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass
class Task:
    """One output tensor: copied from one input, or merged from all of them."""

    out: OutEntry
    sources: list[TensorInfo]
    merged: bool
    method: str = "linear"
    weights: list[float] = dataclasses.field(default_factory=list)
    coef: torch.Tensor | None = None  # weights as a tensor in the arithmetic dtype
    coef_parts: tuple[torch.Tensor, ...] = ()  # coef.unbind(0), made once (not per chunk)
    shared: dict[str, Any] = dataclasses.field(default_factory=dict)
    load: torch.dtype | None = None  # `dtype:` cast applied when reading
    align: torch.dtype | None = None  # merge dtype
    base: int | None = None
    group: str = "other"  # report bucket


def renamed_tensors(
    config: MergeConfig, index: int, tensors: dict[str, TensorInfo]
) -> dict[str, TensorInfo]:
    """Model `index`'s tensors keyed by output name (`rename` applied); collisions are errors."""
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


def check_shapes(name: str, infos: list[TensorInfo], labels: list[str]) -> None:
    """Every model's `name` has one shape; a differing row count of an embedding or LM head is
    reported as a vocabulary mismatch."""
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


def plan(config: MergeConfig, inputs: list[dict[str, TensorInfo]]) -> list[Task]:
    """One `Task` per output tensor, in output order, or a `MergeError` naming the model and
    tensor at fault. `inputs[i]` are model i's tensors keyed by output name."""
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
            tasks.append(Task(out_entry(n, dt, info.shape), [info], merged=False, group=group))
            continue
        infos = [t[n] for t in inputs]
        check_shapes(n, infos, labels)
        if not all(i.dtype.is_floating_point for i in infos):
            # Integer buffers are not averaged: like mergekit, they must agree and are copied.
            tasks.append(Task(out_entry(n, infos[0].dtype, infos[0].shape), infos, False))
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
        task = Task(
            out_entry(n, out_dtype or align, infos[0].shape),
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
            task.coef_parts = task.coef.unbind(0)
        else:
            task.weights = [
                config.weight(i, n, t) for i in range(len(infos)) if i != config.base_index
            ]
            task.coef = torch.tensor(task.weights, dtype=align).unsqueeze(-1)
        tasks.append(task)
    if not tasks:
        raise MergeError("nothing to merge: every tensor is excluded")
    return tasks


def out_entry(name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> OutEntry:
    """The planned output tensor (its byte size from shape and dtype)."""
    return OutEntry(name, dtype, shape, math.prod(shape) * dtype.itemsize)


def linear(xs: list[torch.Tensor], task: Task, out: torch.Tensor) -> None:
    """Write the linear merge of `xs` into `out`, with mergekit's operations (bitwise equal)."""
    w = task.coef
    acc = torch.zeros(xs[0].shape, dtype=w.dtype)
    for x, c in zip(xs, task.coef_parts):
        acc.addcmul_(x, c)
    if task.align != out.dtype:  # mergekit rounds to the merge dtype, then to out_dtype
        if task.shared["normalize"]:
            acc.div_(w.sum())
        out.copy_(acc.to(task.align))
    elif task.shared["normalize"]:
        torch.div(acc, w.sum(), out=out)  # divides in float32, rounds once into `out`
    else:
        out.copy_(acc)


def task_arithmetic(xs: list[torch.Tensor], task: Task, out: torch.Tensor) -> None:
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


def compute_piece(
    task: Task, lo: int, hi: int, files: MappedFiles, ref: int | None
) -> tuple[torch.Tensor, Stats | None]:
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
    fn = linear if task.method == "linear" else task_arithmetic
    out = torch.empty(hi - lo, dtype=task.out.dtype)
    stats = Stats(len(views)) if ref is not None else None
    convert = any(v.dtype != task.align for v in views)
    for c in range(0, hi - lo, CHUNK):
        xs = [v[c : c + CHUNK] for v in views]
        if convert:
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


def split_pieces(tasks: list[Task]) -> list[tuple[int, int, int]]:
    """Work items `(task index, lo, hi)`: element ranges of at most PIECE_BYTES output bytes."""
    out = []
    for k, task in enumerate(tasks):
        numel = math.prod(task.out.shape)
        step = max(1, PIECE_BYTES // task.out.dtype.itemsize)
        out.extend((k, lo, min(numel, lo + step)) for lo in range(0, numel, step))
        if numel == 0:
            out.append((k, 0, 0))
    return out
