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

from .checks import architectures_differ
from .config import MergeConfig, MergeError
from .io import MappedFiles, OutEntry, TensorInfo
from .methods import SPECS, tensor_generator
from .registry import merge_tensor
from .report import Stats
from .vocab import Alignment, align_rows

PIECE_BYTES = 8 * 2**20  # output bytes per work item: bounds memory whatever the tensor size
# Elements per inner step: a 1 MB float32 accumulator, cache-resident (measured on the 2-core
# CPU for 3 bf16 inputs: 2**16 was 17% slower from per-op overhead, 2**20 no faster).
CHUNK = 1 << 18
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
    params: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # per bound input
    whole: bool = False  # merged from whole tensors (sorts, norms, vocabulary permutation)
    model_ids: list[int] = dataclasses.field(default_factory=list)  # config model per source
    alignment: Alignment | None = None  # rows permuted/filled per tokenizer_source
    seed: int = 0


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
                f"{label} but {ref.shape[0]} in model {labels[0]} (merging needs one "
                "vocabulary: `tokenizer_source: base` or `union` aligns the rows by token, as "
                "in mergekit)"
            )
        raise MergeError(
            f"shape mismatch: tensor {name} is {list(info.shape)} in model {label} but "
            f"{list(ref.shape)} in model {labels[0]}"
        )


def plan(
    config: MergeConfig, inputs: list[dict[str, TensorInfo]], alignment: Alignment | None = None
) -> list[Task]:
    """One `Task` per output tensor, in output order, or a `MergeError` naming the model and
    tensor at fault. `inputs[i]` are model i's tensors keyed by output name; `alignment` the
    vocabulary of `tokenizer_source` (`vocab.build_alignment`)."""
    if config.slices:
        return plan_slices(config, inputs, alignment)
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
            j = next(j for j in range(len(inputs)) if missing[0] in inputs[j])
            has = labels[j]
            differ = architectures_differ(config, j, i)
            if differ:
                raise MergeError(f"{differ} (tensor {missing[0]} is missing from {labels[i]})")
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
    model_ids = list(range(len(inputs)))
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
        t = 0.0
        if m:
            count = len(layers[n[: m.start()]])
            t = int(m.group(1)) / (count - 1) if count > 1 else 1.0
        infos = [tensors[n] for tensors in inputs]
        for i, info in enumerate(infos[1:], 1):
            if info.shape != infos[0].shape and (differ := architectures_differ(config, 0, i)):
                raise MergeError(
                    f"{differ} (tensor {n} is {list(infos[0].shape)} in {labels[0]} but "
                    f"{list(info.shape)} in {labels[i]})"
                )
        tasks.append(
            merged_task(
                config,
                n,
                infos,
                model_ids,
                config.base_index,
                t,
                [None] * len(infos),
                None,
                alignment,
                group,
            )
        )
    if not tasks:
        raise MergeError("nothing to merge: every tensor is excluded")
    return tasks


def merged_task(
    config: MergeConfig,
    n: str,
    infos: list[TensorInfo],
    model_ids: list[int],
    base_model: int | None,
    t: float,
    input_scopes: list[Any],
    shared_scopes: Any,
    alignment: Alignment | None,
    group: str,
) -> Task:
    """The task of output tensor `n` merged from `infos` (input k is config model
    `model_ids[k]`): parameters resolved at layer position `t` in the given scopes (None: the
    model's, then the global ones), dtypes and vocabulary rows decided."""
    labels = [config.models[i].label for i in model_ids]
    vocab = alignment is not None and VOCAB_TENSORS.search(n) and len(infos[0].shape) >= 1
    if vocab:  # rows may differ (tokenizer alignment); the other dimensions may not
        check_shapes(n, [TensorInfo(i.name, i.file, i.dtype, i.shape[1:], 0, 0) for i in infos],
                     labels)  # fmt: skip
    else:
        check_shapes(n, infos, labels)
    if not all(i.dtype.is_floating_point for i in infos):
        # Integer buffers are not averaged: like mergekit, they must agree and are copied.
        return Task(out_entry(n, infos[0].dtype, infos[0].shape), infos, False)
    load = TORCH_DTYPES[config.dtype] if config.dtype else None
    out_dtype = TORCH_DTYPES[config.out_dtype] if config.out_dtype else None
    align = load
    if align is None:
        align = infos[0].dtype
        for i in infos[1:]:
            align = torch.promote_types(align, i.dtype)
    spec = SPECS[config.method]
    base = None
    if base_model is not None and base_model in model_ids:
        base = model_ids.index(base_model)
    shape = infos[0].shape
    result = align
    if spec.float32_result:  # mergekit's float32 mask/scale promotes the result
        result = torch.promote_types(align, torch.float32)
    task = Task(
        out_entry(n, out_dtype or result, shape),
        infos,
        merged=True,
        method=config.method,
        shared=config.shared(n, t, shared_scopes),
        load=load,
        align=align,
        base=base,
        group=group,
        whole=not spec.streamable,
        model_ids=list(model_ids),
        seed=config.random_seed,
    )
    if vocab:
        assert alignment is not None
        task.out = out_entry(n, task.out.dtype, (alignment.rows, *shape[1:]))
        if not alignment.prefix or any(i.shape[0] < alignment.rows for i in infos):
            task.whole, task.alignment = True, alignment
    bound = [
        k for k in range(len(infos)) if spec.per_input_base or spec.base == "ignored" or k != base
    ]
    params = {k: config.input_params(model_ids[k], n, t, input_scopes[k]) for k in bound}
    if config.method == "linear":
        task.weights = [params[k]["weight"] for k in range(len(infos))]
        if task.shared["normalize"] and sum(task.weights) == 0:
            raise MergeError(
                f"weights of tensor {n} sum to 0 and normalize is true (division by zero)"
            )
        acc = torch.float64 if align == torch.float64 else torch.float32
        task.coef = torch.tensor(task.weights, dtype=acc)
        task.coef_parts = task.coef.unbind(0)
    elif config.method == "task_arithmetic":
        task.weights = [params[k]["weight"] for k in bound]
        task.coef = torch.tensor(task.weights, dtype=align).unsqueeze(-1)
    else:
        task.params = [params[k] for k in bound]
        for k in bound:  # mergekit fails mid-merge on this; we refuse before writing anything
            p = params[k]
            if "epsilon" in p and 0 < p["density"] < 1:
                if not 0 < p["density"] - p["epsilon"] < p["density"] + p["epsilon"] < 1:
                    raise MergeError(
                        f"model {labels[k]}: density {p['density']} +/- epsilon {p['epsilon']} "
                        f"must stay in (0, 1) (tensor {n})"
                    )
    return task


