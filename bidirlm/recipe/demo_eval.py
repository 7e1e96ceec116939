"""The demo's measurements beside retrieval: BM25, classification probes, held-out LM loss.

- `bm25_metrics(task)`: Okapi BM25 (k1 1.2, b 0.75, lower-cased word tokens) on a retrieval
  task, scored with the same metrics as the encoders (a lexical row, no dependency).
- `FinetuneProtocol` / `finetune_score(model, task, ...)`: the embedded fine-tuning tasks
  (`bidirlm.runtime.embedded.tasks`: docstring -> stdlib package, source token -> token class)
  with one small protocol for every variant, run by the `sequence-classification` /
  `token-classification` training phases (`bidirlm train`): every weight plus a fresh head,
  a fixed number of steps, 10% warmup and linear decay, scored by held-out macro-F1 at the end
  (no checkpoint selection on the held-out split), repeated over a few fine-tuning seeds.
- `ProbeData` / `probe_scores(model, data)`: the same tasks read off the frozen encoder: its
  features (mean-pooled for the sequence task, each word's first sub-token for the token task)
  train a multinomial logistic-regression head (L-BFGS, fixed L2): what the adaptation left in
  the representations, before fine-tuning moves them.
- `lm_loss(path, texts)`: mean next-token cross-entropy of a checkpoint used as a causal LM
  (causal attention, its tied LM head) on held-out text: the demo's forgetting measure.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bidirlm.runtime.embedded import PACKAGES, TOKEN_TAGS, package_task, token_task
from bidirlm.runtime.evaluation import stdlib_texts
from bidirlm.runtime.evaluation.classification import accuracy, macro_f1
from bidirlm.runtime.evaluation.metrics import retrieval_metrics
from bidirlm.runtime.models import load_model
from bidirlm.runtime.training import train, train_config_from_dict

_WORD = re.compile(r"\w+")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def bm25_rank(
    queries: Sequence[str], documents: Sequence[str], *, k1: float = 1.2, b: float = 0.75
) -> torch.Tensor:
    """BM25 scores `[len(queries), len(documents)]` (Robertson-Sparck Jones idf, +1 inside log)."""
    docs = [Counter(_words(d)) for d in documents]
    n = len(docs)
    lengths = [sum(c.values()) for c in docs]
    avg = sum(lengths) / n if n else 0.0
    postings: dict[str, list[tuple[int, int]]] = {}
    for i, counts in enumerate(docs):
        for word, tf in counts.items():
            postings.setdefault(word, []).append((i, tf))
    norm = [k1 * (1 - b + b * length / max(avg, 1e-9)) for length in lengths]
    scores = torch.zeros(len(queries), n, dtype=torch.float64)
    for qi, query in enumerate(queries):
        row = [0.0] * n
        for word in set(_words(query)):
            hits = postings.get(word)
            if not hits:
                continue
            idf = math.log(1 + (n - len(hits) + 0.5) / (len(hits) + 0.5))
            for i, tf in hits:
                row[i] += idf * tf * (k1 + 1) / (tf + norm[i])
        scores[qi] = torch.tensor(row, dtype=torch.float64)
    return scores


def bm25_metrics(task: Any, k: int = 10) -> dict[str, Any]:
    """BM25 on a `RetrievalTask`: the metrics `evaluation.evaluate` reports for an encoder."""
    doc_ids = list(task.corpus)
    query_ids = [q for q, rel in task.qrels.items() if rel]
    scores = bm25_rank([task.queries[q] for q in query_ids], [task.corpus[d] for d in doc_ids])
    top = scores.topk(min(100, len(doc_ids)), dim=1).indices.tolist()
    ranked = {q: [doc_ids[i] for i in row] for q, row in zip(query_ids, top)}
    return retrieval_metrics(ranked, task.qrels, k=k)


# ------------------------------------------------------------------------------------------
# Classification probes
# ------------------------------------------------------------------------------------------


@dataclass
class ProbeData:
    """Subsets of the embedded fine-tuning tasks (deterministic: every n-th record)."""

    seq_train: list[dict[str, Any]]
    seq_test: list[dict[str, Any]]
    tok_train: list[dict[str, Any]]
    tok_test: list[dict[str, Any]]
    seq_labels: tuple[str, ...]
    tok_labels: tuple[str, ...]

    @classmethod
    def load(cls, seq_train: int, seq_test: int, tok_train: int, tok_test: int) -> ProbeData:
        def every(records: list[dict[str, Any]], count: int) -> list[dict[str, Any]]:
            step = max(len(records) // max(count, 1), 1)
            return records[::step][:count]

        return cls(
            every(package_task("train"), seq_train),
            every(package_task("heldout"), seq_test),
            every(token_task("train"), tok_train),
            every(token_task("heldout"), tok_test),
            tuple(PACKAGES),
            tuple(TOKEN_TAGS),
        )


def _padded(tokenizer: Any, encoded: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(e) for e in encoded)
    pad = tokenizer.pad_token_id or 0
    ids = torch.full((len(encoded), longest), pad, dtype=torch.long)
    mask = torch.zeros(len(encoded), longest, dtype=torch.long)
    for i, e in enumerate(encoded):
        ids[i, : len(e)] = torch.tensor(e)
        mask[i, : len(e)] = 1
    return ids, mask


@torch.inference_mode()
def token_features(
    model: Any, records: Sequence[dict[str, Any]], max_length: int, batch_size: int = 32
) -> tuple[torch.Tensor, list[str]]:
    """Each word's hidden state at its first sub-token: `[n_words, d]` float32 and the tags.

    Words are joined with spaces; a word cut by `max_length` is dropped.
    """
    tok = model.tokenizer
    feats: list[torch.Tensor] = []
    tags: list[str] = []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        texts, spans = [], []
        for r in chunk:
            pos, sp = 0, []
            for w in r["tokens"]:
                sp.append((pos, pos + len(w)))
                pos += len(w) + 1
            texts.append(" ".join(r["tokens"]))
            spans.append(sp)
        enc = tok(texts, truncation=True, max_length=max_length, return_offsets_mapping=True)
        ids, mask = _padded(tok, enc["input_ids"])
        hidden = model(ids.to(model.device), attention_mask=mask.to(model.device)).float().cpu()
        for i, r in enumerate(chunk):
            offsets = enc["offset_mapping"][i]
            for (ws, we), tag in zip(spans[i], r["tags"]):
                first = next((t for t, (s, e) in enumerate(offsets) if e > s and e > ws), None)
                if first is None or offsets[first][0] >= we:
                    continue
                feats.append(hidden[i, first])
                tags.append(tag)
    return torch.stack(feats), tags


def _fit_predict(
    x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, classes: int
) -> torch.Tensor:
    """Multinomial logistic regression (standardized features, L2 1e-2, L-BFGS 100 iterations)."""
    x_train, x_test = x_train.double(), x_test.double()
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    w = torch.zeros(x_train.shape[1], classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, bias], lr=1.0, max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x_train @ w + bias, y_train)
        loss = loss + 1e-2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return (x_test @ w + bias).argmax(-1).detach()


def _scores(y_true: torch.Tensor, y_pred: torch.Tensor) -> dict[str, float]:
    t, p = y_true.tolist(), y_pred.tolist()
    return {"macro_f1": macro_f1(t, p), "accuracy": accuracy(t, p)}


def probe_scores(
    path: str | Path, data: ProbeData, *, bidirectional: bool, max_length: int = 64
) -> dict[str, dict[str, float]]:
    """The sequence and token probes of one checkpoint: `{"sequence": {...}, "token": {...}}`."""
    model = load_model(path, bidirectional=bidirectional, dtype=torch.float32)
    model.eval()
    with torch.inference_mode():
        seq_x = model.encode(
            [r["text"] for r in data.seq_train + data.seq_test], max_length=max_length
        )
    index = {name: i for i, name in enumerate(data.seq_labels)}
    seq_y = torch.tensor([index[r["label"]] for r in data.seq_train + data.seq_test])
    n = len(data.seq_train)
    seq_pred = _fit_predict(seq_x[:n], seq_y[:n], seq_x[n:], len(data.seq_labels))
    tags = {name: i for i, name in enumerate(data.tok_labels)}
    x_train, t_train = token_features(model, data.tok_train, max_length)
    x_test, t_test = token_features(model, data.tok_test, max_length)
    y_train = torch.tensor([tags[t] for t in t_train])
    y_test = torch.tensor([tags[t] for t in t_test])
    tok_pred = _fit_predict(x_train, y_train, x_test, len(data.tok_labels))
    return {"sequence": _scores(seq_y[n:], seq_pred), "token": _scores(y_test, tok_pred)}


# ------------------------------------------------------------------------------------------
# Fine-tuning: the same small protocol for every variant
# ------------------------------------------------------------------------------------------

FINETUNE_PHASES = {"sequence": "sequence-classification", "token": "token-classification"}
# The trainer's outputs of a fine-tuning run that the demo does not keep (weights, optimizer).
_RUN_WEIGHTS = ("checkpoints", "final", "best")


@dataclass(frozen=True)
class FinetuneProtocol:
    """One fine-tuning protocol, the same for every variant (the paper's: warmup 10% of the
    steps, then linear decay; the head at `head_lr_multiplier` x the learning rate)."""

    steps: dict[str, int]  # task ("sequence" / "token") -> optimizer steps
    seeds: int = 1  # fine-tuning seeds (head init, data order): scores are averaged
    lr: float = 1e-3
    head_lr_multiplier: float = 10.0
    batch_size: int = 16
    max_seq_len: int = 64
    dropout: float = 0.1
    weight_decay: float = 0.01
    pooling: str = "mean"  # sequence task; the encoders' retrieval pooling too

    def __post_init__(self) -> None:
        if set(self.steps) != set(FINETUNE_PHASES) or min(self.steps.values()) < 1:
            raise ValueError(f"FinetuneProtocol.steps needs sequence and token >= 1: {self.steps}")
        if self.seeds < 1:
            raise ValueError(f"FinetuneProtocol.seeds must be >= 1, got {self.seeds}")


def write_task_files(folder: Path, sizes: tuple[int | None, ...]) -> dict[str, dict[str, Path]]:
    """The fine-tuning tasks as JSON Lines: `{task: {"train": path, "test": path}}`.

    `sizes`: sequence train / test docstrings, token train / test lines (None: the whole split;
    else every n-th record, deterministic). The test files are the held-out packages.
    """

    def every(records: list[dict[str, Any]], count: int | None) -> list[dict[str, Any]]:
        if count is None or count >= len(records):
            return records
        return records[:: max(len(records) // max(count, 1), 1)][:count]

    folder.mkdir(parents=True, exist_ok=True)
    splits = {
        ("sequence", "train"): (package_task, "train", sizes[0]),
        ("sequence", "test"): (package_task, "heldout", sizes[1]),
        ("token", "train"): (token_task, "train", sizes[2]),
        ("token", "test"): (token_task, "heldout", sizes[3]),
    }
    files: dict[str, dict[str, Path]] = {"sequence": {}, "token": {}}
    for (task, split), (make, source, count) in splits.items():
        path = folder / f"{task}-{split}.jsonl"
        text = "".join(json.dumps(r) + "\n" for r in every(make(source), count))
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(path)
        files[task][split] = path
    return files


def finetune_config(
    model: str | Path,
    task: str,
    files: dict[str, Path],
    output: Path,
    *,
    causal: bool,
    seed: int,
    protocol: FinetuneProtocol,
    device: str = "cpu",
) -> dict[str, Any]:
    """The `bidirlm train` config (as a dict) of one fine-tuning run of the protocol."""
    steps = protocol.steps[task]
    section: dict[str, Any] = {
        # every class, also when a small training subset lacks one
        "labels": list(PACKAGES if task == "sequence" else TOKEN_TAGS),
        "dropout": protocol.dropout,
        "head_lr_multiplier": protocol.head_lr_multiplier,
        "dev": str(files["test"]),
        "eval_batch_size": 128,
        "attention": "causal" if causal else "bidirectional",
    }
    if task == "sequence":
        section["pooling"] = protocol.pooling
    return {
        "model": str(model),
        "phase": FINETUNE_PHASES[task],
        "train": {
            "output": str(output),
            "steps": steps,
            "seed": seed,
            "checkpoint_every": 0,
            "log_every": steps,
            "device": device,
            "progress_bar": False,
        },
        "optim": {
            "lr": protocol.lr,
            "schedule": "linear",
            "warmup_steps": max(steps // 10, 1),
            "weight_decay": protocol.weight_decay,
        },
        "data": {
            "batch_size": protocol.batch_size,
            "max_seq_len": protocol.max_seq_len,
            "sources": [{"path": str(files["train"])}],
        },
        "task": section,
    }


def finetune_score(
    model: str | Path,
    task: str,
    files: dict[str, Path],
    folder: Path,
    *,
    causal: bool,
    seed: int,
    protocol: FinetuneProtocol,
    device: str = "cpu",
) -> dict[str, float]:
    """Fine-tune `model` on `task` with `protocol` into `folder`; held-out `{macro_f1, accuracy}`.

    The trainer's console output goes to `folder/train.log`; its metrics.jsonl and config.toml
    stay, the weights do not (every variant x task x seed would keep a model). The score is
    recorded in `folder/score.json` with the config: a re-run with the same config reads it.
    """
    config = finetune_config(
        model, task, files, folder, causal=causal, seed=seed, protocol=protocol, device=device
    )
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    record = folder / "score.json"
    if record.is_file():
        done = json.loads(record.read_text(encoding="utf-8"))
        if done.get("config_sha256") == digest:
            return done["dev"]
    if folder.exists():
        # a partial or differently configured run of this demo (its train.log is the mark)
        if not (folder / "train.log").is_file() and any(folder.iterdir()):
            raise ValueError(f"{folder} exists and was not made by the demo's fine-tuning")
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    with (folder / "train.log").open("w", encoding="utf-8") as fh, contextlib.redirect_stderr(fh):
        train(train_config_from_dict(config))
    dev: dict[str, float] = {}
    with (folder / "metrics.jsonl").open(encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            if "dev" in row and row.get("step") == protocol.steps[task]:
                dev = {k: float(row["dev"][k]) for k in ("macro_f1", "accuracy")}
    if not dev:
        raise RuntimeError(f"{folder}: the fine-tuning run recorded no final dev evaluation")
    for name in _RUN_WEIGHTS:
        shutil.rmtree(folder / name, ignore_errors=True)
    tmp = record.with_name(f".{record.name}.tmp")
    tmp.write_text(json.dumps({"config_sha256": digest, "dev": dev}, indent=2) + "\n", "utf-8")
    tmp.replace(record)
    return dev


# ------------------------------------------------------------------------------------------
# Forgetting: held-out causal-LM loss
# ------------------------------------------------------------------------------------------


def heldout_texts(kind: str, count: int) -> list[str]:
    """`count` held-out stdlib texts of `kind` ("docs" or "code"), every n-th (deterministic)."""
    texts = [t for t in stdlib_texts("heldout", kind) if t.strip()]
    step = max(len(texts) // max(count, 1), 1)
    return texts[::step][:count]


@torch.inference_mode()
def lm_loss(
    path: str | Path, texts: Sequence[str], *, max_length: int = 128, batch_size: int = 16
) -> float:
    """Mean next-token cross-entropy (nats/token) of the checkpoint as a causal LM on `texts`."""
    model = load_model(path, bidirectional=False, dtype=torch.float32)
    model.eval()
    tok = model.tokenizer
    head = model.lm_head_weight.float()
    total, count = 0.0, 0
    for start in range(0, len(texts), batch_size):
        enc = tok(list(texts[start : start + batch_size]), truncation=True, max_length=max_length)
        ids, mask = _padded(tok, enc["input_ids"])
        hidden = model(ids.to(model.device), attention_mask=mask.to(model.device)).float()
        logits = hidden[:, :-1] @ head.T
        target = ids[:, 1:].clone().to(logits.device)
        target[mask[:, 1:] == 0] = -100
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"
        )
        total += float(loss)
        count += int((target != -100).sum())
    return total / max(count, 1)
