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
"""

from __future__ import annotations

import argparse
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
    from bench.runner import Runner, similarity_flops
except ModuleNotFoundError:  # run as a script: python bench/infonce.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
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
                with torch.no_grad():
                    runner.measure(
                        case=case,
                        impl=impl,
                        pass_="fwd",
                        fn=lambda fn=fn, q=q, d=d: fn(q, d),
                        flops=similarity_flops(batch, docs, width, "fwd"),
                        extra=extra,
                    )
                runner.measure(
                    case=case,
                    impl=impl,
                    pass_="fwd+bwd",
                    fn=lambda fn=fn, q=q, d=d: torch.autograd.grad(fn(q, d), (q, d)),
                    flops=similarity_flops(batch, docs, width, "fwd+bwd"),
                    extra=extra,
                )
            q = d = None  # free before the next case allocates
            if on_gpu:
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
