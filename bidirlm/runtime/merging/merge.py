"""Streaming, shard-wise merging of safetensors checkpoints (`bidirlm merge`, `merge(...)`).

Methods, with mergekit's exact semantics (the same YAML gives the same tensors in both tools):

- `linear`: `sum_i w_i * x_i`, divided by `sum_i w_i` when `normalize` (default true), computed
  in float32 (float64 for float64 inputs) and rounded once to the merge dtype.
- `task_arithmetic`: `base + lambda * sum_i w_i * (x_i - base)` over the non-base models, divided
  by `sum_i w_i` when `normalize` (default false), computed in the merge dtype as mergekit does
  (set `dtype: float32` for float32 arithmetic on bf16 checkpoints).

- `ties`, `dare_ties`, `dare_linear`, `breadcrumbs`, `breadcrumbs_ties`, `della`,
  `della_linear`, `slerp`, `nuslerp`, `model_stock`, `passthrough`, `sce`, `ram`, `ramplus_tl`,
  `multislerp`, `karcher`, `arcee_fusion`, `nearswap`: mergekit's methods with its parameters
  (density, gamma, epsilon, rescale, int8_mask, t, nuslerp_flatten, nuslerp_row_wise,
  filter_wise, scale, select_topk, r, alpha, normalize_weights, eps, max_iter, tol), merged from
  whole tensors (they sort, take norms or draw masks over the whole tensor); formulas in
  `bidirlm.runtime.merging.methods` and `.extra_methods`, one entry per method in `.registry`.
  A parameter another method reads is accepted with a `MergeWarning` (mergekit ignores it); a
  value outside its domain (density 1.7, slerp t 2.5) is a `MergeError` naming it. The random
  ones (dare_*, della*) draw per-tensor seeded masks (`random_seed:`, default 0): reproducible,
  mergekit's own stream cannot be reproduced (see `methods`).
- `slices:` (mergekit's layer stacking, `layer_range: [start, end)` per source) and
  `tokenizer_source: base | union | PATH` (vocabulary tensors rebuilt for that tokenizer, as
  mergekit; see `bidirlm.runtime.merging.vocab`).

The merge dtype is `dtype` (inputs are cast to it when read), else the promoted dtype of the
inputs; outputs are cast to `out_dtype` if set. Tensors stream one slice at a time from memory-
mapped shards through reader threads into output shards written as they fill; the output folder
appears only once complete (see `merge_io`).

YAML keys (mergekit's):

    merge_method: linear | task_arithmetic | ties | dare_ties | ... (see above)
    base_model: PATH               # task_arithmetic; linear treats it as one more input
    models:
      - model: PATH                # a local Hugging Face folder with safetensors weights
        parameters: {weight: 0.5}  # number, per-layer gradient [a, b, ...] or [{filter, value}]
    parameters: {normalize: true, lambda: 1.0, weight: ...}   # defaults for every model
    dtype: float32 | bfloat16 | float16 | float64
    out_dtype: ...
    tokenizer_source: base | union | PATH  # output tokenizer; vocabulary rows follow it
    chat_template: auto | chatml | JINJA  # the output tokenizer's chat template
    slices:                        # instead of models: layer stacking
      - sources: [{model: PATH, layer_range: [0, 16], parameters: {...}}]
        parameters: {...}          # per-slice (then global) parameters; base_model: per slice

bidirlm's own keys (mergekit ignores them):

    models:
      - model: PATH
        rename: {"model.language_model.": "model."}  # prefix map applied to this model's names
        take: ["model.visual.*"]   # output names copied unmerged from this model (glob)
    exclude: ["mtp.*"]             # output names dropped (glob)
    config_from: PATH              # config.json source (default: the base, else the first model)
    tokenizer_from: PATH           # tokenizer/processor files source (default: config_from)
    random_seed: 0                 # masks of dare_* / della*

Every pattern and filter applies to output names (after `rename`). A tensor that is neither
taken nor excluded must exist in every model with one shape (integer tensors must also be equal
and are copied); anything else is a `MergeError` naming the model and tensor, raised before the
output folder is created.

The output folder holds the safetensors shards (`model.safetensors`, or `model-0000k-of-0000n`
files and `model.safetensors.index.json`), `config.json` (its `dtype` set when `dtype` or
`out_dtype` is), `generation_config.json` and tokenizer files when the sources have them,
`merge_config.yml` (the recipe) and, with `report`, `merge_report.json`: the cosine similarity of
each model to the base (else the first model), over all merged weights and per layer.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import warnings
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bidirlm.runtime import outputs

from .checks import check_config_fits
from .config import MergeConfig, MergeError, config_from_dict, has_tokenizer, load_config
from .io import (
    INDEX_NAME,
    AtomicFolder,
    MappedFiles,
    OutEntry,
    copy_file,
    plan_shards,
    read_checkpoint,
    shard_header,
    shard_names,
    write_json,
)
from .plan import Task, compute_piece, output_layers, plan, renamed_tensors, split_pieces
from .report import Stats, build_report, format_report
from .vocab import Alignment, build_alignment, resolve_chat_template, write_chat_template

__all__ = [
    "MergeConfig",
    "MergeError",
    "MergeResult",
    "MergeWarning",
    "format_report",
    "load_config",
    "merge",
    "merge_from_config",
    "parse_size",
    "run_merge",
]

REPORT_NAME = "merge_report.json"
CONFIG_COPY_NAME = "merge_config.yml"
# the shared tokenizer files (runtime/outputs.py) plus the processor files a merged folder keeps
TOKENIZER_FILES = (
    *outputs.TOKENIZER_FILES,
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
)


class MergeWarning(UserWarning):
    """Something a merge accepted but did not use (parameters the method ignores)."""


@dataclass(frozen=True)
class MergeResult:
    """What a merge wrote: the folder, tensor and shard counts, bytes, seconds, the report."""

    output: Path
    tensors: int
    shards: int
    bytes: int
    seconds: float
    report: dict[str, Any] | None = None


def parse_size(value: str | int) -> int:
    """'5GB' -> 5e9, '500MiB' -> 500 * 2**20, 1234 -> 1234 (decimal units as in transformers)."""
    if isinstance(value, int):
        size = value
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?I?B?)\s*", str(value).upper())
        if not m:
            raise MergeError(f"shard size {value!r} is not a size like 5GB or 500MiB")
        if m.group(2) == "B":  # mergekit reads "5B" as 5 billion, transformers as 5 bytes
            raise MergeError(f"shard size {value!r} is ambiguous: write 5GB or a byte count")
        unit = m.group(2).rstrip("B")
        power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("I")]
        size = int(float(m.group(1)) * (1024 if unit.endswith("I") else 1000) ** power)
    if size <= 0:
        raise MergeError(f"shard size must be positive, got {value!r}")
    return size


def _output_config(
    config: MergeConfig, dtype_name: str | None, alignment: Alignment | None = None
) -> dict[str, Any] | None:
    """The output's config.json: `config_from`'s (default: the base, else the first model)
    with the merge's dtype, vocabulary size and layer count; None when the source has none."""
    cfg_src = config.config_from or config.models[config.reference_index].path
    cfg_path = cfg_src / "config.json"
    if cfg_path.is_file():
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise MergeError(f"cannot read {cfg_path}: {exc}") from None
        if not isinstance(cfg, dict):
            raise MergeError(f"{cfg_path} is not a JSON object")
        if dtype_name:  # the dtype transformers loads the checkpoint in
            cfg["dtype"] = dtype_name
            if "torch_dtype" in cfg:
                cfg["torch_dtype"] = dtype_name
        text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else None
        if alignment is not None:  # mergekit: vocab_size = the output tokenizer's length
            target = text if "vocab_size" not in cfg and text is not None else cfg
            target["vocab_size"] = alignment.rows
        layers = output_layers(config)
        if layers is not None:  # slices stack layers: num_hidden_layers is their count
            target = text if "num_hidden_layers" not in cfg and text is not None else cfg
            target["num_hidden_layers"] = layers
            types = target.get("layer_types")
            if isinstance(types, list) and len(types) != layers:
                target["layer_types"] = [
                    types[min(src.start + o, len(types) - 1)]
                    for sl in config.slices
                    for src in sl.sources[:1]
                    for o in range(sl.layers)
                ]
        return cfg
    if config.config_from is not None:
        raise MergeError(f"config_from {config.config_from} has no config.json")
    return None


