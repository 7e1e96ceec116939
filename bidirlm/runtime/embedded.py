"""Embedded corpora and the embedded tiny model: training data and a model available offline.

Python's own standard library is text every machine has: `pydoc` topics and docstrings (English
prose about code) and the stdlib sources (code). They feed the examples, the demo and the tests,
since nothing may be downloaded.

- `python_docs_texts()`: the pydoc topics, then every module/class/function docstring of the
  stdlib sources (headed by its qualified name), in sorted file order.
- `python_code_texts()`: the stdlib `.py` sources, one document per file, in sorted path order.
- `python_pairs()`: contrastive pairs from docstrings: query = the summary line, positive = the
  rest of the docstring, one hard negative = the rest of the next docstring of the same module.
- `embedded_tiny_model(cache_dir=None)`: a small random Qwen3 (transformers `Qwen3ForCausalLM`)
  with a byte-level BPE tokenizer trained here on the embedded corpus, saved in Hugging Face
  layout. Special tokens: `<s>` (bos), `</s>` (eos), `<pad>`, and a dedicated `<mask>` for MNTP.
  Configs name it `model = "embedded:tiny"`.

Orders are deterministic for a given Python installation (files and keys are sorted). Docstrings
are extracted with `ast` (nothing is imported: some stdlib modules act on import), which takes
seconds, so the extraction and the model are built once and cached under `$BIDIRLM_CACHE`
(default `~/.cache/bidirlm`). Creation is atomic (temporary folder + rename): concurrent builders
are safe, the first rename wins and the others reuse it.
"""

from __future__ import annotations

import ast
import functools
import json
import os
import platform
import shutil
import sysconfig
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Folders of the stdlib that are tests, demos, tools or vendored packages, not library code.
_SKIP_DIRS = frozenset(
    {
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "turtledemo",
        "lib2to3",
        "ensurepip",
        "site-packages",
        "dist-packages",
        "__pycache__",
        "__phello__",
    }
)
# Bump when the extraction or the tiny model changes, so stale caches are not reused.
_CORPUS_VERSION = 1
_TINY_VERSION = 1
TINY_MODEL_NAME = f"tiny-qwen3-v{_TINY_VERSION}"


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """`cache_dir`, else `$BIDIRLM_CACHE`, else `~/.cache/bidirlm`."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("BIDIRLM_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "bidirlm"


def _build_atomic(final: Path, build: Callable[[Path], None]) -> Path:
    """Create `final` (a folder) by running `build(tmp)` then renaming; safe under concurrency."""
    if final.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process renamed its copy first (the target exists and is not empty).
            if not final.exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def stdlib_files() -> list[Path]:
    """The stdlib `.py` files that count as library code, sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("config-")
        )
        files.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    return sorted(files)


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def _docstrings(tree: ast.Module, module: str) -> list[tuple[str, str]]:
    """(qualified name, docstring) for the module and its classes/functions, in source order."""
    out: list[tuple[str, str]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}.{child.name}"
                doc = ast.get_docstring(child)
                if doc:
                    out.append((name, doc))
                visit(child, name)

    doc = ast.get_docstring(tree)
    if doc:
        out.append((module, doc))
    visit(tree, module)
    return out


def _extract_corpus() -> dict[str, list]:
    import pydoc_data.topics

    root = Path(sysconfig.get_paths()["stdlib"])
    docs = [pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics)]
    pairs: list[dict] = []
    for path in stdlib_files():
        module = ".".join(path.relative_to(root).with_suffix("").parts)
        try:
            tree = ast.parse(_read(path))
        except (SyntaxError, ValueError):
            continue
        entries = _docstrings(tree, module)
        docs.extend(f"{name}\n\n{doc}" for name, doc in entries)
        pairs.extend(_pairs_of_module(entries))
    return {"docs": docs, "pairs": pairs}


def _pairs_of_module(entries: list[tuple[str, str]]) -> list[dict]:
    """Summary line -> rest of the docstring, with the next entry's rest as hard negative."""
    split = []
    for _, doc in entries:
        head, _, rest = doc.strip().partition("\n\n")
        summary = " ".join(head.split())
        rest = rest.strip()
        if 10 <= len(summary) <= 200 and len(rest) >= 40:
            split.append((summary, rest))
    if len(split) < 2:
        return []
    return [
        {"query": q, "positive": p, "negatives": [split[(i + 1) % len(split)][1]]}
        for i, (q, p) in enumerate(split)
    ]


