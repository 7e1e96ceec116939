"""Static GPU compile suite: every Triton launch of our ops compiled for sm_90/gfx942/gfx90a on CPU.

    python -m bench.compile [--quick] [--check] [--targets sm90,gfx942,gfx90a] [--jobs N]
                            [--cases 'attention bf16 hd64 *,...']
                            [--known-issues bench/compile_known_issues.toml] [--no-host]

How launches are found: each case (an op, a dtype, a head dim, a variant: dense, key padding
mask, softcap, window, packed varlen, GQA, deterministic; MNTP with/without bias/softcap; InfoNCE
cosine/dot) runs the public op forward + backward on small CPU tensors while Triton launches are
recorded instead of run and the kernels' architecture is reported as the target's; each distinct
launch is then specialized with Triton's binder and compiled with `triton.compile` for the target
(see `bench/compile_check.py`). Nothing runs on a GPU.

One row per distinct launch and target, in `bench/results/compile-<triton version>.jsonl`
(`BIDIRLM_BENCH_RESULTS` redirects): `suite="compile"`, `case` (the first op call that makes the
launch), `impl` (the kernel), `pass` (fwd/bwd), `ms` (compile wall time), and in `extra`:
`target, triton, op, kernel, dtype, head_dim, variant, cases, config` (constexprs, num_warps,
num_stages, waves_per_eu), `compiled, error, registers, spill_bytes, shared_bytes, mma`
(wgmma / mma.sync / mfma / none), `tma, fences_main_loop, dots16, dots16_not_wgmma, violations`
and per target extras (NVIDIA: stack/spill load bytes, CTA-scope fences, MUFU count, and
`ptxas_flags`: the options of triton's own ptxas invocation, e.g. `--regAllocOptLevel=2` on
triton 3.9, which the register report is read with; AMD: SGPRs, scratch bytes). Host overhead
rows (`pass="host"`): microseconds of Python per op call with the
launch itself replaced by a recorder.

`--check` fails (exit 1) on any rule violation (`compile_check.RULES`) that the allow-list file
does not list, and on any listed violation that this run shows fixed.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

# triton 3.9 warns when unset (read once, at import); 1 is its default, what a GPU run uses
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

try:
    from bench.runner import Runner, _version
except ModuleNotFoundError:  # run as a script: python bench/compile.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.runner import Runner, _version

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench import compile_check as cc
from bench import perf_model

KNOWN_ISSUES = Path(__file__).resolve().parent / "compile_known_issues.toml"
_SPECS: list[cc.Spec] = []  # read by forked workers by index


def _compile_index(i: int) -> dict[str, Any]:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        return cc.compile_spec(_SPECS[i])
    except Exception as exc:  # noqa: BLE001 - an analysis failure is reported in the row
        return {"compiled": False, "error": f"analysis failed: {type(exc).__name__}: {exc}"}


def compile_all(specs: list[cc.Spec], jobs: int) -> list[dict[str, Any]]:
    """Facts of every spec, compiled in `jobs` forked processes (a crashing compiler takes
    only its own launch down: the survivors are retried one process each)."""
    _SPECS[:] = specs
    if jobs <= 1:
        return [_compile_index(i) for i in range(len(specs))]
    results: dict[int, dict[str, Any]] = {}
    ctx = multiprocessing.get_context("fork")
    pending = list(range(len(specs)))
    while pending:
        crashed = []
        with cf.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
            futures = {pool.submit(_compile_index, i): i for i in pending}
            for fut in cf.as_completed(futures):
                i = futures[fut]
                try:
                    results[i] = fut.result()
                except cf.process.BrokenProcessPool:
                    crashed.append(i)
        if len(crashed) == len(pending) and jobs == 1:
            for i in crashed:
                results[i] = {"compiled": False, "error": "the compiler process crashed"}
            break
        pending, jobs = crashed, 1  # retry one by one to find the launch that crashes
    return [results[i] for i in range(len(specs))]


def spec_row(spec: cc.Spec, facts: dict[str, Any], triton_version: str) -> dict[str, Any]:
    first = spec.cases[0]
    row: dict[str, Any] = {
        "target": spec.target,
        "triton": triton_version,
        "op": first.op,
        "kernel": spec.kernel,
        "case": first.label,
        "pass": spec.phase,
        "dtype": first.dtype,
        "head_dim": first.head_dim or None,
        "variant": first.variant,
        "cases": [c.label for c in spec.cases],
        "config": spec.config,
        **facts,
    }
    row["compile_s"] = round(row.get("compile_s") or 0.0, 3)
    row["violations"] = cc.violations(row)
    return row


def host_overhead(runner: Runner, reps: int) -> list[dict[str, Any]]:
    """Microseconds of host work per op call (Python layers, torch ops; Triton's argument
    binding timed apart), on tiny CPU tensors with the launch replaced by a recorder: about
    what a GPU run pays on the host per call, less the driver's launch cost (~5 us a launch)
    and with CPU allocations instead of the CUDA caching allocator. aten ops are counted."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    rows = []
    backend = make_backend(cc.gpu_target("sm90"))
    cases = [
        cc.Case("attention", "bf16", "dense", 128),
        cc.Case("mntp_loss", "bf16", "plain"),
        cc.Case("infonce", "bf16", "cosine"),
    ]
    for case, backward in [(c, b) for c in cases for b in (False, True)]:
        with cc.recording(cc.TARGETS["sm90"][3]) as calls:
            # inputs made once, outside the timed calls; tiny shapes: the CPU arithmetic of the
            # torch ops is negligible, what remains is the host's work per call
            call = case.prepare(backward, tiny=True)
            call()  # warm-up: imports, first-call caches
            times = []
            for _ in range(reps):
                calls.clear()
                t0 = time.perf_counter()
                call()
                times.append(time.perf_counter() - t0)
            launches = list(calls)
            counter = _OpCounter()
            with counter:
                call()
        bind = []
        for fn, args, kwargs, _grid, _phase in launches:
            kw = {"debug": False, **kwargs}
            binder = create_function_from_signature(fn.signature, fn.params, backend)
            binder(*args, **kw)  # warm-up
            one = []
            for _ in range(21):
                t0 = time.perf_counter()
                binder(*args, **kw)
                one.append(time.perf_counter() - t0)
            bind.append(statistics.median(one))
        host_us = statistics.median(times) * 1e6
        extra = {
            "host_us": round(host_us, 1),
            "binder_us": round(sum(bind) * 1e6, 1),
            "launches": len(launches),
            "aten_ops": counter.count,
            "note": "tiny CPU tensors, sm_90 configs, Triton launch replaced by a recorder; "
            "binder_us = Triton's argument binding of those launches (part of a real launch)",
        }
        what = "fwd+bwd" if backward else "fwd"
        row = runner.record(
            case=f"{case.label} {what} host", impl="bidirlm", pass_="host", ms=host_us / 1e3,
            extra={**extra, "calls": what},
        )  # fmt: skip
        rows.append(row)
    return rows


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.count += 1
        return func(*args, **(kwargs or {}))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.compile", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="every public variant, 16-bit (the CI set)")
    p.add_argument("--cases", default="", help="comma-separated fnmatch patterns on case labels, "
                   "e.g. 'attention bf16 hd256 *' (default: all of the chosen suite)")  # fmt: skip
    p.add_argument("--check", action="store_true", help="exit 1 on a rule violation")
    p.add_argument("--targets", default=",".join(cc.TARGETS), help="comma-separated targets")
    p.add_argument("--jobs", type=int, default=min(os.cpu_count() or 1, 8))
    p.add_argument("--known-issues", default=str(KNOWN_ISSUES), help="allow-list TOML file")
    p.add_argument("--no-host", action="store_true", help="skip the host overhead rows")
    p.add_argument("--ops", default="attention,mntp_loss,infonce", help="ops to compile")
    p.add_argument("--table", metavar="JSONL", help="print the targets-side-by-side table of the "
                   "latest run in a results file and exit")  # fmt: skip
    return p.parse_args(argv)


