"""Whole-encoder benchmark: our Qwen3/Gemma3 encoders vs transformers (sdpa), packed vs padded.

    python -m bench.model [--quick] [--models qwen3-0.6b,gemma3-1b] [--tokens 16384]
                          [--max-len 1024] [--dtype bf16]

For each model shape (random weights, built with transformers and read back with `load_model`),
one mixed-length batch (log-normal lengths, seeded, about `--tokens` real tokens, at most
`--max-len` each) runs as
- `bidirlm-packed`: `Encoder(ids [T], cu_seqlens=...)` (no padding at all),
- `bidirlm-padded`: `Encoder(ids [B, S], attention_mask=...)`,
- `transformers-sdpa`: the transformers base model, bidirectional (Qwen3 `is_causal=False`,
  Gemma3 `use_bidirectional_attention=True`), `attn_implementation="sdpa"`, padded,
forward (inference mode) and forward+backward (loss = mean of squared hidden states). Rows record
ms, peak memory and TFLOP/s of useful work (padding is not charged: 2 * non-embedding params *
real tokens + attention over visible pairs forward, 3x for forward+backward); `extra` has the
token counts
(tokens/s = real_tokens / ms); the speedups over transformers, from the same run, are printed.
`--quick` runs tiny shapes on a CPU.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

try:
    from bench.runner import Runner
except ModuleNotFoundError:  # run as a script: python bench/model.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.runner import Runner

from bidirlm.kernels import decide
from bidirlm.runtime.models import load_model

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Published shapes (config.json of Qwen/Qwen3-0.6B and google/gemma-3-1b-pt), random weights.
SHAPES: dict[str, dict[str, Any]] = {
    "qwen3-0.6b": dict(
        model_type="qwen3",
        vocab_size=151936,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=True,
        max_position_embeddings=40960,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
    ),
    "gemma3-1b": dict(
        model_type="gemma3_text",
        vocab_size=262144,
        hidden_size=1152,
        intermediate_size=6912,
        num_hidden_layers=26,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        query_pre_attn_scalar=256,
        sliding_window=512,
        sliding_window_pattern=6,
        max_position_embeddings=32768,
    ),
}
QUICK = dict(
    vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=2, head_dim=16
)
QUICK_SHAPES = {
    "qwen3-0.6b": dict(SHAPES["qwen3-0.6b"], **QUICK, num_attention_heads=4, num_key_value_heads=2),
    "gemma3-1b": dict(
        SHAPES["gemma3-1b"], **QUICK, num_attention_heads=4, num_key_value_heads=1, sliding_window=8
    ),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.model", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke run)")
    p.add_argument(
        "--models", default=",".join(SHAPES), help="comma-separated: " + ", ".join(SHAPES)
    )
    p.add_argument("--tokens", type=int, default=16384, help="real tokens per batch")
    p.add_argument("--max-len", type=int, default=1024, help="longest sequence")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    p.add_argument("--no-backward", action="store_true", help="forward only")
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.max_len = min(args.tokens, 96), min(args.max_len, 32)
        if args.dtype == "bf16":
            args.dtype = "fp32"  # CPU matmuls in bf16 are emulated and slow
    unknown = [m for m in args.models.split(",") if m not in SHAPES]
    if unknown:
        p.error(f"unknown model(s) {unknown}; choose from {', '.join(SHAPES)}")
    return args


def mixed_lengths(tokens: int, max_len: int, seed: int = 0) -> list[int]:
    """Log-normal lengths (median max_len / 4, clipped to [8, max_len]) summing to ~`tokens`."""
    g = torch.Generator().manual_seed(seed)
    lengths: list[int] = []
    while sum(lengths) < tokens:
        x = math.exp(math.log(max_len / 4) + 0.8 * float(torch.randn((), generator=g)))
        lengths.append(int(min(max(x, 8), max_len)))
    return lengths


def build(name: str, shape: dict[str, Any], folder: Path, dtype: torch.dtype, device) -> Any:
    """Save a random-weight checkpoint to `folder`; return transformers' bidirectional model."""
    import transformers

    cfg = dict(shape)
    if cfg.pop("model_type") == "qwen3":
        config = transformers.Qwen3Config(**cfg, is_causal=False)
        model_cls = transformers.Qwen3ForCausalLM
    else:
        config = transformers.Gemma3TextConfig(**cfg, use_bidirectional_attention=True)
        model_cls = transformers.Gemma3ForCausalLM
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = model_cls(config).to(dtype)
    model.save_pretrained(folder)
    print(f"[model] {name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
    return model.model


def useful_flops(enc, lengths: list[int]) -> float:
    """Forward FLOPs on real tokens: 2 * non-embedding params * T + attention over visible keys."""
    c = enc.config
    params = sum(p.numel() for n, p in enc.named_parameters() if not n.startswith("embed"))
    flops = 2.0 * params * sum(lengths)
    for layer_type in set(c.layer_types):
        left, right = c.window_for(layer_type, bidirectional=True)
        visible = 0
        for n in lengths:
            if left < 0:
                visible += n * n
            else:
                visible += sum(min(n - 1, i + right) - max(0, i - left) + 1 for i in range(n))
        layers = c.layer_types.count(layer_type)
        flops += layers * 4.0 * visible * c.num_heads * c.head_dim
    return flops


def bench_model(runner: Runner, name: str, shape: dict[str, Any], args, device, dtype) -> None:
    lengths = mixed_lengths(args.tokens, args.max_len)
    real, b, s = sum(lengths), len(lengths), max(lengths)
    with tempfile.TemporaryDirectory(prefix="bidirlm-bench-model-") as tmp:
        hf = build(name, shape, Path(tmp), dtype, device)
        enc = load_model(tmp, dtype=dtype, device=device)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, shape["vocab_size"], (b, s), generator=g)
    mask = torch.zeros(b, s, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    flat = ids[mask.bool()].to(device)
    cu = torch.zeros(b + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    ids, mask, cu = ids.to(device), mask.to(device), cu.to(device)
    impls = {
        "bidirlm-packed": lambda: enc(flat, cu_seqlens=cu, max_seqlen=s),
        "bidirlm-padded": lambda: enc(ids, attention_mask=mask),
        "transformers-sdpa": lambda: hf(ids, attention_mask=mask).last_hidden_state,
    }
    fwd_flops = useful_flops(enc, lengths)
    case = f"{name}-{real}tok-{b}seq-max{s}"
    info = {"real_tokens": real, "padded_tokens": b * s, "sequences": b, "dtype": args.dtype}
    passes = ["fwd"] if args.no_backward else ["fwd", "fwd+bwd"]
    for pass_ in passes:
        rows = {}
        for impl, fn in impls.items():
            model = hf if impl.startswith("transformers") else enc
            if pass_ == "fwd":
                model.eval()

                def step(fn=fn):
                    with torch.inference_mode():
                        return fn()
            else:
                model.train()

                def step(fn=fn, model=model):
                    model.zero_grad(set_to_none=True)
                    fn().float().square().mean().backward()

            flops = fwd_flops * (1 if pass_ == "fwd" else 3)
            rows[impl] = runner.measure(
                case=case, impl=impl, pass_=pass_, fn=step, flops=flops, extra=dict(info)
            )
        base = rows["transformers-sdpa"]["ms"]
        for impl, row in rows.items():  # tokens/s = extra.real_tokens / ms; ratios from this run
            if row["ms"]:
                tps = real / (row["ms"] * 1e-3)
                speed = f"{base / row['ms']:.2f}x" if base else "n/a"
                print(
                    f"[model]   {impl:<18} {pass_:<8} {tps:>12,.0f} tok/s  {speed} vs transformers"
                )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype]
    print(f"[model] bidirlm kernels: {decide(device).impl} ({decide(device).reason})")
    runner = Runner("model", device=device, cpu_rep=2 if args.quick else 5)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    for name in args.models.split(","):
        torch.manual_seed(0)
        bench_model(runner, name, shapes[name], args, device, dtype)
    print(f"[model] {len(runner.rows)} rows -> {runner.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
