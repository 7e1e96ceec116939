"""Merge benchmark: bidirlm merge vs mergekit on the same YAML, and the time to read the inputs.

Three Qwen3-shaped bf16 checkpoints with random weights (~0.5 GB each; `--quick`: ~20 MB) are
written to a temporary folder, then each contender runs as a child process on the same linear
1/3-each YAML: wall time end to end (imports included; the "startup" rows give that fixed cost
alone) and peak RSS (rusage of that one child, read by a small launcher process). The
"read-bound" row is a child that only reads every input byte (64 MB `readinto`), the floor for
any merge; "write-bound" writes and fsyncs one output's worth of bytes. bidirlm's rows also
carry its own timer without start-up (`merge_s`). Each contender runs with the inputs in the page
cache (warm) and, unless `--no-cold`, after evicting the input files from it with
`posix_fadvise(DONTNEED)` (cold; only our own files are evicted). Rows hold the median of
`--repeat` interleaved runs (3; 1 with `--quick`), the samples in `extra`.

    python bench/merge.py [--quick] [--keep DIR] [--no-cold] [--no-mergekit] [--results-dir D]
    python bench/merge.py --methods all [--quick]   # one row per mergekit method, both tools
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

try:
    from bench.runner import Runner
except ModuleNotFoundError:  # run as a script: python bench/merge.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.runner import Runner

# Qwen3-0.6B widths; the layer count sets the size (~16M parameters per layer + embeddings).
FULL = dict(hidden=1024, inter=3072, heads=16, kv=8, head_dim=128, vocab=151936, layers=6)
QUICK = dict(hidden=256, inter=768, heads=4, kv=2, head_dim=64, vocab=16384, layers=4)
SHARD_BYTES = 200 * 10**6

READ_SCRIPT = """
import sys
buf = bytearray(64 * 2**20)
view = memoryview(buf)
for path in sys.argv[1:]:
    with open(path, "rb", buffering=0) as fh:
        while fh.readinto(view):
            pass
