"""Public ops: bidirectional flash attention, fused MNTP loss, fused in-batch InfoNCE.

Names are resolved lazily (PEP 562) so `import bidirlm.kernels` neither imports Triton nor queries
a device; the op modules load on first attribute access. The one exception is `mntp_loss`: the
function shares its name with its module `bidirlm.kernels.mntp_loss`, and importing that module
would rebind the package attribute to the module, so the function is bound eagerly (the module
imports only torch; its Triton kernels live in `mntp_loss_triton.py`).

`flash_attn_func` and `flash_attn_varlen_func` are the flash-attn-compatible functions of
`flash_attn_compat`: they take flash-attn's positional arguments and bidirlm's documented
keyword-only ones (`key_padding_mask`, `return_lse`, varlen `(q, k, v, cu_seqlens, max_seqlen)`),
so code written for either works with one import. `bidirlm.kernels.attention` keeps the strict
keyword-only functions.
"""

from __future__ import annotations

import importlib
from typing import Any

from .mntp_loss import MNTPLoss as MNTPLoss
from .mntp_loss import mntp_loss as mntp_loss

_EXPORTS = {
    "flash_attn_func": "flash_attn_compat",
    "flash_attn_varlen_func": "flash_attn_compat",
    "flash_attn_kvpacked_func": "flash_attn_compat",
    "flash_attn_qkvpacked_func": "flash_attn_compat",
    "flash_attn_varlen_kvpacked_func": "flash_attn_compat",
    "flash_attn_varlen_qkvpacked_func": "flash_attn_compat",
    "flash_attn_with_kvcache": "flash_attn_compat",
    "infonce_loss": "infonce",
    "InfoNCELoss": "infonce",
    "LigerFusedLinearCrossEntropyLoss": "liger_compat",
    "LigerFusedLinearCrossEntropyFunction": "liger_compat",
    "decide": "dispatch",
    "use_triton": "dispatch",
}

__all__ = sorted([*_EXPORTS, "mntp_loss", "MNTPLoss"])


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'bidirlm.kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
