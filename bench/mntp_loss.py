"""MNTP loss benchmark: fused lm_head + cross-entropy on masked rows, every baseline in one run.

    python -m bench.mntp_loss [--quick] [--dtype bf16] [--models qwen3-0.6b,gemma3-1b]
                              [--tokens 8192,32768,65536] [--ratios 0.2,0.3,0.4] [--impls a,b]

Implementations (each computes the mean MNTP loss and the gradients of hidden and weight):
- torch-gathered: eager `F.cross_entropy((hidden[rows] @ W.T).float(), labels[rows])` on the
  labelled rows only (what a careful user writes by hand; the 1.5x target's baseline).
- torch-all: the same on every row with ignore_index (what a naive user writes).
- torch-compile: `torch.compile` of torch-gathered's matmul + cross-entropy (GPU only: the CPU
  inductor build takes minutes and is not a baseline anyone uses).
- torch-linear-ce: `torch.nn.functional.linear_cross_entropy` on the gathered rows, when the
  installed torch has it.
- liger: Liger-Kernel's fused linear cross-entropy on all rows (it handles ignore_index itself;
  the 2x target's baseline).
- cce: Cut Cross-Entropy (`cut_cross_entropy.linear_cross_entropy`) when the package imports.
- bidirlm: `bidirlm.kernels.mntp_loss`.

Passes: fwd and fwd+bwd (backward through `torch.autograd.grad`, so the gradients are allocated
inside the measured call). FLOPs count the labelled rows only (2 * rows * d * V forward, 3x for
fwd+bwd), so implementations that also compute ignored rows are charged their useful work only.
Each row's `extra` holds `grad_mb` (size of dHidden + dWeight) and `beyond_grads_mb` (peak memory
minus the gradients: the loss's own working memory; the target is < 64 MB on H100/H200 in bf16).

Target rows (`pass="memory"`, every run, CPU included): issue #27's targets at V = 151,936,
32k tokens, 30% labelled (passed as `num_labelled`), d = 1024 and 2048, bf16, PREDICTED by
`bench/perf_model_losses.py` from the launchers' own plans and the kernels' compiled sm_90 SASS:
Triton launches, GPU time on H100 and H200, host issue time (launches x the per-launch host cost
measured on this machine + 4.5 us of binding), waves of each launch, the SASS instructions per
logit by pipe (forward tile, dlogits) and the binding pipe, working memory; on a GPU a measured
row follows.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    from bench.perf_model import mntp_extra
    from bench.runner import Runner, linear_ce_flops, time_gpu
except ModuleNotFoundError:  # run as a script: python bench/mntp_loss.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.perf_model import mntp_extra
    from bench.runner import Runner, linear_ce_flops, time_gpu

from bidirlm.kernels import decide
from bidirlm.kernels.dispatch import interpreting

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# (hidden size d, vocabulary V) of the lm_heads the recipe trains
MODELS = {
    "qwen3-0.6b": (1024, 151936),
    "qwen3-1.7b": (2048, 151936),
    "gemma3-1b": (1152, 262144),
}
QUICK_MODELS = {"tiny": (64, 1003)}
Loss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _mntp_loss() -> Loss:
    from bidirlm.kernels import mntp_loss

    return mntp_loss


def _gathered(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    rows = (y != -100).nonzero().squeeze(1)
    return F.cross_entropy((h.index_select(0, rows) @ w.T).float(), y.index_select(0, rows))


def _all_rows(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy((h @ w.T).float(), y, ignore_index=-100)


def _compiled() -> Loss:
    core = torch.compile(lambda hs, w, ys: F.cross_entropy((hs @ w.T).float(), ys), dynamic=False)

    def run(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        rows = (y != -100).nonzero().squeeze(1)
        return core(h.index_select(0, rows), w, y.index_select(0, rows))

    return run


def _linear_ce(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    rows = (y != -100).nonzero().squeeze(1)
    return F.linear_cross_entropy(h.index_select(0, rows), w, y.index_select(0, rows))


def _liger() -> Loss | None:
    try:
        from liger_kernel.ops.fused_linear_cross_entropy import (
            LigerFusedLinearCrossEntropyFunction,
        )
    except ImportError:
        return None
    return lambda h, w, y: LigerFusedLinearCrossEntropyFunction.apply(h, w, y)[0]


def _cce() -> Loss | None:
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError:
        return None
    return lambda h, w, y: linear_cross_entropy(h, w, y, ignore_index=-100)


def implementations(device: torch.device) -> dict[str, Loss]:
    """Every baseline available here (missing packages and GPU-only ones are left out)."""
    impls: dict[str, Loss | None] = {
        "torch-gathered": _gathered,
        "torch-all": _all_rows,
        "torch-compile": _compiled() if device.type == "cuda" else None,
        "torch-linear-ce": _linear_ce if hasattr(F, "linear_cross_entropy") else None,
        # Triton baselines run on a GPU, or in the interpreter when TRITON_INTERPRET=1
        "liger": _liger() if device.type == "cuda" or interpreting() else None,
        "cce": _cce() if device.type == "cuda" else None,
        "bidirlm": _mntp_loss(),
    }
    return {name: fn for name, fn in impls.items() if fn is not None}


def make_inputs(
    tokens: int, d: int, vocab: int, ratio: float, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, d, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(vocab, d, generator=g) * d**-0.5).to(device, dtype).requires_grad_()
    y = torch.randint(0, vocab, (tokens,), generator=g)
    y[torch.rand(tokens, generator=g) >= ratio] = -100
    return h, w, y.to(device)


def bench_case(
    runner: Runner,
    impls: dict[str, Loss],
    model: str,
    d: int,
    vocab: int,
    tokens: int,
    ratio: float,
    dtype: torch.dtype,
) -> None:
    h, w, y = make_inputs(tokens, d, vocab, ratio, dtype, runner.device)
    rows = int((y != -100).sum())
    case = f"{model}-t{tokens}-r{ratio:g}"
    grad_mb = (h.numel() * h.element_size() + w.numel() * w.element_size()) / 2**20
    for name, fn in impls.items():
        passes = {
            "fwd": lambda fn=fn: fn(h, w, y),
            "fwd+bwd": lambda fn=fn: torch.autograd.grad(fn(h, w, y), (h, w)),
        }
        for pass_, call in passes.items():
            extra = {"rows": rows, "tokens": tokens, "d": d, "vocab": vocab, "ratio": ratio,
                     "dtype": str(dtype).removeprefix("torch."),
                     "grad_mb": round(grad_mb, 2)}  # fmt: skip
            if name == "bidirlm":  # bench/perf_model.py's prediction beside the measured row
                extra.update(mntp_extra(runner.stamp["device"], rows, tokens, d, vocab, dtype,
                                        pass_))  # fmt: skip
            row = runner.measure(
                case=case,
                impl=name,
                pass_=pass_,
                fn=call,
                flops=linear_ce_flops(rows, d, vocab, pass_),
                extra=extra,
            )
            if row["peak_mem_mb"] is not None and pass_ == "fwd+bwd":
                beyond = row["peak_mem_mb"] - grad_mb
                print(f"[mntp_loss]   {name}: {beyond:.1f} MB beyond inputs and gradients")


TARGET = {"tokens": 32768, "vocab": 151936, "ratio": 0.3, "limit_mb": 64.0}


def memory_target_rows(runner: Runner, measure: bool) -> None:
    """The issue #27 targets at V = 151,936, 32k tokens, 30% labelled (passed as
    `num_labelled`): a predicted row per width from `bench/perf_model_losses.py` (launch count,
    predicted GPU time, host issue time, waves, working memory from the launchers' own plans)
    and, on a GPU, the measured row (working memory and fwd+bwd time)."""
    from bench.perf_model_losses import predict_mntp, row_extra

    tokens, vocab, ratio = TARGET["tokens"], TARGET["vocab"], TARGET["ratio"]
    n = int(tokens * ratio)
    for model, d in (("qwen3-0.6b", 1024), ("qwen3-1.7b", 2048)):
        case = f"target-{model}-t{tokens}-r{ratio:g}"
        preds = {gpu: predict_mntp(tokens, ratio, vocab, d, gpu=gpu) for gpu in ("h100", "h200")}
        extra = {
            **row_extra(preds["h100"]), "rows": n, "tokens": tokens, "d": d, "vocab": vocab,
            "ratio": ratio, "dtype": "bf16", "beyond_grads_mb": round(preds["h100"].working_mb, 2),
            "target_mb": TARGET["limit_mb"],
            "meets_target": preds["h100"].working_mb < TARGET["limit_mb"],
            "predicted_ms_h100": round(preds["h100"].gpu_ms, 3),
            "predicted_ms_h200": round(preds["h200"].gpu_ms, 3),
        }  # fmt: skip
        with contextlib.redirect_stdout(io.StringIO()):  # the runner prints ms=None as failed
            runner.record(case=case, impl="bidirlm-predicted", pass_="memory", ms=None,
                          peak_mem_mb=extra["beyond_grads_mb"], extra=extra)  # fmt: skip
        print(f"[mntp_loss] predicted {case}: {extra['launches']} launches, "
              f"{extra['beyond_grads_mb']:.1f} MB beyond inputs and gradients (target < "
              f"{TARGET['limit_mb']:.0f}), fwd+bwd GPU {extra['predicted_ms_h100']} ms H100 / "
              f"{extra['predicted_ms_h200']} ms H200, host issue "
              f"{extra['predicted_host_issue_ms']} ms, fwd waves {extra['fwd_waves']}, dz waves "
              f"{extra['dz_waves']}, grads waves {extra['grads_waves']}")  # fmt: skip
        per = extra["sass_per_logit"]
        print(f"[mntp_loss]   sm_90 SASS per logit (triton {extra['triton']}): fwd tile "
              f"{per['fwd_tile']} ({per['fwd_binding']}-bound), dz {per['dz']} "
              f"({per['dz_binding']}-bound); clocks per tile "
              f"{extra['clocks_per_tile']}")  # fmt: skip
        if not measure:
            continue
        h, w, y = make_inputs(tokens, d, vocab, ratio, torch.bfloat16, runner.device)
        from bidirlm.kernels import mntp_loss

        count = int((y != -100).sum())
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        dh, dw = torch.autograd.grad(mntp_loss(h, w, y, num_labelled=count), (h, w))
        torch.cuda.synchronize()
        beyond = (torch.cuda.max_memory_allocated() - base - dh.nbytes - dw.nbytes) / 2**20
        del dh, dw
        ms = round(time_gpu(lambda a=h, b=w, c=y, k=count: torch.autograd.grad(
            mntp_loss(a, b, c, num_labelled=k), (a, b))), 3)  # fmt: skip
        with contextlib.redirect_stdout(io.StringIO()):
            runner.record(case=case, impl="bidirlm", pass_="memory", ms=ms,
                          peak_mem_mb=round(beyond, 2),
                          extra={**extra, "predicted": False, "beyond_grads_mb": round(beyond, 2),
                                 "meets_target": beyond < TARGET["limit_mb"]})  # fmt: skip
        print(
            f"[mntp_loss] measured {case}: {beyond:.1f} MB beyond inputs and gradients, "
            f"fwd+bwd {ms} ms"
        )
        del h, w, y
        torch.cuda.empty_cache()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.mntp_loss", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke run)")
    p.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="default bf16 (quick: fp32)"
    )
    p.add_argument("--models", default=",".join(MODELS), help=f"subset of {','.join(MODELS)}")
    p.add_argument("--tokens", default="8192,32768,65536", help="tokens per batch (comma list)")
    p.add_argument("--ratios", default="0.2,0.3,0.4", help="mask ratios (comma list)")
    p.add_argument("--impls", default=None, help="subset of implementations (comma list)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick:
        models, tokens, ratios = QUICK_MODELS, [256], [0.3]
        dtype = DTYPES[args.dtype or "fp32"]
    else:
        unknown = set(args.models.split(",")) - set(MODELS)
        if unknown:
            print(f"[mntp_loss] unknown models {sorted(unknown)}; valid: {', '.join(MODELS)}")
            return 2
        models = {m: MODELS[m] for m in args.models.split(",")}
        tokens = [int(t) for t in args.tokens.split(",")]
        ratios = [float(r) for r in args.ratios.split(",")]
        dtype = DTYPES[args.dtype or "bf16"]
    impls = implementations(device)
    if args.impls:
        wanted = set(args.impls.split(","))
        impls = {k: v for k, v in impls.items() if k in wanted}
    decision = decide(device)
    print(f"[mntp_loss] bidirlm kernels: {decision.impl} ({decision.reason})")
    print(f"[mntp_loss] implementations: {', '.join(impls)}")
    runner = Runner("mntp_loss", device=device, cpu_rep=2 if args.quick else 5)
    memory_target_rows(runner, measure=device.type == "cuda" and not args.quick)
    for model, (d, vocab) in models.items():
        for t in tokens:
            for r in ratios:
                bench_case(runner, impls, model, d, vocab, t, r, dtype)
    print(f"[mntp_loss] {len(runner.rows)} rows -> {runner.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