def compile_target(
    target: str, cases: list[cc.Case], runner: Runner, version: str, jobs: int
) -> list[dict[str, Any]]:
    """Record, compile and write the rows of every distinct launch of `cases` on `target`."""
    rows = []
    specs, failures = cc.unique_specs(cases, target)
    print(f"bench.compile: {target}: {len(specs)} distinct launches", flush=True)
    for fail in failures:  # the op raised before launching: a launch we could not compile
        row = {**fail, "triton": version, "kernel": "(launcher)", "cases": [fail["case"]],
               "compiled": False}  # fmt: skip
        row["violations"] = cc.violations(row)
        rows.append(runner.record(case=fail["case"], impl="(launcher)", pass_="compile",
                                  ms=None, extra=row)["extra"])  # fmt: skip
    for spec, facts in zip(specs, compile_all(specs, jobs)):
        row = spec_row(spec, facts, version)
        rec = runner.record(
            case=f"{target} {row['case']}",
            impl=spec.kernel,
            pass_=spec.phase,
            ms=row["compile_s"] * 1e3,
            extra=row,
        )
        rows.append(rec["extra"])
    return rows


def compile_target_isolated(
    target: str, cases: list[cc.Case], runner: Runner, version: str, jobs: int
) -> list[dict[str, Any]]:
    """`compile_target` in a forked process: whatever a launcher caches per device (a family,
    a config) while it believes it runs on one target cannot leak into the next target."""
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()

    def child() -> None:
        try:
            queue.put(("ok", compile_target(target, cases, runner, version, jobs)))
        except BaseException as exc:  # noqa: BLE001 - handed to the parent
            queue.put(("error", f"{type(exc).__name__}: {exc}"))

    proc = ctx.Process(target=child)
    proc.start()
    status, payload = "error", "the process exited without a result (crashed?)"
    while True:  # a child that dies without a word must not hang the parent
        try:
            status, payload = queue.get(timeout=5)
            break
        except Exception:  # noqa: BLE001 - queue.Empty: still running?
            if not proc.is_alive():
                break
    proc.join()
    if status != "ok":
        raise RuntimeError(f"compiling for {target} failed: {payload}")
    return payload


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.table:  # print the README table of a results file, compile nothing
        print(target_table(load_compile_rows(args.table)))
        return 0
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # The interpreter replaces @triton.jit kernels with Python: nothing to compile.
        print("bench.compile: TRITON_INTERPRET is set; run it without the interpreter")
        return 2
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    for t in targets:
        cc.gpu_target(t)  # ValueError naming the bad target
    ops = {o.strip() for o in args.ops.split(",") if o.strip()}
    cases = [c for c in cc.all_cases(args.quick) if c.op in ops]
    cases = cc.select_cases(cases, args.cases)
    known = cc.load_known_issues(args.known_issues)
    version = _version("triton")
    runner = Runner("compile", filename=f"compile-{version}.jsonl")
    print(f"bench.compile: triton {version}, {len(cases)} cases, targets {', '.join(targets)}")
    rows: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    for target in targets:
        rows += compile_target_isolated(target, cases, runner, version, args.jobs)
    print(f"bench.compile: compiled in {time.perf_counter() - t_start:.0f} s")
    if not args.no_host:
        host_overhead(runner, reps=20)
    print()
    print(table(rows))
    sm90 = tuple(r for r in rows if r.get("target") == "sm90" and r.get("compiled"))
    if sm90 and "attention" in ops:
        print()
        print("Predicted (static model of the compiled sm_90 SASS, bench/perf_model.py; FA2/FA3")
        print("columns are published numbers, not ours):")
        try:
            print(perf_model.attention_report(sm90))
        except Exception as exc:  # noqa: BLE001 - the model must not hide the compile report
            print(f"perf model failed: {type(exc).__name__}: {exc}")
    if args.check:
        report = cc.check(rows, known)
        print(report.text())
        return 0 if report.ok else 1
    return 0


