"""Attention benchmark: bidirlm vs SDPA backends, FlexAttention and flash-attn, same run.

    python -m bench.attention [--quick] [--dtype bf16] [--head-dims 64,128,256]
                              [--seqlens 512,...,16384] [--tokens 16384] [--impls a,b]

Suites of rows (bench/results/<device>.jsonl, see bench/runner.py):
- dense: head dims 64/128/256 (heads = 2048 / D), sequence lengths 512..16k at a fixed
  `--tokens` per batch (B = tokens / S), full bidirectional; fwd, bwd and fwd+bwd.
- window: a symmetric (256, 256) window at the longest length (SDPA has no window: skipped).
- packed vs padded: a long-tailed mix of lengths (32..2048, log-normal, seeded) of about
  `--tokens` tokens, as a packed batch (bidirlm varlen, flash-attn varlen, FlexAttention with a
  document mask) and padded to the longest (SDPA with a key padding mask, bidirlm dense).
FLOPs count visible pairs only (4 * pairs * H * D forward, 2.5x backward), so padded runs are
charged for their useful work only. `--quick` runs tiny shapes (CPU-friendly) through the same
code; without a GPU, bidirlm runs whatever `bidirlm.kernels.decide` picks (printed).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch

try:
    from bench.perf_model import attention_extra
    from bench.runner import Runner, attention_flops
except ModuleNotFoundError:  # run as a script: python bench/attention.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.perf_model import attention_extra
    from bench.runner import Runner, attention_flops

from bidirlm.kernels import decide, flash_attn_func, flash_attn_varlen_func

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
Impl = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _sdpa_backends(device: torch.device) -> dict[str, object]:
    from torch.nn.attention import SDPBackend

    if device.type != "cuda":
        return {"sdpa-math": SDPBackend.MATH}
    return {
        "sdpa-flash": SDPBackend.FLASH_ATTENTION,
        "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
        "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
    }


def _sdpa(backend, mask: torch.Tensor | None = None) -> Impl:
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v):  # [B, S, H, D] in and out
        with sdpa_kernel(backend):
            out = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                enable_gqa=True,
            )  # fmt: skip
        return out.transpose(1, 2)

    return run


def _flex(mask_mod, batch: int, heads: int, length: int, device) -> Impl | None:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    if device.type != "cuda":
        return None  # FlexAttention's CPU path compiles for minutes; not a useful baseline there
    compiled = torch.compile(flex_attention, dynamic=False)
    block_mask = None
    if mask_mod is not None:
        block_mask = create_block_mask(mask_mod, batch, None, length, length, device=device)

    def run(q, k, v):
        out = compiled(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
            enable_gqa=True,
        )  # fmt: skip
        return out.transpose(1, 2)

    return run


def _flash_attn_module():
    try:
        import flash_attn
    except ImportError:
        return None
    return flash_attn


def _measure_passes(runner: Runner, case: str, impl: str, fn: Impl, tensors, flops_fwd: float):
    """fwd, bwd (on a retained graph) and fwd+bwd rows of one implementation."""
    q, k, v = tensors
    # bench/perf_model.py's predicted time beside our kernels' rows
    pred = lambda p: (  # noqa: E731
        attention_extra(runner.stamp["device"], impl, case, q, flops_fwd, p)
        if impl.startswith("bidirlm") else None
    )  # fmt: skip
    with torch.no_grad():
        row = runner.measure(
            case=case, impl=impl, pass_="fwd", fn=lambda: fn(q, k, v), flops=flops_fwd,
            extra=pred("fwd"),
        )  # fmt: skip
    if row["ms"] is None:
        return
    try:
        out = fn(q, k, v)
    except Exception:  # noqa: BLE001 - already recorded as a failed fwd row
        return
    dout = torch.randn_like(out)
    inputs = (q, k, v)
    runner.measure(
        case=case, impl=impl, pass_="bwd",
        fn=lambda: torch.autograd.grad(out, inputs, dout, retain_graph=True),
        flops=2.5 * flops_fwd, extra=pred("bwd"),
    )  # fmt: skip
    runner.measure(
        case=case, impl=impl, pass_="fwd+bwd",
        fn=lambda: torch.autograd.grad(fn(q, k, v), inputs, dout),
        flops=3.5 * flops_fwd, extra=pred("fwd+bwd"),
    )  # fmt: skip


def _qkv(shape, dtype, device):
    return tuple(torch.randn(shape, device=device, dtype=dtype).requires_grad_() for _ in range(3))


def bench_dense(runner, args, device, dtype, selected) -> None:
    fa = _flash_attn_module()
    longest = max(args.seqlens)
    for head_dim in args.head_dims:
        heads = max(1, args.hidden // head_dim)
        for seqlen in args.seqlens:
            batch = max(1, args.tokens // seqlen)
            tensors = _qkv((batch, seqlen, heads, head_dim), dtype, device)
            windows = [(-1, -1)] + ([(256, 256)] if seqlen == longest and seqlen > 512 else [])
            for window in windows:
                left = window[0]
                pairs = batch * _visible_pairs(seqlen, window)
                flops = attention_flops(pairs, heads, head_dim, "fwd")
                tag = "" if window == (-1, -1) else f"-win{left}"
                case = f"hd{head_dim}-s{seqlen}-b{batch}{tag}"
                impls: dict[str, Impl | None] = {
                    "bidirlm": lambda q, k, v, w=window: flash_attn_func(q, k, v, window_size=w),
                }
                if window == (-1, -1):
                    for name, backend in _sdpa_backends(device).items():
                        impls[name] = _sdpa(backend)
                    impls["flex"] = _flex(None, batch, heads, seqlen, device)
                else:
                    impls["flex"] = _flex(_window_mod(left), batch, heads, seqlen, device)
                if fa is not None:
                    impls["flash-attn"] = lambda q, k, v, w=window: fa.flash_attn_func(
                        q, k, v, window_size=w
                    )
                for name, fn in impls.items():
                    if fn is not None and _wanted(name, selected):
                        _measure_passes(runner, case, name, fn, tensors, flops)
            del tensors


def _visible_pairs(seqlen: int, window: tuple[int, int]) -> int:
    left, right = window
    if left < 0 and right < 0:
        return seqlen * seqlen
    i = torch.arange(seqlen)
    lo = (i - left).clamp(min=0) if left >= 0 else torch.zeros_like(i)
    hi = (i + right).clamp(max=seqlen - 1) if right >= 0 else torch.full_like(i, seqlen - 1)
    return int((hi - lo + 1).sum())


def _window_mod(width: int):
    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx).abs() <= width

    return mask_mod


def mixed_lengths(tokens: int, low: int, high: int, seed: int = 0) -> list[int]:
    """Long-tailed lengths in [low, high] (log-normal, median ~4x low) summing to ~tokens."""
    gen = torch.Generator().manual_seed(seed)
    lengths, total = [], 0
    mu = math.log(4 * low)
    while total < tokens:
        n = int(torch.empty(1).log_normal_(mu, 1.0, generator=gen).clamp(low, high).item())
        n = min(n, tokens - total) if tokens - total >= low else tokens - total
        lengths.append(n)
        total += n
    return lengths


def bench_packed(runner, args, device, dtype, selected) -> None:
    lengths = mixed_lengths(args.tokens, args.mix_low, args.mix_high)
    n, longest, total = len(lengths), max(lengths), sum(lengths)
    pairs = sum(n_i * n_i for n_i in lengths)
    fa = _flash_attn_module()
    print(f"[attention] mix: {n} sequences, {total} tokens, longest {longest}, pairs {pairs}")
    for head_dim in args.mix_head_dims:
        _bench_mix(
            runner, lengths, max(1, args.hidden // head_dim), head_dim, device, dtype, selected, fa
        )


def _bench_mix(runner, lengths, heads, head_dim, device, dtype, selected, fa) -> None:
    """One head dim of the packed vs padded suite (all rows share the useful-pair FLOPs)."""
    n, longest, total = len(lengths), max(lengths), sum(lengths)
    pairs = sum(n_i * n_i for n_i in lengths)
    flops = attention_flops(pairs, heads, head_dim, "fwd")
    case = f"mix-hd{head_dim}-n{n}-t{total}"
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    cu = cu.to(device)
    packed = _qkv((total, heads, head_dim), dtype, device)
    impls: dict[str, Impl | None] = {
        "bidirlm-packed": lambda q, k, v: flash_attn_varlen_func(q, k, v, cu, longest),
    }
    if fa is not None:
        impls["flash-attn-packed"] = lambda q, k, v: fa.flash_attn_varlen_func(
            q, k, v, cu, cu, longest, longest
        )
    doc = torch.repeat_interleave(
        torch.arange(n, device=device), torch.tensor(lengths, device=device)
    )

    def doc_mod(b, h, q_idx, kv_idx):
        return doc[q_idx] == doc[kv_idx]

    flex = _flex(doc_mod, 1, heads, total, device)
    if flex is not None:
        impls["flex-packed"] = lambda q, k, v: flex(q[None], k[None], v[None])[0]
    for name, fn in impls.items():
        if fn is not None and _wanted(name, selected):
            _measure_passes(runner, case, name, fn, packed, flops)
    del packed

    padded = _qkv((n, longest, heads, head_dim), dtype, device)
    mask = (
        torch.arange(longest, device=device)[None, :]
        < torch.tensor(lengths, device=device)[:, None]
    )
    impls = {
        "bidirlm-padded": lambda q, k, v: flash_attn_func(q, k, v, key_padding_mask=mask),
    }
    for name, backend in _sdpa_backends(device).items():
        if name != "sdpa-flash":  # the flash backend takes no mask
            impls[f"{name}-padded"] = _sdpa(backend, mask[:, None, None, :])
    for name, fn in impls.items():
        if _wanted(name, selected):
            _measure_passes(runner, case, name, fn, padded, flops)
    del padded


def _wanted(name: str, selected: set[str] | None) -> bool:
    return selected is None or any(name.startswith(s) for s in selected)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.attention", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke run)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 (GPU)")
    p.add_argument("--head-dims", type=_ints, default=None)
    p.add_argument("--seqlens", type=_ints, default=None)
    p.add_argument("--tokens", type=int, default=None, help="tokens per batch (default 16384)")
    p.add_argument("--hidden", type=int, default=None, help="heads * head_dim (default 2048)")
    p.add_argument("--impls", default=None, help="comma-separated name prefixes to run")
    p.add_argument("--no-packed", action="store_true", help="skip the packed vs padded suite")
    args = p.parse_args(argv)
    if args.quick:
        defaults = {"head_dims": [32], "seqlens": [64, 128], "tokens": 256, "hidden": 64}
        args.mix_low, args.mix_high, args.mix_head_dims = 8, 64, [32]
    else:
        defaults = {
            "head_dims": [64, 128, 256],
            "seqlens": [512, 1024, 2048, 4096, 8192, 16384],
            "tokens": 16384,
            "hidden": 2048,
        }
        args.mix_low, args.mix_high, args.mix_head_dims = 32, 2048, [64, 128]
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.dtype is None:
        args.dtype = "bf16" if torch.cuda.is_available() else "fp32"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype]
    selected = set(args.impls.split(",")) if args.impls else None
    print(f"[attention] bidirlm kernels: {decide(device).impl} ({decide(device).reason})")
    runner = Runner("attention", device=device, cpu_rep=2 if args.quick else 5)
    torch.manual_seed(0)
    bench_dense(runner, args, device, dtype, selected)
    if not args.no_packed:
        bench_packed(runner, args, device, dtype, selected)
    print(f"[attention] {len(runner.rows)} rows -> {runner.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
