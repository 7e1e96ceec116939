"""Streaming shard-wise merging of safetensors checkpoints (mergekit's YAML for shared methods).

`config` parses the YAML, `plan` decides and computes each output tensor, `io` reads shards
memory-mapped and writes them atomically, `report` measures the result, `merge` drives it.
"""

from __future__ import annotations

from .config import MergeConfig, MergeError, load_config
from .merge import MergeResult, merge, merge_from_config

__all__ = ["MergeConfig", "MergeError", "MergeResult", "load_config", "merge", "merge_from_config"]
