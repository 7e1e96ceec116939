"""InfoNCE benchmark: fwd and fwd+bwd time, peak memory, in one run per device.

    python -m bench.infonce [--quick] [--batch 512 16384 ...] [--width 1024 2048] [--hard 1]

Implementations, all on the same fixed bf16 embeddings (queries [B, d], documents [M, d] with
M = B * (1 + hard negatives), cosine similarity, temperature 0.05):
- `torch-eager`: `F.normalize`, the `[B, M]` matrix in bf16, `F.cross_entropy` on `.float()`;
- `torch-compile`: `torch.compile` of the same function;
- `sentence-transformers`: `MultipleNegativesRankingLoss.compute_loss_from_embeddings`;
- `bidirlm`: `bidirlm.kernels.infonce_loss`.
`peak_mem_mb` is the peak above the inputs during the call; for fwd+bwd, `peak_mem_mb -
extra.input_grads_mb` (the gradients every implementation returns) is the loss's own memory.
Baselines whose `[B, M]` float32 logits alone exceed `--max-logits-gb` are recorded as skipped.
`--quick` runs tiny shapes on a CPU (the Triton interpreter) as a smoke test.

Target rows (`pass="memory"`, every run, CPU included), bf16, one direction: B = 16k, M = 64k
(3 hard negatives, issue #27's target: <= 20 Triton launches per direction, loss memory < 1% of
eager's) and M = 32k, d = 2048; B = 256k, d = 1024 and 2048 (fits one GPU). PREDICTED by
`bench/perf_model_losses.py` from the launchers' own plans (launches, working memory from
`infonce_triton.working_memory`, GPU time on H100/H200, host issue time from the per-launch host
cost measured here, waves) against eager's lower bound of 8 B M bytes (its float32 `[B, M]`
logits and their log-softmax, or their gradients, are alive together). On a GPU the measured
rows follow.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # Without a GPU our kernels run in Triton's interpreter; it must be chosen before the
    # kernels' module is imported (triton.jit reads it at decoration time).
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    from bench.perf_model import infonce_extra
    from bench.runner import Runner, similarity_flops
except ModuleNotFoundError:  # run as a script: python bench/infonce.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.perf_model import infonce_extra
    from bench.runner import Runner, similarity_flops

TEMPERATURE = 0.05
FULL_BATCHES = [512, 2048, 8192, 16384, 65536, 262144]
FULL_WIDTHS = [1024, 2048]


def eager_loss(queries: torch.Tensor, documents: torch.Tensor) -> torch.Tensor:
    """The baseline users write: the whole [B, M] matrix, cross-entropy in float32."""
    logits = (
        torch.nn.functional.normalize(queries, dim=-1)
        @ torch.nn.functional.normalize(documents, dim=-1).T
    )
    target = torch.arange(queries.shape[0], device=queries.device)
    return torch.nn.functional.cross_entropy(logits.float() / TEMPERATURE, target)


def _impls(compile_ok: bool) -> dict[str, Callable | None]:
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from bidirlm.kernels import infonce_loss

    st = MultipleNegativesRankingLoss(None, scale=1.0 / TEMPERATURE)

    def st_loss(queries: torch.Tensor, documents: torch.Tensor) -> torch.Tensor:
        columns = list(documents.split(queries.shape[0]))  # positives, then each hard negative
        return st.compute_loss_from_embeddings([queries, *columns], None)

    return {
        "torch-eager": eager_loss,
        "torch-compile": torch.compile(eager_loss) if compile_ok else None,
        "sentence-transformers": st_loss,
        "bidirlm": lambda q, d: infonce_loss(q, d, temperature=TEMPERATURE),
    }


_GPU_GB = {"h100": 80.0, "h200": 141.0}


def memory_target_rows(runner: Runner, impls: dict, measure: bool) -> None:
    """Predicted (and on a GPU measured) rows of the memory targets (module docstring)."""
    from bench.perf_model_losses import predict_infonce, row_extra

    cases = [(16384, 3, 2048, "lt-1pct-of-eager"), (16384, 1, 2048, "one-hard-negative"),
             (262144, 1, 1024, "fits-one-gpu"), (262144, 1, 2048, "fits-one-gpu")]  # fmt: skip
    for batch, hard, width, target in cases:
        docs = (1 + hard) * batch
        case = f"target-B{batch}-M{docs}-d{width}"
        preds = {g: predict_infonce(batch, docs, width, gpu=g) for g in ("h100", "h200")}
        ours_mb = preds["h100"].working_mb
        eager_mb = 8 * batch * docs / 2**20
        io_gb = 2 * (batch + docs) * width * 2 / 2**30  # bf16 inputs + their gradients
        extra = {
            **row_extra(preds["h100"]), "target": target, "dtype": "bf16",
            "hard_negatives": hard, "loss_mem_mb": round(ours_mb, 2),
            "eager_loss_mem_mb_lower_bound": round(eager_mb, 1),
            "fraction_of_eager": round(ours_mb / eager_mb, 5),
            "inputs_and_grads_gb": round(io_gb, 2),
            "fits_h100": io_gb + ours_mb / 1024 < _GPU_GB["h100"],
            "eager_fits_h100": io_gb + eager_mb / 1024 < _GPU_GB["h100"],
            "predicted_ms_h100": round(preds["h100"].gpu_ms, 3),
            "predicted_ms_h200": round(preds["h200"].gpu_ms, 3),
        }  # fmt: skip
        with contextlib.redirect_stdout(io.StringIO()):  # the runner prints ms=None as failed
            runner.record(case=case, impl="bidirlm-predicted", pass_="memory", ms=None,
                          peak_mem_mb=round(ours_mb, 2), extra=extra)  # fmt: skip
        print(f"[infonce] predicted {case} (one direction): {extra['fwd_launches']} + "
              f"{extra['bwd_launches']} Triton launches, loss memory {ours_mb:.1f} MB = "
              f"{100 * extra['fraction_of_eager']:.2f}% of eager's >= {eager_mb / 1024:.1f} GB; "
              f"inputs + grads {io_gb:.1f} GB; fwd+bwd GPU {extra['predicted_ms_h100']} ms H100 / "
              f"{extra['predicted_ms_h200']} ms H200, host issue "
              f"{extra['predicted_host_issue_ms']} ms")  # fmt: skip
        if not measure:
            continue
        gen = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(batch, width, device="cuda", dtype=torch.bfloat16, generator=gen)
        d = torch.randn(docs, width, device="cuda", dtype=torch.bfloat16, generator=gen)
        q.requires_grad_()
        d.requires_grad_()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        gq, gd = torch.autograd.grad(impls["bidirlm"](q, d), (q, d))
        torch.cuda.synchronize()
        loss_mb = (torch.cuda.max_memory_allocated() - base - gq.nbytes - gd.nbytes) / 2**20
        with contextlib.redirect_stdout(io.StringIO()):
            runner.record(case=case, impl="bidirlm", pass_="memory", ms=None,
                          peak_mem_mb=round(loss_mb, 2),
                          extra={**extra, "predicted": False, "loss_mem_mb": round(loss_mb, 2),
                                 "fraction_of_eager": round(loss_mb / eager_mb, 5)})  # fmt: skip
        print(f"[infonce] measured {case}: loss memory {loss_mb:.1f} MB")
        del q, d, gq, gd
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke run)")
    parser.add_argument("--batch", type=int, nargs="+", help="query counts B")
    parser.add_argument("--width", type=int, nargs="+", help="embedding widths d")
    parser.add_argument("--hard", type=int, default=1, help="hard negatives per query")
    parser.add_argument(
        "--max-logits-gb", type=float, default=24.0, help="skip baselines above this"
    )
    args = parser.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    batches = args.batch or ([16, 48] if args.quick else FULL_BATCHES)
    widths = args.width or ([32] if args.quick else FULL_WIDTHS)
    dtype = torch.bfloat16
    from bidirlm.kernels.dispatch import decide

    path = decide(device).reason
    # Inductor on a CPU needs a C++ toolchain and minutes per shape: only compile on a GPU.
    impls = _impls(compile_ok=on_gpu)
    runner = Runner("infonce", device=device, cpu_rep=3)
    memory_target_rows(runner, impls, measure=on_gpu and not args.quick)
    for width in widths:
        for batch in batches:
            docs = batch * (1 + args.hard)
            case = f"B{batch}-M{docs}-d{width}"
            gen = torch.Generator(device=device).manual_seed(0)
            q = torch.randn(batch, width, device=device, dtype=dtype, generator=gen)
            d = torch.randn(docs, width, device=device, dtype=dtype, generator=gen)
            q.requires_grad_()
            d.requires_grad_()
            grads_mb = round((q.numel() + d.numel()) * q.element_size() / 2**20, 1)
            logits_gb = batch * docs * 4 / 2**30
            for impl, fn in impls.items():
                if fn is None or (impl != "bidirlm" and logits_gb > args.max_logits_gb):
                    why = "no torch.compile without a GPU" if fn is None else "logits too large"
                    for pass_ in ("fwd", "fwd+bwd"):
                        runner.record(
                            case=case,
                            impl=impl,
                            pass_=pass_,
                            ms=None,
                            extra={"skipped": why, "logits_gb": round(logits_gb, 2)},
                        )
                    continue
                # Every implementation returns these input gradients: peak_mem_mb minus
                # input_grads_mb is the memory the loss itself needs.
                extra = {"hard_negatives": args.hard, "dtype": "bf16", "input_grads_mb": grads_mb}
                if impl == "bidirlm":
                    extra["path"] = path
                # bench/perf_model.py's prediction beside our measured rows
                pred = {
                    p: infonce_extra(runner.stamp["device"], batch, docs, width, dtype, p)
                    if impl == "bidirlm" else {}
                    for p in ("fwd", "fwd+bwd")
                }  # fmt: skip
                with torch.no_grad():
                    runner.measure(
                        case=case,
                        impl=impl,
                        pass_="fwd",
                        fn=lambda fn=fn, q=q, d=d: fn(q, d),
                        flops=similarity_flops(batch, docs, width, "fwd"),
                        extra={**extra, **pred["fwd"]},
                    )
                runner.measure(
                    case=case,
                    impl=impl,
                    pass_="fwd+bwd",
                    fn=lambda fn=fn, q=q, d=d: torch.autograd.grad(fn(q, d), (q, d)),
                    flops=similarity_flops(batch, docs, width, "fwd+bwd"),
                    extra={**extra, **pred["fwd+bwd"]},
                )
            q = d = None  # free before the next case allocates
            if on_gpu:
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
