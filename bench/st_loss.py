"""sentence-transformers losses: bidirlm's fused classes vs the originals, in one run.

    python bench/st_loss.py [--quick] [--batch 256] [--width 256] [--hard 1] [--results-dir D]

On the same float32 embeddings (queries [B, d], positives [B, d] and `--hard` columns of hard
negatives, cosine similarity, scale 20): `MultipleNegativesRankingLoss` vs
`FusedMultipleNegativesRankingLoss` and `MultipleNegativesSymmetricRankingLoss` vs
`FusedMultipleNegativesSymmetricRankingLoss`, `compute_loss_from_embeddings` forward and
forward+backward; then one training step (embed + loss + backward) of
`CachedMultipleNegativesRankingLoss` vs `FusedCachedMultipleNegativesRankingLoss` through a
tiny random Qwen3 SentenceTransformer (`--cached-batch` texts, mini-batch 8). On a CPU our loss
runs the kernel's torch reference path (`BIDIRLM_KERNELS=auto`); on a GPU the Triton kernel.
"""

from __future__ import annotations

import argparse
import inspect
import json.decoder
import sys
import tempfile
from pathlib import Path

import torch

try:
    from bench.runner import Runner, similarity_flops
except ModuleNotFoundError:  # run as a script: python bench/st_loss.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.runner import Runner, similarity_flops


def tiny_model(folder: Path, device: str):
    """A 2-layer random Qwen3 SentenceTransformer (width 64) with a BPE trained here."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([inspect.getsource(json.decoder)], trainer=trainer)
    torch.manual_seed(0)
    cfg = Qwen3Config(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        pad_token_id=0,
    )
    Qwen3ForCausalLM(cfg).save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>").save_pretrained(str(folder))
    modules = [Transformer(str(folder), max_seq_length=32), Pooling(64, pooling_mode="mean")]
    return SentenceTransformer(modules=modules, device=device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--hard", type=int, default=1, help="hard-negative columns")
    parser.add_argument("--cached-batch", type=int, default=None)
    parser.add_argument("--results-dir", type=Path, help="where rows go (default bench/results)")
    args = parser.parse_args(argv)
    batch = args.batch or (64 if args.quick else 512)
    cached_batch = args.cached_batch or (16 if args.quick else 64)

    from sentence_transformers.sentence_transformer import losses

    from bidirlm.integrations import sentence_transformers as fused

    device = "cuda" if torch.cuda.is_available() else "cpu"
    runner = Runner("st_loss", results_dir=args.results_dir, cpu_rep=3 if args.quick else 5)
    gen = torch.Generator().manual_seed(0)
    cols = [torch.randn(batch, args.width, generator=gen).to(device) for _ in range(2 + args.hard)]
    docs = batch * (1 + args.hard)
    case = f"B{batch}-d{args.width}-hard{args.hard}"
    pairs = [
        ("sentence-transformers", losses.MultipleNegativesRankingLoss),
        ("bidirlm", fused.FusedMultipleNegativesRankingLoss),
        ("sentence-transformers-symmetric", losses.MultipleNegativesSymmetricRankingLoss),
        ("bidirlm-symmetric", fused.FusedMultipleNegativesSymmetricRankingLoss),
    ]
    for impl, cls in pairs:
        loss = cls(torch.nn.Identity(), scale=20.0)

        def fwd(loss=loss) -> None:
            with torch.no_grad():
                loss.compute_loss_from_embeddings(cols, None)

        def fwd_bwd(loss=loss) -> None:
            xs = [c.detach().requires_grad_() for c in cols]
            loss.compute_loss_from_embeddings(xs, None).backward()

        flops = similarity_flops(batch, docs, args.width)
        runner.measure(case=case, impl=impl, pass_="fwd", fn=fwd, flops=flops)
        runner.measure(
            case=case,
            impl=impl,
            pass_="fwd+bwd",
            fn=fwd_bwd,
            flops=similarity_flops(batch, docs, args.width, "fwd+bwd"),
        )
    with tempfile.TemporaryDirectory(prefix="bidirlm-bench-st-") as tmp:
        model = tiny_model(Path(tmp) / "tiny", device)
        source = inspect.getsource(json.decoder).split("\n")
        texts = [line.strip() or "empty line" for line in source][: 2 * cached_batch]
        features = [
            dict(model.tokenize(texts[:cached_batch])),
            dict(model.tokenize(texts[cached_batch:])),
        ]
        for impl, cls in [
            ("sentence-transformers-cached", losses.CachedMultipleNegativesRankingLoss),
            ("bidirlm-cached", fused.FusedCachedMultipleNegativesRankingLoss),
        ]:
            loss = cls(model, scale=20.0, mini_batch_size=8)

            def step(loss=loss) -> None:
                model.zero_grad(set_to_none=True)
                loss([dict(f) for f in features], None).backward()

            runner.measure(
                case=f"tiny-qwen3-B{cached_batch}-mb8",
                impl=impl,
                pass_="fwd+bwd",
                fn=step,
                extra={"what": "embed + loss + backward through the model"},
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
