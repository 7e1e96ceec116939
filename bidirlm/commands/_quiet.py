"""Keep our commands' logs ours: no transformers / huggingface_hub progress bars ("Loading
weights", "Writing model shards") and no transformers load reports (ANSI-coloured tables of
unused or missing keys: our loaders check the tensors themselves and name any problem).

A user who sets `TRANSFORMERS_VERBOSITY` or `HF_HUB_DISABLE_PROGRESS_BARS` keeps their choice.
Everything is restored when the command returns (tests run commands in-process).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator

ENV = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """While active, transformers logs errors only and no library draws a progress bar."""
    ours = [key for key in ENV if key not in os.environ]
    for key in ours:  # read by the libraries when they are first imported
        os.environ[key] = ENV[key]
    restore: list[Callable[[], None]] = []
    if "TRANSFORMERS_VERBOSITY" in ours and "transformers.utils.logging" in sys.modules:
        from transformers.utils import logging as hf_logging  # already imported: no cost

        level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        restore.append(lambda: hf_logging.set_verbosity(level))
        if bars:
            restore.append(hf_logging.enable_progress_bar)
    if "HF_HUB_DISABLE_PROGRESS_BARS" in ours and "huggingface_hub.utils" in sys.modules:
        from huggingface_hub import utils as hub_utils  # already imported: no cost

        if not hub_utils.are_progress_bars_disabled():
            hub_utils.disable_progress_bars()
            restore.append(hub_utils.enable_progress_bars)
    try:
        yield
    finally:
        for undo in reversed(restore):
            undo()
        for key in ours:
            os.environ.pop(key, None)