def _non_layer(tensors: dict[str, TensorInfo]) -> list[str]:
    return [
        n
        for n, _ in sorted(tensors.items(), key=lambda kv: (kv[1].file, kv[1].offset))
        if not LAYER.search(n)
    ]


def plan_slices(
    config: MergeConfig, inputs: list[dict[str, TensorInfo]], alignment: Alignment | None
) -> list[Task]:
    """mergekit's `slices:`: output layer k (counted over the slices in order) merges layer
    `start + offset` of every source of its slice, with `t = offset / (L - 1)` inside the slice;
    tensors before the layers (names with `embed`) come from the first slice's sources, the
    others outside layers (final norm, LM head) from the last slice's."""
    models = config.models
    tasks: list[Task] = []

    def add(out_name: str, sl_index: int, in_names: list[str], t: float, group: str) -> None:
        sl = config.slices[sl_index]
        if any(fnmatch.fnmatchcase(out_name, p) for p in config.exclude):
            return
        infos = []
        for src, name in zip(sl.sources, in_names):
            if name not in inputs[src.index]:
                raise MergeError(
                    f"tensor {name} is missing from model {models[src.index].label} "
                    f"(slices[{sl_index}], layer_range [{src.start}, {src.end}])"
                )
            infos.append(inputs[src.index][name])
        base = sl.base_index if sl.base_index is not None else config.base_index
        scopes = [(src.parameters, sl.parameters, config.parameters) for src in sl.sources]
        ids = [src.index for src in sl.sources]
        shared = (sl.parameters, config.parameters)
        tasks.append(
            merged_task(config, out_name, infos, ids, base, t, scopes, shared, alignment, group)
        )

    first, last = config.slices[0], config.slices[-1]
    outside_first = _non_layer(inputs[first.sources[0].index])
    outside_last = _non_layer(inputs[last.sources[0].index])
    for n in outside_first:
        if "embed" in n:
            add(n, 0, [n] * len(first.sources), 0.0, "other")
    k = 0
    for s, sl in enumerate(config.slices):
        lead = inputs[sl.sources[0].index]
        for offset in range(sl.layers):
            t = offset / (sl.layers - 1) if sl.layers > 1 else 1.0
            layer = sl.sources[0].start + offset
            names = []
            for n, _ in sorted(lead.items(), key=lambda kv: (kv[1].file, kv[1].offset)):
                m = LAYER.search(n)
                if m and int(m.group(1)) == layer:
                    names.append((n, m))
            if not names:
                raise MergeError(
                    f"model {models[sl.sources[0].index].label} has no layer {layer} "
                    f"(slices[{s}] layer_range [{sl.sources[0].start}, {sl.sources[0].end}])"
                )
            for n, m in names:

                def at(i: int, n: str = n, m: re.Match = m) -> str:
                    return n[: m.start(1)] + str(i) + n[m.end(1) :]

                out_name = at(k)
                group = out_name[: m.start(1)] + str(k)
                add(out_name, s, [at(src.start + offset) for src in sl.sources], t, group)
            k += 1
    for n in outside_last:
        if "embed" not in n:
            add(n, len(config.slices) - 1, [n] * len(last.sources), 0.0, "other")
    if not tasks:
        raise MergeError("nothing to merge: every tensor is excluded")
    return tasks


