"""A minimal kernel with the tiling of Triton's fused-attention tutorial (06-fused-attention.py),
written here for one purpose: calibrating `bench/perf_model.py` against the tutorial's
*published* H100 figures. It is never used by the ops and never run by the test suite on a GPU.

Structure (our own code, same tiling and loop structure as the tutorial's Hopper path):

- forward: one program per 128 query rows of one (batch, head); the query tile stays in registers,
  key/value tiles of 128 rows stream through a 3-stage software pipeline (8 warps); online softmax
  in log2 units; `acc += P V`;
- backward: one program per 128 keys of one (batch, head) runs two phases in one launch, as the
  tutorial does: dK/dV for its 128 keys over query blocks of 32 (`S^T = K Q^T`, `dV += P^T dO`,
  `dP^T = V dO^T`, `dK += dS^T Q`), then dQ for the 128 queries of the same index over key blocks of
  32 (`S = Q K^T`, `dP = dO V^T`, `dQ += dS K`): seven GEMMs per score, 4 warps, 5 stages.

`compile_tutorial()` compiles both for sm_90 with the installed triton through the compile
suite's own path (the launch is recorded, specialized by Triton's binder, compiled), so the model
reads the tutorial's SASS exactly as it reads ours.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from bench import compile_check as cc

# Published H100 SXM figures of the tutorial kernel (fp16, batch 4, 32 heads, head dim 128,
# non-causal, N_CTX 4096, no warp specialization), TFLOP/s in the tutorial's own convention
# (forward 4*B*H*N^2*D, backward 2.5x that):
# - forward 459.6: facebookexperimental/triton PR #205 ("fused-attention-batch4-head32-d128-fwd-
#   causal=False-warp_specialize=False", N_CTX 4096), https://github.com/facebookexperimental/
#   triton/pull/205 (2025-07).
PUBLISHED_TUTORIAL_H100 = {"fwd": 459.6}
PUBLISHED_SOURCE = {
    "fwd": "facebookexperimental/triton PR #205 (tutorial 06, B4 H32 D128 N4096, non-causal)",
}
TUTORIAL_SHAPE = {"batch": 4, "heads": 32, "seqlen": 4096, "head_dim": 128}
FWD_TILES = {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3}
BWD_TILES = {"BLOCK_M1": 32, "BLOCK_N1": 128, "BLOCK_M2": 128, "BLOCK_N2": 32, "num_warps": 4,
             "num_stages": 5}  # fmt: skip


@triton.jit
def online_softmax_step(qk, m_i, l_i, acc, qk_scale):
    """One key block of the forward's online softmax in log2 units: (P, new row max, new row
    sum, the accumulator rescaled to the new max); the caller adds P V."""
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    return p, m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None]


@triton.jit
def _tut_fwd(Q, K, V, O, M, qk_scale, N_CTX, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr):  # fmt: skip
    start_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    base = bh * N_CTX * HEAD_DIM
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + base + rows[:, None] * HEAD_DIM + offs_d[None, :])
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32) + 1.0
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start_n in range(0, N_CTX, BLOCK_N):
        cols = start_n + offs_n
        kt = tl.load(K + base + cols[None, :] * HEAD_DIM + offs_d[:, None])
        p, m_i, l_i, acc = online_softmax_step(tl.dot(q, kt), m_i, l_i, acc, qk_scale)
        v = tl.load(V + base + cols[:, None] * HEAD_DIM + offs_d[None, :])
        acc = tl.dot(p.to(v.dtype), v, acc)
    tl.store(M + bh * N_CTX + rows, m_i + tl.math.log2(l_i))
    out = acc / l_i[:, None]
    tl.store(O + base + rows[:, None] * HEAD_DIM + offs_d[None, :], out.to(O.dtype.element_ty))


@triton.jit
def _tut_bwd(Q, K, V, DO, DQ, DK, DV, M, D, sm_scale, N_CTX, HEAD_DIM: tl.constexpr,
             BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr, BLOCK_M2: tl.constexpr,
             BLOCK_N2: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    base = bh * N_CTX * HEAD_DIM
    lbase = bh * N_CTX
    offs_d = tl.arange(0, HEAD_DIM)
    # phase 1: dK, dV of BLOCK_N1 keys (Q pre-scaled by sm_scale*log2e as the tutorial does)
    keys = pid * BLOCK_N1 + tl.arange(0, BLOCK_N1)
    k = tl.load(K + base + keys[:, None] * HEAD_DIM + offs_d[None, :])
    v = tl.load(V + base + keys[:, None] * HEAD_DIM + offs_d[None, :])
    dk = tl.zeros([BLOCK_N1, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N1, HEAD_DIM], tl.float32)
    offs_m1 = tl.arange(0, BLOCK_M1)
    for start_m in range(0, N_CTX, BLOCK_M1):
        rows = start_m + offs_m1
        qt = tl.load(Q + base + rows[None, :] * HEAD_DIM + offs_d[:, None])
        m = tl.load(M + lbase + rows)
        p_t = tl.math.exp2(tl.dot(k, qt) - m[None, :])
        do = tl.load(DO + base + rows[:, None] * HEAD_DIM + offs_d[None, :])
        dv += tl.dot(p_t.to(tl.float16), do)
        di = tl.load(D + lbase + rows)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = (p_t * (dp_t - di[None, :])).to(tl.float16)
        dk += tl.dot(ds_t, tl.trans(qt))
    tl.store(DV + base + keys[:, None] * HEAD_DIM + offs_d[None, :], dv.to(tl.float16))
    tl.store(DK + base + keys[:, None] * HEAD_DIM + offs_d[None, :], (dk * sm_scale).to(tl.float16))
    # phase 2: dQ of BLOCK_M2 queries over key blocks of BLOCK_N2
    rows2 = pid * BLOCK_M2 + tl.arange(0, BLOCK_M2)
    q = tl.load(Q + base + rows2[:, None] * HEAD_DIM + offs_d[None, :])
    do2 = tl.load(DO + base + rows2[:, None] * HEAD_DIM + offs_d[None, :])
    m2 = tl.load(M + lbase + rows2)
    di2 = tl.load(D + lbase + rows2)
    dq = tl.zeros([BLOCK_M2, HEAD_DIM], tl.float32)
    offs_n2 = tl.arange(0, BLOCK_N2)
    for start_n in range(0, N_CTX, BLOCK_N2):
        cols = start_n + offs_n2
        kt = tl.load(K + base + cols[None, :] * HEAD_DIM + offs_d[:, None])
        vt = tl.load(V + base + cols[None, :] * HEAD_DIM + offs_d[:, None])
        p = tl.math.exp2(tl.dot(q, kt) - m2[:, None])
        dp = tl.dot(do2, vt)
        ds = (p * (dp - di2[:, None])).to(tl.float16)
        dq += tl.dot(ds, tl.trans(kt))
    tl.store(DQ + base + rows2[:, None] * HEAD_DIM + offs_d[None, :], dq.to(tl.float16))


def tutorial_launches(head_dim: int = 128, seqlen: int = 256) -> list[cc.Launch]:
    """The tutorial-equivalent forward and backward launches on small CPU tensors, recorded (not
    run) the way the compile suite records ours; strides and divisibility match real shapes."""
    case = cc.Case("attention", "fp16", "tutorial", head_dim)
    bh, n, d = 2, seqlen, head_dim
    q, k, v, o, do, dq, dk, dv = (torch.empty(bh, n, d, dtype=torch.float16) for _ in range(8))
    m, delta = torch.empty(bh, n), torch.empty(bh, n)
    with cc.recording(cc.TARGETS["sm90"][3]) as calls:
        cc._PHASE[0] = "fwd"
        _tut_fwd[(n // FWD_TILES["BLOCK_M"], bh)](q, k, v, o, m, 0.1, n, HEAD_DIM=d, **FWD_TILES)
        cc._PHASE[0] = "bwd"
        _tut_bwd[(n // BWD_TILES["BLOCK_N1"], bh)](
            q, k, v, do, dq, dk, dv, m, delta, 0.1, n, HEAD_DIM=d, **BWD_TILES
        )
    return [cc.Launch(case, fn, args, kw, grid, phase) for fn, args, kw, grid, phase in calls]


def compile_tutorial(head_dim: int = 128) -> dict[str, dict[str, Any]]:
    """{'fwd': facts, 'bwd': facts} of the tutorial-equivalent kernels compiled for sm_90 with
    the installed triton (`compile_check.compile_spec` facts, `main_loop` included)."""
    out = {}
    for launch in tutorial_launches(head_dim):
        spec = cc.specialize(launch, "sm90")
        spec.cases.append(launch.case)
        facts = cc.compile_spec(spec)
        facts["config"] = spec.config
        facts["kernel"] = spec.kernel
        out[launch.phase] = facts
    return out
