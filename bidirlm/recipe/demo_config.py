"""The demo's vocabulary: its sizes, variants, references, tasks and pipeline phase names.

Shared by the other demo modules (`demo_data`, `demo_runs`, `demo_measure`, `demo_report`,
`demo_charts`) and `demo.run_demo`, which ties them together.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

METRIC = "ndcg@10"


@dataclass(frozen=True)
class DemoSize:
    """Model shape and training budget of one demo size."""

    name: str
    pretrained: bool  # start from the shipped pre-trained base (else: random + causal_steps)
    hidden: int  # the random base's shape (unused when pretrained)
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    causal_steps: int  # (unused when pretrained)
    mntp_steps: int
    contrastive_steps: int
    tokens_per_batch: int  # causal/MNTP micro-batch, packed
    max_seq_len: int
    pair_batch: int  # contrastive pairs per step
    query_len: int
    doc_len: int
    eval_queries: int | None  # None: every held-out query
    eval_documents: int | None  # None: every held-out document (else a subset with the answers)
    eval_length: int
    lr_causal: float
    lr_mntp: float
    lr_contrastive: float
    temperature: float  # InfoNCE temperature of the contrastive phase
    probe: tuple[int, int, int, int]  # sequence train/test docstrings, token train/test lines
    lm_texts: int  # held-out docs and code texts for the forgetting loss (each)
    # The fine-tuning protocol of every variant: sequence steps, token steps, seeds (averaged)
    finetune: tuple[int, int, int] = (60, 60, 3)
    # Fine-tuning data: sequence train/test docstrings, token train/test lines (None: all)
    finetune_data: tuple[int | None, int | None, int | None, int | None] = (None,) * 4
    # The data-mix sweep: shares of code (vs docs) in extra MNTP runs (the main one has 0.5)
    mix_shares: tuple[float, ...] = (0.0, 0.2, 1.0)


SIZES: dict[str, DemoSize] = {
    # CI: the whole chain on a 2-core CPU in well under a minute; numbers are noise at this size.
    "tiny": DemoSize("tiny", False, 32, 1, 2, 1, 16, 64, 6, 3, 3, 1024, 128, 8, 24, 64, 40, 120,
                     32, 3e-3, 1e-3, 1e-3, 0.05, (24, 24, 16, 16), 4, (3, 3, 1),
                     (32, 32, 16, 16), (0.0,)),
    # `make demo`: the shipped pre-trained base, under 15 minutes on a (shared) 2-core CPU.
    # Contrastive lr on a 450-step base (120 steps x 16 pairs, held-out nDCG@10): 1e-4 0.070,
    # 3e-4 0.089, 6e-4 0.099, 2e-3 0.033 (too high: it also wipes out the token task).
    # 240 contrastive steps: 120 gave Bi+Contrastive 0.156 / Bi+MNTP+Contrastive 0.149 nDCG@10,
    # 240 gave 0.162 / 0.168 (seed 0). Fine-tuning 8 models x 2 tasks x 3 seeds took 329 s of
    # a 605 s demo (12:50 with the fresh-clone set-up): 2 seeds keep `make demo` near 12 minutes.
    # Token steps 60, not 40: at 40, 2 of 48 runs left a rare class unlearned (macro-F1 0.90 /
    # 0.96 vs 0.99); 60 steps gave 0.990-0.997 on the same checkpoints and seeds.
    "quick": DemoSize("quick", True, 0, 0, 0, 0, 0, 0, 0, 80, 240, 2048, 128, 16, 24, 64,
                      None, None, 64, 0.0, 5e-4, 6e-4, 0.05, (240, 240, 300, 200), 32,
                      (60, 60, 2)),
    # The default: the same base with a larger budget, meant for a GPU (runs anywhere, slowly).
    "full": DemoSize("full", True, 0, 0, 0, 0, 0, 0, 0, 600, 600, 8192, 256, 128, 32, 128,
                     None, None, 128, 0.0, 5e-4, 3e-4, 0.05, (918, 632, 1500, 500), 128),
}  # fmt: skip

# Variant name (as in the paper's Figure 2) -> (pipeline phase whose model it is, bidirectional).
# "causal" is the base: the shipped pre-trained model (recipe.base) or, for `tiny`, the causal
# phase trained here (`base_phase`).
VARIANTS: dict[str, tuple[str, bool]] = {
    "Base": ("causal", False),
    "Bi+Base": ("causal", True),
    "Bi+MNTP": ("mntp", True),
    "Bi+MNTP (merged 50/50)": ("merge", True),
    "Bi+Contrastive": ("contrastive", True),
    "Bi+MNTP+Contrastive": ("mntp_contrastive", True),
}

# Not a variant: the random-init model before any training (bidirectional, mean pooling), the
# floor a trained variant has to beat (mean-pooled random embeddings already match words).
REFERENCE = "Untrained (random init)"
BM25 = "BM25 (lexical)"
# The merge-ratio sweep: share of Bi+MNTP in a linear merge with the base (0 = the base).
MERGE_RATIOS = (0.0, 0.25, 0.5, 0.75, 1.0)
TASKS = ("retrieval", "sequence", "token")
# Primary score of each task: retrieval nDCG@10, the fine-tuned held-out macro-F1.
TASK_METRIC = {"retrieval": "ndcg@10", "sequence": "macro_f1", "token": "macro_f1"}

EXAMPLE_QUERY = "Return the number of items in a queue."
EXAMPLE_DOCS = [
    "The count is approximate: other threads may add or remove items at the same time.",
    "Parse a date string and return a datetime object in the local time zone.",
]

MAIN_CODE_SHARE = 0.5  # the share of code (vs docs) in the main MNTP and causal data


def eval_phase(variant: str) -> str:
    """The pipeline phase that evaluates a variant: "Bi+MNTP" -> "eval_bi_mntp"."""
    return "eval_" + re.sub(r"[^a-z0-9]+", "_", variant.lower()).strip("_")


def base_phase(size: DemoSize) -> str:
    """The pipeline name of the base model: the recipe's @base when pre-trained, else "causal"."""
    return "base" if size.pretrained else "causal"


def phase_of(variant: str, size: DemoSize) -> str:
    phase = VARIANTS[variant][0]
    return base_phase(size) if phase == "causal" else phase


def sweep_phase(ratio: float) -> str:
    """The phase holding the merge with `ratio` of Bi+MNTP: "merge_25" (0.5 is "merge")."""
    return "merge" if ratio == 0.5 else f"merge_{round(ratio * 100):02d}"


def mix_phase(share: float) -> str:
    """The MNTP phase of the data-mix sweep with `share` of code: "mntp_code_20"."""
    return f"mntp_code_{round(share * 100):02d}"
