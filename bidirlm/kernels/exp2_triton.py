"""exp2 for Triton kernels: on MUFU (`exp2_mufu`) and on the FMA pipe (`exp2_poly`).

An SM's MUFU unit does 16 `ex2` per clock against 128 FP32 FMAs: a kernel with one exponential
per element and little else (the MNTP forward's log-sum-exp) waits on MUFU. Computing a small
share of the exponentials as a polynomial on the FMA pipe shortens that wait, until the extra
issued instructions (about 12 per polynomial exp2 in the MNTP forward's sm_90 code) become the
limit. Imported only by the Triton kernel modules (never by `bidirlm.kernels` itself).
"""

from __future__ import annotations

import triton
import triton.language as tl

# 2**f on [-0.5, 0.5], degree 4 (the attention forward's): minimax, relative error 2.7e-6 =
# 2**-18.5, 2**-9.5 below bf16's rounding of P.
_E0 = tl.constexpr(0.9999992847442627)
_E1 = tl.constexpr(0.6931217908859253)
_E2 = tl.constexpr(0.240247443318367)
_E3 = tl.constexpr(0.05591785907745361)
_E4 = tl.constexpr(0.009570101276040077)
# 2**f on [-0.5, 0.5], degree 5: Lawson-reweighted least squares of the relative error on 4,000
# Chebyshev nodes (float64), coefficients rounded to float32. Evaluated in float32 with Horner's
# rule its relative error is <= 2.4e-7 on the interval (checked at 200,001 points), the same as
# the hardware's `ex2.approx` (2**-22).
_C0 = tl.constexpr(1.0000001192092896)
_C1 = tl.constexpr(0.6931469440460205)
_C2 = tl.constexpr(0.24022120237350464)
_C3 = tl.constexpr(0.05550713092088699)
_C4 = tl.constexpr(0.009675540961325169)
_C5 = tl.constexpr(0.001327647129073739)
# 2**f on [-0.5, 0.5], degree 3: Lawson-reweighted least squares as above; relative error
# 7.5e-5 = 2**-13.7 in float32 (checked at 200,001 points): 26x below bf16's rounding of a
# probability (2**-9) and 6.5x below fp16's (2**-11).
_D0 = tl.constexpr(0.9999280571937561)
_D1 = tl.constexpr(0.6932609677314758)
_D2 = tl.constexpr(0.2426111251115799)
_D3 = tl.constexpr(0.0551716685295105)
_ROUND = tl.constexpr(12582912.0)  # 1.5 * 2**23: x + _ROUND holds round(x) in its low bits


@triton.jit
def exp2_poly(x, DEGREE: tl.constexpr = 5):
    """2**x in float32 without MUFU, for x <= 0 and not NaN (x = -inf gives 2**-126); DEGREE 5
    (as accurate as `ex2.approx`, 6 FMAs) or 4 (2.7e-6, one FMA fewer: enough where P is then
    rounded to 16 bits).

    `t = x + 1.5 * 2**23` rounds x to the integer n in t's low mantissa bits (exact for
    |x| < 2**22), `f = x - n` is exact and in [-0.5, 0.5], and `2**n` enters as n added to the
    exponent field of the polynomial's value p (in [0.70, 1.42]: biased exponent 126 or 127).
    x is clamped at -126 so that the exponent stays >= 1 (a normal float): values below 2**-126,
    which the FTZ `ex2.approx` flushes to 0, come out as about 2**-126 instead (1e-38)."""
    x = tl.maximum(x, -126.0)
    t = x + _ROUND
    f = x - (t - _ROUND)
    tl.static_assert(DEGREE == 4 or DEGREE == 5, "DEGREE is 4 or 5")
    return _times_pow2(_exp2_reduced(f, DEGREE), t)


@triton.jit
def _exp2_reduced(f, DEGREE: tl.constexpr):
    """2**f for f in [-0.5, 0.5]: the degree-3, 4 or 5 fit above, by Horner's rule."""
    if DEGREE == 3:
        p = _D3 * f + _D2
        p = p * f + _D1
        p = p * f + _D0
    elif DEGREE == 4:
        p = _E4 * f + _E3
        p = p * f + _E2
        p = p * f + _E1
        p = p * f + _E0
    else:
        p = _C5 * f + _C4
        p = p * f + _C3
        p = p * f + _C2
        p = p * f + _C1
        p = p * f + _C0
    return p


