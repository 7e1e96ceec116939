"""`load_model(path)`: a Hugging Face checkpoint folder -> `Encoder` (or `OmniEncoder`).

Its own module above `encoder`, `heads` and `omni`, so none of those imports another to load.
"""

from __future__ import annotations

import os

import torch

from bidirlm.runtime.models import checkpoint as ckpt
from bidirlm.runtime.models import released_layout as released
from bidirlm.runtime.models.encoder import Encoder
from bidirlm.runtime.models.heads import load_head
from bidirlm.runtime.models.omni import load_omni


def load_model(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    bidirectional: bool | None = True,
    allow_non_finite: bool | None = None,
) -> Encoder:
    """Load a Qwen3 or Gemma3 Hugging Face checkpoint folder as an `Encoder`.

    `dtype` None keeps the checkpoint's dtype (config.json `dtype`/`torch_dtype`); `device` None
    is the CPU. `bidirectional` sets the attention direction whatever the checkpoint records;
    None follows config.json (Qwen3 `is_causal: false`, Gemma3 `use_bidirectional_attention`).
    The tokenizer is loaded with AutoTokenizer when the folder has tokenizer files. A fine-tuned
    classifier folder (`*ForSequenceClassification` / `*ForTokenClassification`) comes back with
    its head as `model.head` (`bidirlm.runtime.models.heads`); `model.head` is None otherwise.
    A truncated or corrupt safetensors file is a `CheckpointError` naming it; so is a tensor with
    NaN/Inf values (naming the tensor) unless `allow_non_finite` (None: the environment variable
    `BIDIRLM_ALLOW_NON_FINITE=1`), an opt-out for experts.
    """
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
    folder = ckpt.resolve(path)
    hf = ckpt.read_config(folder)
    if hf.get("model_type") == "bidirlm_omni":  # a composed text+vision+audio checkpoint
        dev = torch.device(device if device is not None else "cpu")
        omni = load_omni(
            folder,
            hf,
            dtype=dtype,
            device=dev,
            bidirectional=bidirectional,
            allow_non_finite=allow_non_finite,
        )
        # an omni classifier (fine-tuned on image / audio + text records) keeps its head too
        omni.head = load_head(folder, hf, omni.hidden_size, dtype=omni.dtype, device=dev)
        return omni.eval()
    hf = released.text_config(hf)  # remote-code BidirLM text configs -> their base family
    spec = ckpt.spec_for(hf)
    config = spec.parse_config(hf)
    if bidirectional is None:
        bidirectional = spec.is_bidirectional(hf)
    device = torch.device(device if device is not None else "cpu")
    dtype = dtype or ckpt.checkpoint_dtype(folder, hf)
    names = ckpt.weight_files(folder)
    has_head = config.tie_word_embeddings or any(n in names for n in ckpt.LM_HEAD_NAMES)
    with torch.device("meta"):
        model = Encoder(config, bidirectional=bidirectional, hf_config=hf, lm_head=has_head)
    expected = {k: v.shape for k, v in model.state_dict().items() if not k.startswith("inv_freq_")}
    if allow_non_finite is None:
        allow_non_finite = ckpt.allow_non_finite_default()
    state = ckpt.read_state(
        folder,
        spec,
        config,
        expected,
        dtype=dtype,
        device=device,
        allow_non_finite=allow_non_finite,
    )
    model.load_state_dict(state, strict=True, assign=True)
    model.reset_rope(device)
    head = load_head(folder, hf, config.hidden_size, dtype=dtype, device=device)
    if head is not None:  # a fine-tuned classifier folder: its head comes back as `model.head`
        model.head = head
    if ckpt.has_tokenizer(folder):
        from transformers import AutoTokenizer  # optional dependency: only with tokenizer files

        model.tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return model.eval()