@functools.lru_cache(maxsize=1)
def _corpus() -> dict[str, list]:
    tag = f"py{platform.python_version()}-v{_CORPUS_VERSION}"
    folder = cache_root() / "corpus" / tag

    def build(tmp: Path) -> None:
        (tmp / "corpus.json").write_text(json.dumps(_extract_corpus()), encoding="utf-8")

    folder = _build_atomic(folder, build)
    return json.loads((folder / "corpus.json").read_text(encoding="utf-8"))


def python_docs_texts() -> list[str]:
    """pydoc topics and stdlib docstrings (prose), deterministic order. Cached on disk."""
    return list(_corpus()["docs"])


@functools.lru_cache(maxsize=1)
def _code() -> tuple[str, ...]:
    return tuple(text for text in (_read(p) for p in stdlib_files()) if text.strip())


def python_code_texts() -> list[str]:
    """stdlib sources, one text per file, sorted by path."""
    return list(_code())


def python_pairs() -> list[dict]:
    """Contrastive pairs `{"query", "positive", "negatives": [one]}` from stdlib docstrings."""
    return [dict(p, negatives=list(p["negatives"])) for p in _corpus()["pairs"]]


# --------------------------------------------------------------------------------------------
# The embedded tiny model
# --------------------------------------------------------------------------------------------

TINY_VOCAB_SIZE = 2048
TINY_SPECIAL_TOKENS = ("<s>", "</s>", "<pad>", "<mask>")
# Enough text for the BPE merges to settle, small enough to train in a few seconds.
_TOKENIZER_TRAIN_CHARS = 3_000_000


def _train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    def corpus():
        budget = _TOKENIZER_TRAIN_CHARS
        docs, code = python_docs_texts(), python_code_texts()
        # Interleave prose and code so both shape the vocabulary.
        for i in range(max(len(docs), len(code))):
            for source in (docs, code):
                if i < len(source) and budget > 0:
                    budget -= len(source[i])
                    yield source[i]

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=list(TINY_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> $B </s>",
        special_tokens=[("<s>", bos), ("</s>", eos)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        mask_token="<mask>",
        model_max_length=1024,
    )


def tiny_qwen3_config(vocab_size: int, **overrides):
    """The tiny model's architecture: 2 layers, width 64, GQA 4:2, head dim 16, tied head."""
    from transformers import Qwen3Config

    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        initializer_range=0.02,
    )
    kwargs.update(overrides)
    return Qwen3Config(**kwargs)


def save_random_qwen3(folder: Path, tokenizer: Any, **overrides: Any) -> None:
    """Write a random Qwen3 (seed 0, `tiny_qwen3_config(**overrides)`) + `tokenizer` to `folder`.

    The vocabulary is the tokenizer's, rounded up to a multiple of 64 (friendlier shapes for the
    kernels); the global RNG is left untouched.
    """
    import torch
    from transformers import Qwen3ForCausalLM

    config = tiny_qwen3_config(
        -(-len(tokenizer) // 64) * 64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **overrides,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen3ForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(str(folder))


def embedded_tiny_model(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Path of the embedded tiny model (Hugging Face folder), building it on first use.

    Random Qwen3 weights (seed 0) and a byte-level BPE tokenizer (vocab 2048) trained on the
    embedded corpus. Built once under `cache_dir` (default `$BIDIRLM_CACHE` or
    `~/.cache/bidirlm`) in `models/tiny-qwen3-v1`, atomically.
    """
    final = cache_root(cache_dir) / "models" / TINY_MODEL_NAME

    def build(tmp: Path) -> None:
        save_random_qwen3(tmp, _train_tokenizer())
        (tmp / "README.md").write_text(
            "Embedded tiny model of bidirlm: random Qwen3 weights, BPE tokenizer trained on "
            "Python's stdlib docs and sources. For tests, examples and the demo only.\n",
            encoding="utf-8",
        )

    return _build_atomic(final, build)


def resolve_model_path(name: str) -> Path:
    """Map `embedded:tiny` to its cached folder; any other name is returned as a Path."""
    if name.startswith("embedded:"):
        if name != "embedded:tiny":
            raise ValueError(f"unknown embedded model {name!r}; the only one is 'embedded:tiny'")
        return embedded_tiny_model()
    return Path(name).expanduser()