def _copy_side_files(
    config: MergeConfig,
    tmp: Path,
    cfg: dict[str, Any] | None,
    alignment: Alignment | None = None,
    chat_template: str | None = None,
) -> None:
    cfg_src = config.config_from or config.models[config.reference_index].path
    if cfg is not None:
        write_json(tmp / "config.json", cfg)
    if (cfg_src / "generation_config.json").is_file():
        copy_file(cfg_src / "generation_config.json", tmp / "generation_config.json")
    if alignment is not None and alignment.tokenizer is not None:  # union or stripped
        before = set(os.listdir(tmp))
        alignment.tokenizer.save_pretrained(str(tmp))
        for name in sorted(set(os.listdir(tmp)) - before):  # transformers does not fsync
            with open(tmp / name, "rb") as fh:
                os.fsync(fh.fileno())
    else:
        tok_src = config.tokenizer_from or cfg_src
        for fname in TOKENIZER_FILES:
            if (tok_src / fname).is_file():
                copy_file(tok_src / fname, tmp / fname)
    if chat_template is not None:
        write_chat_template(tmp, chat_template)


def _stream(
    tasks: list[Task],
    shards: list[list[OutEntry]],
    names: list[str],
    tmp: Path,
    *,
    threads: int,
    ref: int | None,
    n_models: int,
    bar: Any,
    on_tensor: Callable[[str, int, int], None] | None,
    check_finite: bool = True,
) -> dict[str, Stats]:
    """Compute every piece on `threads` workers and write them, in order, into the shards.

    At most 2 * threads pieces are in flight, so memory is a few pieces whatever the model size.
    Returns the similarity sums per layer group (empty unless `ref` is set).
    """
    pieces = split_pieces(tasks)
    remaining = [0] * len(tasks)
    for k, _, _ in pieces:
        remaining[k] += 1
    shard_of = {e.name: s for s, entries in enumerate(shards) for e in entries}
    stats: dict[str, Stats] = {}
    files = MappedFiles()
    queue: deque[tuple[int, Future]] = deque()
    todo = iter(pieces)
    fh = None
    try:
        with ThreadPoolExecutor(threads) as pool:

            def fill() -> None:
                for k, lo, hi in todo:
                    args = (tasks[k], lo, hi, files, ref, check_finite)
                    queue.append((k, pool.submit(_compute_checked, *args)))
                    if len(queue) >= 2 * threads:
                        return

            fill()
            current, done = -1, 0
            try:
                while queue:
                    k, fut = queue.popleft()
                    fill()
                    out, piece_stats = fut.result()
                    s = shard_of[tasks[k].out.name]
                    if s != current:  # shards are written one after the other, each fsynced
                        if fh is not None:
                            _close_synced(fh)
                        fh = open(tmp / names[s], "wb")
                        fh.write(shard_header(shards[s]))
                        current = s
                    fh.write(memoryview(out.view(torch.uint8).numpy()))
                    if piece_stats is not None:
                        stats.setdefault(tasks[k].group, Stats(n_models)).add(piece_stats)
                    if bar is not None:
                        bar.update(out.numel() * out.element_size())
                    remaining[k] -= 1
                    if remaining[k] == 0:
                        done += 1
                        if on_tensor is not None:
                            on_tensor(tasks[k].out.name, done, len(tasks))
            finally:  # on error: drop queued work; the pool waits for the running pieces
                for _, fut in queue:
                    fut.cancel()
        if fh is not None:
            _close_synced(fh)
            fh = None
    finally:
        if fh is not None:
            fh.close()
        files.close()
    return stats