"""

WRITE_SCRIPT = """
import os, sys
folder, size = sys.argv[1], int(sys.argv[2])
os.makedirs(folder, exist_ok=True)
chunk = os.urandom(8 * 2**20)
with open(os.path.join(folder, "model.safetensors"), "wb") as fh:
    for _ in range(size // len(chunk) + 1):
        fh.write(chunk)
    fh.flush()
    os.fsync(fh.fileno())
"""

OURS_SCRIPT = "import sys; from bidirlm.cli import main; sys.exit(main(sys.argv[1:]))"


def _tensors(shape: dict, seed: int) -> dict[str, tuple[int, ...]]:
    h, i, v = shape["hidden"], shape["inter"], shape["vocab"]
    q, kv = shape["heads"] * shape["head_dim"], shape["kv"] * shape["head_dim"]
    names: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for n in range(shape["layers"]):
        p = f"model.layers.{n}."
        names |= {
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "self_attn.q_norm.weight": (shape["head_dim"],),
            p + "self_attn.k_norm.weight": (shape["head_dim"],),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        }
    names["model.norm.weight"] = (h,)
    return names


def make_checkpoint(folder: Path, shape: dict, seed: int) -> int:
    """A Qwen3-shaped bf16 checkpoint (tied embeddings) in HF layout; returns its weight bytes."""
    from safetensors.torch import save_file
    from transformers import Qwen3Config

    folder.mkdir(parents=True, exist_ok=True)
    Qwen3Config(
        hidden_size=shape["hidden"],
        intermediate_size=shape["inter"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv"],
        head_dim=shape["head_dim"],
        vocab_size=shape["vocab"],
        num_hidden_layers=shape["layers"],
        tie_word_embeddings=True,
        dtype="bfloat16",
        architectures=["Qwen3ForCausalLM"],
    ).save_pretrained(folder)
    gen = torch.Generator().manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = total = 0
    for name, dims in _tensors(shape, seed).items():
        t = (0.02 * torch.randn(dims, generator=gen)).to(torch.bfloat16)
        if shards[-1] and size + t.nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.nbytes
        total += t.nbytes
    weight_map = {}
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / fname, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, fname)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


# Peak RSS of one command: a small launcher forks it and reads its rusage with wait4. (A child
# forked straight from this process would start with this process's RSS as its high-water mark.)
LAUNCH_SCRIPT = """
import json, os, sys, time
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - t0
rc = os.waitstatus_to_exitcode(status)
with open(sys.argv[1], "w") as fh:
    json.dump({"wall": wall, "maxrss_kb": usage.ru_maxrss, "rc": rc}, fh)
"""


def run_child(cmd: list[str], cwd: Path) -> tuple[float, float, str]:
    """Wall seconds, peak RSS in MB and combined output of `cmd`, run as its own process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with tempfile.NamedTemporaryFile(suffix=".json") as stats:
        proc = subprocess.run(
            [sys.executable, "-c", LAUNCH_SCRIPT, stats.name, *cmd],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
        )
        result = json.loads(Path(stats.name).read_text() or "{}")
    out = proc.stdout + proc.stderr
    if proc.returncode != 0 or result.get("rc") != 0:
        raise RuntimeError(f"{cmd[0]} failed ({result.get('rc')}): {out[-2000:]}")
    return result["wall"], result["maxrss_kb"] / 1024, out  # ru_maxrss is in KiB on Linux


def evict(paths: list[Path]) -> None:
    """Drop our own files from the page cache (the next read comes from disk)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def method_yaml(method: str, models: list[Path]) -> str:
    """The YAML of one merge method over three checkpoints (the first is the base)."""
    m0, m1, m2 = models
    if method == "slerp":
        return f"merge_method: slerp\nbase_model: {m0}\nmodels:\n  - model: {m0}\n" + (
            f"  - model: {m1}\nparameters: {{t: [0.2, 0.8]}}\ndtype: bfloat16\n"
        )
    if method == "nuslerp":
        body = "".join(f"  - model: {m}\n    parameters: {{weight: 0.5}}\n" for m in (m1, m2))
        return f"merge_method: nuslerp\nmodels:\n{body}dtype: bfloat16\n"
    if method in ("model_stock", "sce", "ram", "ramplus_tl", "karcher"):
        body = "".join(f"  - model: {m}\n" for m in (m1, m2))
        base = f"base_model: {m0}\n"
        if method == "karcher":  # no base: the mean of all three
            body = f"  - model: {m0}\n" + body
            base = ""
        return f"merge_method: {method}\n{base}models:\n{body}dtype: bfloat16\n"
    if method in ("arcee_fusion", "nearswap"):
        params = "parameters: {t: 0.001}\n" if method == "nearswap" else ""
        return (
            f"merge_method: {method}\nbase_model: {m0}\nmodels:\n  - model: {m0}\n"
            f"  - model: {m1}\n{params}dtype: bfloat16\n"
        )
    if method == "multislerp":
        body = "".join(f"  - model: {m}\n    parameters: {{weight: 0.5}}\n" for m in (m1, m2))
        return f"merge_method: multislerp\nbase_model: {m0}\nmodels:\n{body}dtype: bfloat16\n"
    params = "{weight: 0.5, density: 0.5}" if method != "task_arithmetic" else "{weight: 0.5}"
    if method.startswith("della"):
        params = "{weight: 0.5, density: 0.5, epsilon: 0.1}"
    body = "".join(f"  - model: {m}\n    parameters: {params}\n" for m in (m1, m2))
    return f"merge_method: {method}\nbase_model: {m0}\nmodels:\n{body}dtype: bfloat16\n"


BENCH_METHODS = (
    "task_arithmetic",
    "ties",
    "dare_ties",
    "dare_linear",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "slerp",
    "nuslerp",
    "model_stock",
    "sce",
    "ram",
    "ramplus_tl",
    "multislerp",
    "karcher",
    "arcee_fusion",
    "nearswap",
)


def bench_methods(
    models: list[Path], sizes: list[int], root: Path, repo: Path, runner: Runner, args
) -> None:
    """One row per (method, contender): bidirlm and mergekit on the same YAML, warm page cache,
    interleaved, median of `--repeat` runs (wall time with start-up, peak RSS)."""
    methods = BENCH_METHODS if args.methods == "all" else tuple(args.methods.split(","))
    files = sorted(p for m in models for p in m.glob("*.safetensors"))
    in_bytes = sum(sizes)
    out = root / "out"
    mergekit = shutil.which("mergekit-yaml") or str(Path(sys.executable).with_name("mergekit-yaml"))
    for method in methods:
        cfg = root / f"{method}.yml"
        cfg.write_text(method_yaml(method, models))
        contenders = {
            "bidirlm": [sys.executable, "-c", OURS_SCRIPT, "merge", str(cfg), str(out), "--force"]
            + ["--quiet", "--out-shard-size", "5GB"]
        }
        if not args.no_mergekit and Path(mergekit).exists():
            contenders["mergekit"] = [mergekit, str(cfg), str(out), "--out-shard-size", "5B"]
        samples: dict[str, list[tuple[float, float]]] = {}
        for _ in range(args.repeat):
            for impl, cmd in contenders.items():
                shutil.rmtree(out, ignore_errors=True)
                run_child([sys.executable, "-c", READ_SCRIPT, *map(str, files)], repo)  # warm
                wall, rss, _ = run_child(cmd, repo)
                samples.setdefault(impl, []).append((wall, rss))
        case = f"3x{sizes[0] / 1e6:.0f}MB-bf16-{method}"
        for impl, runs in samples.items():
            wall = statistics.median(w for w, _ in runs)
            rss = max(r for _, r in runs)
            extra = {
                "page_cache": "warm",
                "method": method,
                "input_gb": round(in_bytes / 1e9, 3),
                "wall_s_samples": [round(w, 3) for w, _ in runs],
                "rss_over_input": round(rss * 2**20 / in_bytes, 3),
                "cores": os.cpu_count(),
                "loadavg": round(os.getloadavg()[0], 2),
            }
            runner.record(case=case, impl=impl, pass_="warm", ms=wall * 1e3, peak_mem_mb=rss,
                          extra=extra)  # fmt: skip
        if len(samples) == 2:
            ratio = statistics.median(w for w, _ in samples["mergekit"]) / statistics.median(
                w for w, _ in samples["bidirlm"]
            )
            print(f"[merge] {method}: bidirlm is {ratio:.1f}x faster than mergekit (warm)")
    shutil.rmtree(out, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~20 MB checkpoints (smoke run)")
    parser.add_argument("--keep", type=Path, help="generate/reuse the checkpoints in this folder")
    parser.add_argument("--no-cold", action="store_true", help="skip the cold page cache runs")
    parser.add_argument("--no-mergekit", action="store_true", help="skip mergekit")
    parser.add_argument("--threads", type=int, default=None, help="bidirlm reader threads")
    parser.add_argument("--results-dir", type=Path, help="where rows go (default bench/results)")
    parser.add_argument("--repeat", type=int, default=None, help="runs per row (median)")
    parser.add_argument(
        "--methods",
        help="instead of the linear suite, one row per merge method vs mergekit (warm cache): "
        f"'all' or a comma list of {', '.join(BENCH_METHODS)}",
    )
    args = parser.parse_args(argv)

    shape = QUICK if args.quick else FULL
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    root = args.keep or Path(tempfile.mkdtemp(prefix="bidirlm-bench-merge-"))
    repo = Path(__file__).resolve().parent.parent
    try:
        models = [root / f"m{i}" for i in range(3)]
        sizes = []
        for i, m in enumerate(models):
            done = m / "model.safetensors.index.json"
            if done.exists():
                sizes.append(json.loads(done.read_text())["metadata"]["total_size"])
            else:
                sizes.append(make_checkpoint(m, shape, seed=i))
        if args.methods:
            runner = Runner("merge", results_dir=args.results_dir)
            bench_methods(models, sizes, root, repo, runner, args)
            return 0
        files = sorted(p for m in models for p in m.glob("*.safetensors"))
        in_bytes = sum(sizes)
        cfg = root / "linear.yml"
        cfg.write_text(
            "merge_method: linear\nmodels:\n"
            + "".join(f"  - model: {m}\n    parameters: {{weight: 1.0}}\n" for m in models)
            + "dtype: bfloat16\n"
        )
        case = f"3x{sizes[0] / 1e6:.0f}MB-bf16-linear"
        out = root / "out"
        runner = Runner("merge", results_dir=args.results_dir)
        ours_cmd = [sys.executable, "-c", OURS_SCRIPT, "merge", str(cfg), str(out), "--force"]
        ours_cmd += ["--quiet", "--out-shard-size", "5GB"]
        if args.threads:
            ours_cmd += ["--threads", str(args.threads)]
        contenders = {
            "read-bound": [sys.executable, "-c", READ_SCRIPT, *map(str, files)],
            "bidirlm": ours_cmd,
        }
        mergekit = shutil.which("mergekit-yaml") or str(
            Path(sys.executable).with_name("mergekit-yaml")
        )
        if not args.no_mergekit and Path(mergekit).exists():
            contenders["mergekit"] = [mergekit, str(cfg), str(out), "--out-shard-size", "5B"]
        startup = {
            "bidirlm": [
                sys.executable,
                "-c",
                "import bidirlm.commands.merge, bidirlm.runtime.merging.merge",
            ],
        }
        if "mergekit" in contenders:
            startup["mergekit"] = [sys.executable, "-c", "import mergekit.merge, mergekit.options"]
        contenders["write-bound"] = [sys.executable, "-c", WRITE_SCRIPT, str(out), str(sizes[0])]
        caches = ["warm"] if args.no_cold else ["warm", "cold"]
        # Interleave repetitions so a burst of load on this shared machine hits every contender.
        samples: dict[tuple[str, str], list[tuple[float, float, float | None]]] = {}
        for _ in range(args.repeat):
            for impl, cmd in startup.items():  # interpreter start-up + imports: a fixed cost
                wall, rss, _ = run_child(cmd, repo)
                samples.setdefault(("startup", impl), []).append((wall, rss, None))
            for cache in caches:
                for impl, cmd in contenders.items():
                    if impl == "write-bound" and cache == "cold":
                        continue  # it reads nothing
                    shutil.rmtree(out, ignore_errors=True)
                    if cache == "cold":
                        evict(files)
                    else:  # warm: every input byte in the page cache
                        run_child(contenders["read-bound"], repo)
                    wall, rss, text = run_child(cmd, repo)
                    m = re.search(r"in ([0-9.]+) s", text) if impl == "bidirlm" else None
                    merge_s = float(m.group(1)) if m else None  # bidirlm's timer, no start-up
                    samples.setdefault((cache, impl), []).append((wall, rss, merge_s))
        medians = {k: statistics.median(w for w, _, _ in v) for k, v in samples.items()}
        for (cache, impl), runs in samples.items():
            wall = medians[(cache, impl)]
            rss = max(r for _, r, _ in runs)
            extra: dict = {
                "page_cache": cache,
                "input_gb": round(in_bytes / 1e9, 3),
                "wall_s_samples": [round(w, 3) for w, _, _ in runs],
                "rss_over_input": round(rss * 2**20 / in_bytes, 3),
                "threads": args.threads or min(4, os.cpu_count() or 1),
                "cores": os.cpu_count(),
                "loadavg": round(os.getloadavg()[0], 2),
            }
            if cache != "startup" and impl != "write-bound":
                extra["input_gb_per_s"] = round(in_bytes / 1e9 / wall, 3)
            merge_s = [x for _, _, x in runs if x is not None]
            if merge_s:
                extra["merge_s"] = statistics.median(merge_s)
            bound = medians.get((cache, "read-bound"))
            if bound and impl in ("bidirlm", "mergekit"):
                extra["read_bound_fraction"] = round(bound / wall, 3)
                if merge_s:
                    extra["read_bound_fraction_merge_only"] = round(bound / extra["merge_s"], 3)
            runner.record(
                case=case, impl=impl, pass_=cache, ms=wall * 1e3, peak_mem_mb=rss, extra=extra
            )
        for cache in caches:
            mk, ours = medians.get((cache, "mergekit")), medians.get((cache, "bidirlm"))
            if mk and ours:
                print(f"[merge] {cache}: bidirlm is {mk / ours:.1f}x faster than mergekit")
        shutil.rmtree(out, ignore_errors=True)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