def table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of compile rows (what the README shows)."""
    head = (
        "| target | kernel | case | warps/stages | regs | spill B | smem KB | mma | TMA | fences |"
    )
    lines = [head, "|---" * 10 + "|"]
    for r in sorted(rows, key=lambda r: (r["target"], r["kernel"], r["case"])):
        cfg = r.get("config") or {}
        if not r.get("compiled"):
            err = (r.get("error") or "")[:60].replace("|", "/")
            lines.append(
                f"| {r['target']} | {r['kernel']} | {r['case']} | | | | | error: {err} | | |"
            )
            continue
        lines.append(
            f"| {r['target']} | {r['kernel']} | {r['case']} | "
            f"{cfg.get('num_warps', '')}/{cfg.get('num_stages', '')} | {r.get('registers')} | "
            f"{r.get('spill_bytes')} | {r.get('shared_bytes', 0) / 1024:.0f} | {r.get('mma')} | "
            f"{'yes' if r.get('tma') else 'no'} | {r.get('fences_main_loop')} |"
        )
    return "\n".join(lines)


def target_table(rows: list[dict[str, Any]]) -> str:
    """One line per launch, the three targets side by side: `regs / spill B / mma / fences`
    (the README's table)."""
    targets = [t for t in cc.TARGETS if any(r["target"] == t for r in rows)]
    cells: dict[tuple[str, str, str], dict[str, str]] = {}
    for r in rows:
        key = (r["kernel"], r["case"], r.get("pass", ""))
        if r.get("compiled"):
            cell = f"{r.get('registers')} / {r.get('spill_bytes')} / {r.get('mma')} / "
            cell += str(r.get("fences_main_loop"))
        else:
            cell = "error: " + (r.get("error") or "").replace("|", "/")[:70]
        cells.setdefault(key, {})[r["target"]] = cell
    head = "| kernel | first case | " + " | ".join(targets) + " |"
    lines = [head, "|---|---|" + "---|" * len(targets)]
    for (kernel, case, _), by_target in sorted(cells.items()):
        row = " | ".join(by_target.get(t, "") for t in targets)
        lines.append(f"| `{kernel}` | {case} | {row} |")
    return "\n".join(lines)


def load_compile_rows(path: Path | str) -> list[dict[str, Any]]:
    """The `extra` dicts of the compile rows of a results file (latest run only)."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("suite") == "compile" and r.get("pass") != "host"]
    if not rows:
        return []
    last = rows[-1]["run_id"]
    return [r["extra"] for r in rows if r["run_id"] == last]


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())