FINITE_CHECKED = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def _compute_checked(
    task: Task, lo: int, hi: int, files: MappedFiles, ref: int | None, check: bool
) -> tuple[torch.Tensor, Any]:
    """`compute_piece`, refusing a non-finite result (checked in the worker threads)."""
    out, stats = compute_piece(task, lo, hi, files, ref)
    if check and out.dtype in FINITE_CHECKED and not is_finite(out):
        raise MergeError(
            f"tensor {task.out.name} of the merge has non-finite values (NaN/Inf): nothing was "
            "written; check the input models and weights (allow_non_finite=True / "
            "--allow-non-finite writes it anyway)"
        )
    return out, stats


def is_finite(x: torch.Tensor) -> bool:
    """Whether every value of `x` is finite, from its min and max: NaN and +/-Inf propagate into
    them. One vectorized reduction, ~25x faster than `isfinite(x).all()` on bf16 CPU tensors
    (1.0 vs 37 ms for 4M elements), which cost the merge a third of its time."""
    if x.numel() == 0:
        return True
    lo, hi = torch.aminmax(x.reshape(-1))
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def _close_synced(fh: Any) -> None:
    fh.flush()
    os.fsync(fh.fileno())
    fh.close()


def merge_from_config(
    config: MergeConfig | Mapping[str, Any] | str | os.PathLike,
    output: str | os.PathLike,
    *,
    shard_size: str | int = "5GB",
    threads: int | None = None,
    force: bool = False,
    report: bool = False,
    progress: bool = False,
    on_tensor: Callable[[str, int, int], None] | None = None,
    allow_non_finite: bool = False,
    replace_empty: bool = False,
) -> MergeResult:
    """Run a merge described by a `MergeConfig`, a YAML file, a parsed YAML mapping or mergekit's
    own `MergeConfiguration` object into the folder `output`.

    `threads` reader/merge threads (default min(4, cores)); `on_tensor(name, done, total)` is
    called after each output tensor is written. Raises `MergeError` for bad inputs before the
    output is created; the output folder appears only when complete. While it runs, torch's
    intra-op thread count is 1 (restored after): the merge's parallelism is its own threads.
    A non-finite (NaN/Inf) output value is a `MergeError` and nothing is written, unless
    `allow_non_finite` (for inputs that already hold such values on purpose). The output must
    not be, or contain, an input model or the working directory.
    """
    if isinstance(config, Mapping):  # a parsed YAML mapping
        config = config_from_dict(config)
    elif hasattr(config, "model_dump"):  # mergekit's MergeConfiguration (pydantic)
        config = config_from_dict(config.model_dump(mode="json", exclude_none=True))
    elif not isinstance(config, MergeConfig):
        config = load_config(config)
    max_bytes = parse_size(shard_size)
    if threads is None:
        threads = min(4, os.cpu_count() or 1)
    if threads < 1:
        raise MergeError(f"threads must be >= 1, got {threads}")
    output = Path(output)
    start = time.perf_counter()
    inputs = [
        renamed_tensors(config, i, read_checkpoint(spec.path, spec.label))
        for i, spec in enumerate(config.models)
    ]
    if report and config.slices:
        raise MergeError("the similarity report compares whole models: not with `slices:`")
    if config.ignored:  # listed once, as one line
        warnings.warn(
            f"merge_method {config.method} ignores parameter(s) {', '.join(config.ignored)} "
            "(accepted as mergekit does)",
            MergeWarning,
            stacklevel=2,
        )
    alignment = build_alignment(config)
    tasks = plan(config, inputs, alignment)
    out_cfg = _output_config(config, config.out_dtype or config.dtype, alignment)
    if config.config_from is not None and out_cfg is not None:
        check_config_fits(out_cfg, ((t.out.name, t.out.shape) for t in tasks), config.config_from)
    chat_template = None
    if config.chat_template is not None:
        tok_src = config.tokenizer_from or config.config_from
        tok_src = tok_src or config.models[config.reference_index].path
        if (alignment is None or alignment.tokenizer is None) and not has_tokenizer(tok_src):
            raise MergeError(
                f"chat_template needs a tokenizer in the output, but {tok_src} has none "
                "(set tokenizer_source or tokenizer_from to a folder with one)"
            )
        chat_template = resolve_chat_template(config.chat_template, [m.path for m in config.models])
    shards = plan_shards([t.out for t in tasks], max_bytes)
    names = shard_names(len(shards))
    total_bytes = sum(t.out.nbytes for t in tasks)

    old_threads = torch.get_num_threads()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="merge", file=sys.stderr)
    try:
        # Work items are cache-sized chunks: torch's intra-op pool would only add sync overhead
        # and oversubscribe the cores our reader threads already use.
        torch.set_num_threads(1)
        sources = [m.path for m in config.models] + [config.config_from, config.tokenizer_from]
        folder = AtomicFolder(
            output,
            force=force,
            inputs=[p for p in sources if p is not None],
            replace_empty=replace_empty,
        )
        with folder as tmp:
            stats = _stream(
                tasks,
                shards,
                names,
                tmp,
                threads=threads,
                ref=config.reference_index if report else None,
                n_models=len(config.models),
                bar=bar,
                on_tensor=on_tensor,
                check_finite=not allow_non_finite,
            )
            if len(shards) > 1:
                weight_map = {e.name: names[s] for s, entries in enumerate(shards) for e in entries}
                index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
                write_json(tmp / INDEX_NAME, index)
            _copy_side_files(config, tmp, out_cfg, alignment, chat_template)
            _save_config_copy(config, tmp)
            result_report = build_report(config, stats) if report else None
            if result_report is not None:
                write_json(tmp / REPORT_NAME, result_report)
            folder.commit()
    finally:
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


