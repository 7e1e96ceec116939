"""The ops stand alone: `bidirlm.kernels` with torch, triton and numpy only.

Imports `bidirlm.kernels`, runs a forward and a backward of `flash_attn_func`,
`flash_attn_varlen_func`, `mntp_loss` and `infonce_loss` (the torch path on a CPU; Triton's
interpreter when TRITON_INTERPRET=1), compares each against plain PyTorch in float64, and fails
then merges two tiny checkpoints with `bidirlm merge` (a mergekit YAML: safetensors and pyyaml are
core too), and fails when any of transformers, datasets, sentence_transformers, scipy or PIL got
imported.

    python .ci/core_check.py            # in any environment (tests/test_core_install.py runs it)
    python .ci/core_check.py --core     # also: those packages are not even installed (CI's
                                        # core-only venv, `pip install -e .` without extras)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

FORBIDDEN = ("transformers", "datasets", "sentence_transformers", "scipy", "PIL")


def _close(name: str, got, want, tol: float) -> None:  # noqa: ANN001 - torch tensors
    err = (got.double() - want).abs().max().item()
    if not err <= tol:
        raise AssertionError(f"{name}: max error {err:.3g} > {tol:g}")


def check_ops() -> None:
    import torch
    import torch.nn.functional as F

    from bidirlm.kernels import flash_attn_func, flash_attn_varlen_func, infonce_loss, mntp_loss

    gen = torch.Generator().manual_seed(0)

    def leaf(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).requires_grad_()

    def grads(*xs: torch.Tensor) -> list[torch.Tensor]:
        out = [x.grad.clone() for x in xs]
        for x in xs:
            x.grad = None
        return out

    def ref(*xs: torch.Tensor) -> list[torch.Tensor]:
        return [x.detach().double().requires_grad_() for x in xs]

    # flash_attn_func: q/k/v [B, S, H, D], bidirectional, GQA 4:2
    q, k, v = leaf(2, 7, 4, 16), leaf(2, 7, 2, 16), leaf(2, 7, 2, 16)
    out = flash_attn_func(q, k, v)
    out.square().sum().backward()
    rq, rk, rv = ref(q, k, v)
    want = F.scaled_dot_product_attention(
        rq.transpose(1, 2),
        rk.transpose(1, 2).repeat_interleave(2, 1),
        rv.transpose(1, 2).repeat_interleave(2, 1),
    ).transpose(1, 2)
    want.square().sum().backward()
    _close("flash_attn_func out", out, want.detach(), 1e-4)
    for name, g, r in zip("qkv", grads(q, k, v), (rq, rk, rv)):
        _close(f"flash_attn_func d{name}", g, r.grad, 1e-3)

    # flash_attn_varlen_func: two packed sequences of lengths 3 and 5, [T, H, D]
    q, k, v = leaf(8, 2, 16), leaf(8, 2, 16), leaf(8, 2, 16)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    out = flash_attn_varlen_func(q, k, v, cu, cu, 5, 5)
    out.square().sum().backward()
    rq, rk, rv = ref(q, k, v)
    pieces = []
    for a, b in ((0, 3), (3, 8)):
        s = F.scaled_dot_product_attention(*(x[a:b].transpose(0, 1) for x in (rq, rk, rv)))
        pieces.append(s.transpose(0, 1))
    want = torch.cat(pieces)
    want.square().sum().backward()
    _close("flash_attn_varlen_func out", out, want.detach(), 1e-4)
    for name, g, r in zip("qkv", grads(q, k, v), (rq, rk, rv)):
        _close(f"flash_attn_varlen_func d{name}", g, r.grad, 1e-3)

    # mntp_loss: hidden [N, d] @ weight [V, d]^T, -100 rows ignored
    hidden, weight = leaf(9, 16), leaf(37, 16)
    labels = torch.tensor([3, -100, 0, 36, 5, -100, 7, 7, 1])
    loss = mntp_loss(hidden, weight, labels)
    loss.backward()
    rh, rw = ref(hidden, weight)
    want = F.cross_entropy(rh @ rw.T, labels, ignore_index=-100)
    want.backward()
    _close("mntp_loss", loss, want.detach(), 1e-5)
    for name, g, r in zip(("hidden", "weight"), grads(hidden, weight), (rh, rw)):
        _close(f"mntp_loss d{name}", g, r.grad, 1e-5)

    # infonce_loss: 5 queries against 5 positives + 5 hard negatives, cosine / 0.05
    queries, docs = leaf(5, 16), leaf(10, 16)
    loss = infonce_loss(queries, docs, temperature=0.05)
    loss.backward()
    rqs, rds = ref(queries, docs)
    sim = F.normalize(rqs, dim=-1) @ F.normalize(rds, dim=-1).T
    want = F.cross_entropy(sim / 0.05, torch.arange(5))
    want.backward()
    _close("infonce_loss", loss, want.detach(), 1e-5)
    for name, g, r in zip(("queries", "documents"), grads(queries, docs), (rqs, rds)):
        _close(f"infonce_loss d{name}", g, r.grad, 1e-5)


def check_merge(tmp: Path) -> None:
    """`bidirlm merge` (mergekit YAML, linear 50/50) of two tiny safetensors folders."""
    import torch
    from safetensors.torch import load_file, save_file

    from bidirlm.cli import main as cli

    tensors = {}
    for i, name in enumerate(("a", "b")):
        folder = tmp / name
        folder.mkdir()
        gen = torch.Generator().manual_seed(i)
        tensors[name] = {
            "model.embed_tokens.weight": torch.randn(8, 4, generator=gen),
            "model.norm.weight": torch.randn(4, generator=gen),
        }
        save_file(tensors[name], str(folder / "model.safetensors"))
        config = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"}
        (folder / "config.json").write_text(json.dumps(config))
    yaml = "models:\n" + "".join(
        f"  - model: {tmp / n}\n    parameters:\n      weight: 0.5\n" for n in ("a", "b")
    )
    yaml += "merge_method: linear\ndtype: float32\n"
    (tmp / "merge.yaml").write_text(yaml)
    rc = cli(["merge", str(tmp / "merge.yaml"), str(tmp / "out")])
    if rc != 0:
        raise AssertionError(f"bidirlm merge exited with {rc}")
    out = load_file(str(tmp / "out" / "model.safetensors"))
    for key, a in tensors["a"].items():
        _close(f"merge {key}", out[key], (a.double() + tensors["b"][key].double()) / 2, 1e-6)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--core", action="store_true", help="also require a core-only install")
    args = parser.parse_args()
    if args.core:
        installed = [m for m in FORBIDDEN if importlib.util.find_spec(m) is not None]
        if installed:
            raise SystemExit(f"core check: not a core-only install, found {', '.join(installed)}")
    import bidirlm.kernels  # noqa: F401 - the import under test

    check_ops()
    with tempfile.TemporaryDirectory(prefix="bidirlm-core-check-") as tmp:
        check_merge(Path(tmp))
    loaded = sorted({m.split(".")[0] for m in sys.modules} & set(FORBIDDEN))
    if loaded:
        raise SystemExit(f"core check: bidirlm.kernels imported {', '.join(loaded)}")
    print("core check: bidirlm.kernels ran 4 ops forward/backward, merge ran, without extras")
    return 0


if __name__ == "__main__":
    sys.exit(main())
