"""Offline data and models shared by training, evaluation, the demo and the tests.

`corpus`: Python's own standard library as text (docs, code, contrastive pairs); `heldout`: the
train/held-out split by top-level package and the embedded retrieval task; `tiny`: the embedded
tiny Qwen3 model with a tokenizer trained here; `tasks`: the fine-tuning tasks (docstring ->
package, source token -> token class).
"""

from __future__ import annotations

from .corpus import (
    _build_atomic,
    cache_root,
    python_code_texts,
    python_docs_texts,
    python_pairs,
    stdlib_files,
)
from .heldout import HELDOUT_FRACTION, embedded_task, split_of, stdlib_pairs, stdlib_texts
from .names import is_embedded, resolve_embedded, resolve_model_path
from .tasks import EMBEDDED_TASKS, PACKAGES, TOKEN_TAGS, package_task, token_task
from .tiny import (
    TINY_MODEL_NAME,
    TINY_SPECIAL_TOKENS,
    TINY_VOCAB_SIZE,
    embedded_tiny_model,
    save_random_qwen3,
    tiny_qwen3_config,
)

__all__ = [
    "EMBEDDED_TASKS",
    "HELDOUT_FRACTION",
    "PACKAGES",
    "TINY_MODEL_NAME",
    "TINY_SPECIAL_TOKENS",
    "TINY_VOCAB_SIZE",
    "TOKEN_TAGS",
    "_build_atomic",
    "cache_root",
    "embedded_task",
    "embedded_tiny_model",
    "is_embedded",
    "package_task",
    "python_code_texts",
    "python_docs_texts",
    "python_pairs",
    "resolve_embedded",
    "resolve_model_path",
    "save_random_qwen3",
    "split_of",
    "stdlib_files",
    "stdlib_pairs",
    "stdlib_texts",
    "tiny_qwen3_config",
    "token_task",
]