@triton.jit
def _times_pow2(p, t):
    """p * 2**n where t = 1.5 * 2**23 + n: the low bits of t's pattern are n in two's complement,
    and << 23 puts them on p's exponent field."""
    bits = p.to(tl.int32, bitcast=True) + (t.to(tl.int32, bitcast=True) << 23)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def split_columns(x):
    """(x[:, :N/2], x[:, N/2:]) of an [M, N] tile. On a GPU the column's top bit is a register
    index of the MMA accumulator layouts, so the split moves no data between threads."""
    m: tl.constexpr = x.shape[0]
    n: tl.constexpr = x.shape[1]
    return tl.split(tl.permute(tl.reshape(x, [m, 2, n // 2]), [0, 2, 1]))


@triton.jit
def join_columns(a, b):
    """The [M, 2N] tile whose halves are a and b (the inverse of `split_columns`)."""
    m: tl.constexpr = a.shape[0]
    n: tl.constexpr = a.shape[1]
    return tl.reshape(tl.permute(tl.join(a, b), [0, 2, 1]), [m, 2 * n])


@triton.jit
def row_sum_exp2(x, POLY_LOG: tl.constexpr, FTZ: tl.constexpr):
    """`sum(2**x, axis=1)` of an [M, N] tile with its last N / 2**POLY_LOG columns on the FMA pipe
    (`exp2_poly`: x <= 0, no NaN) and the others on MUFU (`ex2.approx.ftz` when FTZ, else
    tl.math.exp2). POLY_LOG = 0: every column on MUFU."""
    tl.static_assert(POLY_LOG >= 0 and POLY_LOG <= 3, "POLY_LOG is 0..3")
    if POLY_LOG == 0:
        return tl.sum(exp2_mufu(x, FTZ), axis=1)
    a, b = split_columns(x)
    s = tl.sum(exp2_mufu(a, FTZ), axis=1)
    if POLY_LOG == 1:
        return s + tl.sum(exp2_poly(b), axis=1)
    b0, b1 = split_columns(b)
    s += tl.sum(exp2_mufu(b0, FTZ), axis=1)
    if POLY_LOG == 2:
        return s + tl.sum(exp2_poly(b1), axis=1)
    c0, c1 = split_columns(b1)
    return s + tl.sum(exp2_mufu(c0, FTZ), axis=1) + tl.sum(exp2_poly(c1), axis=1)


@triton.jit
def exp2_mufu(x, FTZ: tl.constexpr):
    """2**x in float32 on MUFU. FTZ (NVIDIA): one `ex2.approx.ftz.f32` (MUFU.EX2); without it
    the assembler wraps `ex2.approx.f32` in a denormal-result fix-up (a compare and two
    predicated multiplies per element). Flushing results below 2**-126 to 0 changes a softmax
    sum (>= 1) by < 1e-38 and a dlogit by < 1e-38 x its row's gradient. Elsewhere (AMD, the
    interpreter) tl.math.exp2."""
    if FTZ:
        return tl.inline_asm_elementwise(
            "ex2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return tl.math.exp2(x)


@triton.jit
def exp2_poly_affine(s, scale, shift, LO: tl.constexpr, HI: tl.constexpr, DEGREE: tl.constexpr = 4):
    """2**clamp(s * scale - shift, LO, HI) in float32 on the FMA pipe (DEGREE 3 or 4: the fits
    above), for integers -126 <= LO < HI <= 127 with HI - LO <= 256; `shift` broadcasts against s
    (a row's maximum).

    The clamp costs nothing: y = clamp((s * scale - shift - LO) / (HI - LO), 0, 1) is one
    saturating FMA (`fma.rn.sat` on NVIDIA) standing in for the FMA that computes the argument,
    and x = LO + (HI - LO) * y enters the rounding and the reduced argument as FMAs: 8
    instructions for degree 3 (one MUFU `ex2` and its argument's FMA: 2). y's rounding, and the
    constants', times HI - LO add up to ~1.3e-5 relative error at HI - LO = 192 (measured, degree 4
    1.6e-5 in all, degree 3 8.9e-5). At LO = -126 a value p < 1 lands on a subnormal (2**-126
    times p's relative error twice)."""
    span: tl.constexpr = HI - LO
    y = tl.clamp(s * (scale / span) - (shift + LO) / span, 0.0, 1.0)
    t = y * span + (_ROUND + LO)  # = 1.5 * 2**23 + n, n = round(x)
    n_lo = t - (_ROUND + LO)  # n - LO, exact
    f = y * span - n_lo  # x - n = LO + span * y - n, in [-0.5, 0.5]
    tl.static_assert(DEGREE == 3 or DEGREE == 4, "DEGREE is 3 or 4")
    return _times_pow2(_exp2_reduced(f, DEGREE), t)