def output_layers(config: MergeConfig) -> int | None:
    """The output's layer count with `slices:` (None without)."""
    return sum(sl.layers for sl in config.slices) if config.slices else None


def out_entry(name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> OutEntry:
    """The planned output tensor (its byte size from shape and dtype)."""
    return OutEntry(name, dtype, shape, math.prod(shape) * dtype.itemsize)


def linear(
    xs: list[torch.Tensor], task: Task, out: torch.Tensor, acc: torch.Tensor | None = None
) -> None:
    """Write the linear merge of `xs` into `out`, with mergekit's operations (bitwise equal).
    `acc`: a float32/float64 scratch buffer of at least `out`'s size, reused across chunks."""
    w = task.coef
    if acc is None:
        acc = torch.zeros(xs[0].shape, dtype=w.dtype)
    else:  # zero-filled, not the first product: 0 + (-0.0) is +0.0, as in mergekit
        acc = acc[: xs[0].numel()].zero_()
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


def task_arithmetic(
    xs: list[torch.Tensor], task: Task, out: torch.Tensor, acc: torch.Tensor | None = None
) -> None:
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
    if task.whole:  # inputs may have more rows than the output (vocabulary alignment)
        views = [files.view(info, 0, info.numel) for info in task.sources]
        return compute_whole(task, views, files, ref)
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
    acc = None
    if task.method == "linear":
        acc = torch.empty(min(CHUNK, hi - lo), dtype=task.coef.dtype)
    for c in range(0, hi - lo, CHUNK):
        xs = [v[c : c + CHUNK] for v in views]
        if convert:
            if task.load is not None:
                xs = [x.to(task.load) for x in xs]
            xs = [x.to(task.align) for x in xs]
        fn(xs, task, out[c : c + CHUNK], acc)
        if stats is not None:
            r = xs[ref].float()
            for i, x in enumerate(xs):
                xf = x.float()
                stats.dot[i] += float(torch.dot(xf, r))
                stats.sq[i] += float(torch.dot(xf, xf))
    for info in task.sources:
        files.release(info, lo, hi)
    return out, stats


def compute_whole(
    task: Task, views: list[torch.Tensor], files: MappedFiles, ref: int | None
) -> tuple[torch.Tensor, Stats | None]:
    """A whole-tensor task: inputs read whole, cast to `dtype:` (mergekit casts on load),
    vocabulary rows aligned, cast to the merge dtype, merged by `registry.merge_tensor`."""
    xs = [v.reshape(info.shape) for v, info in zip(views, task.sources)]
    if task.load is not None:
        xs = [x.to(task.load) for x in xs]
    if task.alignment is not None:
        base = task.model_ids[task.base] if task.base is not None else None
        xs = align_rows(xs, task.model_ids, base, task.alignment)
    xs = [x.to(task.align) for x in xs]
    if task.method in ("linear", "task_arithmetic"):
        fn = linear if task.method == "linear" else task_arithmetic
        out = torch.empty(task.out.shape, dtype=task.out.dtype)
        fn([x.reshape(-1) for x in xs], task, out.view(-1))
    else:
        generators = []
        if SPECS[task.method].random:
            generators = [
                tensor_generator(task.seed, task.out.name, k)
                for k in range(len(xs))
                if k != task.base
            ]
        merged = merge_tensor(task.method, xs, task.base, task.params, task.shared, generators)
        out = merged.to(task.out.dtype).contiguous()
    stats = None
    if ref is not None and ref < len(xs):
        stats = Stats(len(xs))
        r = xs[ref].float().reshape(-1)
        for i, x in enumerate(xs):
            xf = x.float().reshape(-1)
            stats.dot[i] += float(torch.dot(xf, r))
            stats.sq[i] += float(torch.dot(xf, xf))
    for info in task.sources:
        files.release(info, 0, info.numel)
    return out.reshape(-1), stats


def split_pieces(tasks: list[Task]) -> list[tuple[int, int, int]]:
    """Work items `(task index, lo, hi)`: element ranges of at most PIECE_BYTES output bytes
    (whole tensors for the methods that need them)."""
    out = []
    for k, task in enumerate(tasks):
        numel = math.prod(task.out.shape)
        if task.whole:
            out.append((k, 0, numel))
            continue
        step = max(1, PIECE_BYTES // task.out.dtype.itemsize)
        out.extend((k, lo, min(numel, lo + step)) for lo in range(0, numel, step))
        if numel == 0:
            out.append((k, 0, 0))
    return out