def run_merge(
    merge_config: Any,
    out_path: str | os.PathLike,
    options: Any = None,
    config_source: str | None = None,
) -> MergeResult:
    """mergekit's `run_merge(merge_config, out_path, options)` call form, so mergekit's own
    tests run with only this import changed: `merge_config` a `MergeConfiguration`, a mapping or
    a YAML path; `out_path` may be an existing empty folder (mergekit's tests pass a fresh
    temporary directory). Of `options` only `out_shard_size` is read (the rest concerns
    mergekit's executor: devices, lazy loading, LoRA cache); `config_source` is ignored (the
    recipe copy is written from the configuration)."""
    shard_size = getattr(options, "out_shard_size", None) or "5GB"
    return merge_from_config(merge_config, out_path, shard_size=shard_size, replace_empty=True)


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
    weights: Sequence[float | None],
    output: str | os.PathLike,
    *,
    method: str = "linear",
    base: str | os.PathLike | None = None,
    normalize: bool | None = None,
    lambda_: float | None = None,
    parameters: Mapping[str, Any] | None = None,
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
    allow_non_finite: bool = False,
) -> MergeResult:
    """Merge Hugging Face checkpoint folders into `output`, streaming shard by shard.

    `models[i]` gets `weights[i]`. `method="linear"` averages (normalized by the weight sum
    unless `normalize=False`); `method="task_arithmetic"` adds the weighted task vectors
    `models[i] - base` to `base` (scaled by `lambda_`, normalized if `normalize=True`).
    `rename` and `take` are keyed by model path (as given in `models` or `base`): a prefix map
    for that model's tensor names, and glob patterns of output names copied from that model
    unmerged. `exclude` drops output names. See the module docstring for dtypes and YAML.
    Every mergekit method works: `parameters` are its global parameters (e.g.
    `method="ties", base=b, parameters={"density": 0.5}`; `method="slerp", base=a,
    parameters={"t": 0.3}` with `weights=[None, None]`: a None weight sets none).

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
        entry: dict[str, Any] = {"model": str(m)}
        if w is not None:
            entry["parameters"] = {"weight": float(w)}
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
    params = dict(parameters or {})
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
        allow_non_finite=allow_non_finite,
    )
