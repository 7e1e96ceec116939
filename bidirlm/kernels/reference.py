"""Plain-torch references of every op: the CPU path and the ground truth of the tests.

Each reference computes in the dtype it is given (tests call it in float64) and follows the public
contract in DESIGN.md exactly, including the documented differences from torch (e.g. a `mean` over
zero labelled rows is 0.0, not NaN).
"""

from __future__ import annotations

import torch  # noqa: F401  (used by the op sections below)

# --- attention -----------------------------------------------------------------------------------


def attention_visibility(
    length: int,
    window_size: tuple[int, int] = (-1, -1),
    key_valid: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    length_k: int | None = None,
    query_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bool `[..., length, length_k]` mask: key j visible from query i.

    Query i sits at key position `p = i + length_k - length` (flash-attn's bottom-right
    alignment; p = i when `length_k` is None or equal). Visible iff
    `(left < 0 or j >= p - left) and (right < 0 or j <= p + right)`, and, when given,
    `key_valid[..., j]` and `query_valid[..., i]` (`[..., length_k]` / `[..., length]`).
    """
    left, right = window_size
    length_k = length if length_k is None else length_k
    i = torch.arange(length, device=device)[:, None] + (length_k - length)
    j = torch.arange(length_k, device=device)[None, :]
    visible = torch.ones(length, length_k, dtype=torch.bool, device=device)
    if left >= 0:
        visible &= j >= i - left
    if right >= 0:
        visible &= j <= i + right
    if key_valid is not None:
        visible = visible & key_valid[..., None, :].bool()
    if query_valid is not None:
        visible = visible & query_valid[..., :, None].bool()
    return visible


def _alibi_bias(
    slopes: torch.Tensor, length: int, length_k: int, dtype: torch.dtype, device
) -> torch.Tensor:
    """`-slope * |i + length_k - length - j|` as `[B or 1, Hq, length, length_k]`."""
    i = torch.arange(length, device=device)[:, None] + (length_k - length)
    j = torch.arange(length_k, device=device)[None, :]
    dist = (i - j).abs().to(dtype)
    slopes = slopes.to(dtype)
    if slopes.dim() == 1:
        slopes = slopes[None]
    return -slopes[:, :, None, None] * dist


def _attention_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    key_valid: torch.Tensor | None,
    query_valid: torch.Tensor | None,
    softmax_scale: float,
    window_size: tuple[int, int],
    softcap: float,
    alibi_slopes: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(probs `[B, Hq, Sq, Sk]`, lse `[B, Hq, Sq]`, tanh of the softcap or None, kh) of
    q `[B, Sq, Hq, D]`, k `[B, Sk, Hkv, D]`, in q's dtype."""
    batch, seqlen, hq, _ = q.shape
    seqlen_k = k.shape[1]
    group = hq // k.shape[2]
    # [B, H, S, D]; repeat_interleave maps q head h to kv head h // group, as in the kernels.
    qh = q.transpose(1, 2)
    kh = k.transpose(1, 2).repeat_interleave(group, dim=1)
    scores = (qh @ kh.transpose(-1, -2)) * softmax_scale
    tanh = None
    if softcap > 0:
        tanh = torch.tanh(scores / softcap)
        scores = softcap * tanh
    if alibi_slopes is not None:
        scores = scores + _alibi_bias(alibi_slopes, seqlen, seqlen_k, scores.dtype, q.device)
    kv = key_valid[:, None, :] if key_valid is not None else None  # [B, 1, Sk] -> [B, 1, Sq, Sk]
    qv = query_valid[:, None, :] if query_valid is not None else None
    visible = attention_visibility(seqlen, window_size, kv, q.device, seqlen_k, qv)
    if visible.dim() == 2:
        visible = visible[None, None]
    row_has_key = visible.any(dim=-1, keepdim=True)  # [B or 1, 1, Sq, 1]
    # Rows without any visible key get zeros (not NaN): softmax over a dummy all-zero row, then
    # multiply by 0, so neither the forward nor the backward ever sees exp(-inf - -inf).
    scores = scores.masked_fill(~visible, float("-inf"))
    scores = torch.where(row_has_key, scores, torch.zeros((), dtype=scores.dtype, device=q.device))
    probs = torch.softmax(scores, dim=-1) * row_has_key
    lse = torch.logsumexp(scores, dim=-1)
    lse = lse.masked_fill(~row_has_key[..., 0], float("-inf"))
    return probs, lse.expand(batch, hq, seqlen), tanh, kh


def _attention_dense_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_valid: torch.Tensor | None,
    softmax_scale: float,
    window_size: tuple[int, int],
    softcap: float,
    query_valid: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q `[B, Sq, Hq, D]`, k/v `[B, Sk, Hkv, D]`, key_valid `[B, Sk]`, query_valid `[B, Sq]` ->
    (out `[B, Sq, Hq, D]`, lse `[B, Hq, Sq]`), computed in q's dtype (callers upcast)."""
    probs, lse, _, _ = _attention_probs(
        q, k, key_valid, query_valid, softmax_scale, window_size, softcap, alibi_slopes
    )
    vh = v.transpose(1, 2).repeat_interleave(q.shape[2] // k.shape[2], dim=1)
    return (probs @ vh).transpose(1, 2), lse


def _sequences(cu_seqlens: torch.Tensor, cu_seqlens_k: torch.Tensor | None):
    """(n, q slice, k slice) per packed sequence."""
    bounds = cu_seqlens.tolist()
    bounds_k = bounds if cu_seqlens_k is None else cu_seqlens_k.tolist()
    for n, (a, b, c, d) in enumerate(zip(bounds[:-1], bounds[1:], bounds_k[:-1], bounds_k[1:])):
        yield n, slice(a, b), slice(c, d)


def _slopes_of(alibi_slopes: torch.Tensor | None, n: int) -> torch.Tensor | None:
    if alibi_slopes is None or alibi_slopes.dim() == 1:
        return alibi_slopes
    return alibi_slopes[n : n + 1]


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    return_lse: bool = False,
    compute_dtype: torch.dtype | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch attention with the semantics of `flash_attn_func` / `flash_attn_varlen_func`.

    Dense: q `[B, Sq, Hq, D]`, k/v `[B, Sk, Hkv, D]`, optional `key_padding_mask [B, Sk]` (True =
    real token; when Sq == Sk it also marks the real queries: padded query rows output zeros);
    lse `[B, Hq, Sq]`. Packed (`cu_seqlens [N+1]` given, `cu_seqlens_k` for the keys when they
    differ): q `[Tq, Hq, D]`, k/v `[Tk, Hkv, D]`; lse `[Hq, Tq]`. Equals
    `softmax(cap(q @ k.T * scale) + alibi + mask) @ v` per sequence and head, with kv head
    `h // (Hq // Hkv)`, queries aligned bottom-right on keys (query i at key position
    `i + Sk - Sq`) and ALiBi `-slope[h] * |i + Sk - Sq - j|` (`alibi_slopes [Hq]` or `[B, Hq]`);
    a query with no visible key gives zeros and lse = -inf. Low-precision inputs are computed in
    float32 and cast back (float64 stays float64) unless `compute_dtype` says otherwise (tests
    pass q.dtype to measure PyTorch's own low-precision error). Differentiable through plain
    torch ops; packed input is processed one sequence at a time so memory stays O(max_len^2)
    per head.
    """
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    compute = compute_dtype or torch.promote_types(q.dtype, torch.float32)
    qc, kc, vc = q.to(compute), k.to(compute), v.to(compute)
    window = tuple(window_size)
    if cu_seqlens is None:
        valid = key_padding_mask.bool() if key_padding_mask is not None else None
        query_valid = valid if valid is not None and q.shape[1] == k.shape[1] else None
        out, lse = _attention_dense_reference(
            qc, kc, vc, valid, softmax_scale, window, softcap, query_valid, alibi_slopes
        )
        out, lse = out.to(q.dtype), lse.float()
    else:
        outs, lses = [], []
        for n, sq, sk in _sequences(cu_seqlens, cu_seqlens_k):
            if sq.stop == sq.start:
                continue
            o, lse_i = _attention_dense_reference(
                qc[None, sq], kc[None, sk], vc[None, sk], None, softmax_scale, window, softcap,
                None, _slopes_of(alibi_slopes, n),
            )  # fmt: skip
            outs.append(o[0])
            lses.append(lse_i[0])
        if outs:
            out = torch.cat(outs, dim=0).to(q.dtype)
            lse = torch.cat(lses, dim=-1).float()
        else:
            out = q.new_zeros(q.shape)
            lse = torch.zeros(q.shape[1], 0, dtype=torch.float32, device=q.device)
    return (out, lse) if return_lse else out


def _attention_dense_reference_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_valid: torch.Tensor | None,
    softmax_scale: float,
    window_size: tuple[int, int],
    softcap: float,
    query_valid: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Analytic gradients of `_attention_dense_reference` (same shapes and dtype rules)."""
    batch, seqlen_k, hkv, dim = k.shape
    group = q.shape[2] // hkv
    probs, _, tanh, kh = _attention_probs(
        q, k, key_valid, query_valid, softmax_scale, window_size, softcap, alibi_slopes
    )
    qh = q.transpose(1, 2)
    vh = v.transpose(1, 2).repeat_interleave(group, dim=1)
    doh = dout.transpose(1, 2)
    dprobs = doh @ vh.transpose(-1, -2)
    # softmax Jacobian: dS = P * (dP - rowsum(P * dP)); rowsum(P * dP) = rowsum(dO * O).
    dscores = probs * (dprobs - (probs * dprobs).sum(dim=-1, keepdim=True))
    if tanh is not None:
        dscores = dscores * (1 - tanh * tanh)
    dscores = dscores * softmax_scale
    dq = (dscores @ kh).transpose(1, 2)
    # GQA: the q heads of a group share one kv head, so their dK/dV contributions add up.
    dk = (dscores.transpose(-1, -2) @ qh).view(batch, hkv, group, seqlen_k, dim).sum(2)
    dv = (probs.transpose(-1, -2) @ doh).view(batch, hkv, group, seqlen_k, dim).sum(2)
    return dq, dk.transpose(1, 2), dv.transpose(1, 2)


def attention_reference_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    cu_seqlens_k: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of `attention_reference` for the output gradient `dout` (shaped like q).

    Plain torch without autograd, so it also runs inside a `torch.library` op (where autograd is
    below the dispatcher). Recomputes the probabilities per sequence in float32 (float64 stays).
    """
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    compute = torch.promote_types(q.dtype, torch.float32)
    dc, qc, kc, vc = (t.to(compute) for t in (dout, q, k, v))
    window = tuple(window_size)
    if cu_seqlens is None:
        valid = key_padding_mask.bool() if key_padding_mask is not None else None
        query_valid = valid if valid is not None and q.shape[1] == k.shape[1] else None
        grads = _attention_dense_reference_backward(
            dc, qc, kc, vc, valid, softmax_scale, window, softcap, query_valid, alibi_slopes
        )
    else:
        grads = tuple(torch.zeros_like(t) for t in (qc, kc, vc))
        for n, sq, sk in _sequences(cu_seqlens, cu_seqlens_k):
            if sq.stop == sq.start or sk.stop == sk.start:
                continue
            parts = _attention_dense_reference_backward(
                dc[None, sq], qc[None, sq], kc[None, sk], vc[None, sk], None, softmax_scale,
                window, softcap, None, _slopes_of(alibi_slopes, n),
            )  # fmt: skip
            for full, part, rows in zip(grads, parts, (sq, sk, sk)):
                full[rows] = part[0]
    return tuple(g.to(t.dtype).contiguous() for g, t in zip(grads, (q, k, v)))


# --- InfoNCE -------------------------------------------------------------------------------------


def infonce_direction_reference(
    rows: torch.Tensor,
    cols: torch.Tensor,
    *,
    scale: float,
    normalize: bool = True,
    positive_offset: int = 0,
    exclude: tuple[int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One direction of the in-batch InfoNCE loss, with the full `[R, N]` logit matrix.

    `rows [R, d]`, `cols [N, d]`; `logits = scale * sim(rows, cols)` with `sim` the cosine
    (`F.normalize` with eps 1e-12, as sentence-transformers' `cos_sim`) or the dot product.
    Returns `lse [R] = torch.logsumexp(logits, dim=1)` and the positive logit
    `pos [R] = logits[i, positive_offset + i]` (0 when that column does not exist), computed in
    the dtype of the inputs. `exclude = (lo, hi, period)` drops the columns `lo <= j < hi` with
    `(j - lo) % period == i` from row i's log-sum-exp.
    """
    if normalize:
        rows = torch.nn.functional.normalize(rows, p=2.0, dim=-1)
        cols = torch.nn.functional.normalize(cols, p=2.0, dim=-1)
    logits = (rows @ cols.T) * scale
    index = torch.arange(rows.shape[0], device=rows.device)
    target = index + positive_offset
    has_pos = target < cols.shape[0]
    pos = torch.where(has_pos, logits[index, target.clamp_max(cols.shape[0] - 1)], 0.0)
    if exclude is not None:
        lo, hi, period = exclude
        j = torch.arange(cols.shape[0], device=rows.device)
        rel = j[None, :] - lo
        dropped = (rel >= 0) & (j[None, :] < hi) & (rel % period == index[:, None])
        logits = logits.masked_fill(dropped, float("-inf"))
    return torch.logsumexp(logits, dim=1), pos


def infonce_reference(
    queries: torch.Tensor,
    documents: torch.Tensor,
    *,
    temperature: float = 0.05,
    symmetric: bool = False,
    normalize: bool = True,
    reduction: str = "mean",
    query_to_query: bool = False,
    doc_to_doc: bool = False,
) -> torch.Tensor:
    """Single-device `infonce_loss` with the `[B, M]` matrix materialized.

    `queries [B, d]`, `documents [M, d]` with `M >= B`; the positive of query i is `documents[i]`.
    Per query: `loss_i = logsumexp_j(logits[i, :]) - logits[i, i]` with
    `logits = sim(queries, documents) / temperature`. `symmetric=True` averages it with the
    document->query loss of `documents[i]` against all B queries:
    `loss_i = (lse_row_i + lse_col_i) / 2 - logits[i, i]`, which is sentence-transformers'
    `MultipleNegativesRankingLoss(directions=("query_to_doc", "doc_to_query"),
    partition_mode="per_direction")`. With `query_to_query` / `doc_to_doc`, one joint
    log-sum-exp per query over the selected blocks (`s = sim / temperature`): `s(q_i, D)`,
    `s(q_i, q_j)` for `j != i`, `s(q_j, d_i)` for all j when symmetric, `s(d_i, d_k)` for
    `k % B != i`: sentence-transformers' `partition_mode="joint"`. `reduction`: "mean" | "sum" |
    "none" (per query, `[B]`).
    """
    scale = 1.0 / temperature
    n = queries.shape[0]
    lse, pos = infonce_direction_reference(queries, documents, scale=scale, normalize=normalize)
    if query_to_query or doc_to_doc:
        parts = [lse]
        kw = {"scale": scale, "normalize": normalize}
        m = documents.shape[0]
        if query_to_query:  # no positive among the queries: offset past the last column
            qq = infonce_direction_reference(queries, queries, positive_offset=n,
                                             exclude=(0, n, n), **kw)  # fmt: skip
            parts.append(qq[0])
        if symmetric:
            parts.append(infonce_direction_reference(documents[:n], queries, **kw)[0])
        if doc_to_doc:
            dd = infonce_direction_reference(documents[:n], documents, positive_offset=m,
                                             exclude=(0, m, n), **kw)  # fmt: skip
            parts.append(dd[0])
        per_query = torch.logsumexp(torch.stack(parts), dim=0) - pos
    else:
        per_query = lse - pos
        if symmetric:
            lse_c, pos_c = infonce_direction_reference(
                documents[:n], queries, scale=scale, normalize=normalize
            )
            per_query = 0.5 * (per_query + (lse_c - pos_c))
    if reduction == "mean":
        return per_query.mean()
    if reduction == "sum":
        return per_query.sum()
    return per_query


# --- MNTP loss -----------------------------------------------------------------------------------

# Labelled rows per chunk: a [chunk, V] logits block is the largest temporary (1024 x 262144
# float32 = 1 GiB for Gemma3's vocabulary, still far below all rows at once).
MNTP_CHUNK_ROWS = 1024


def _mntp_chunk_logits(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, softcap: float | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logits, tanh) of `h [n, d]`: `softcap(h @ weight.T + bias)` in float32 (float64 stays)."""
    acc = torch.promote_types(h.dtype, torch.float32)
    x = (h @ weight.T if bias is None else torch.addmm(bias, h, weight.T)).to(acc)
    if softcap is None:
        return x, None
    t = torch.tanh(x / softcap)
    return softcap * t, t


def _mntp_rows_loss(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    y: torch.Tensor,
    softcap: float | None,
    label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0,
) -> torch.Tensor:
    logits, _ = _mntp_chunk_logits(h, weight, bias, softcap)
    loss = torch.nn.functional.cross_entropy(
        logits, y, reduction="none", label_smoothing=label_smoothing
    )
    if lse_square_scale:
        loss = loss + lse_square_scale * torch.logsumexp(logits, dim=-1) ** 2
    return loss


def mntp_loss_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0,
    chunk_rows: int = MNTP_CHUNK_ROWS,
) -> torch.Tensor:
    """Differentiable `F.cross_entropy(softcap(hidden @ weight.T + bias).float(), labels, ...)`.

    `hidden [..., d]`, `weight [V, d]`, `labels [...]`. Per labelled row: the cross-entropy with
    torch's `label_smoothing`, plus `lse_square_scale * logsumexp(logits) ** 2` (z-loss). Only
    labelled rows are computed, `chunk_rows` at a time, each chunk under activation checkpointing
    when gradients are needed, so at most a `[chunk_rows, V]` logits block is alive in the forward
    and in the backward. `mean` over zero labelled rows is 0.0 (torch: NaN). The loss is float32
    (float64 for float64 inputs).
    """
    from torch.utils.checkpoint import checkpoint

    d = hidden.shape[-1]
    h = hidden.reshape(-1, d)
    y = labels.reshape(-1).long()
    acc = torch.promote_types(hidden.dtype, torch.float32)
    idx = (y != ignore_index).nonzero().squeeze(1)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias)
    )
    parts = []
    for start in range(0, idx.numel(), chunk_rows):
        sel = idx[start : start + chunk_rows]
        args = (h.index_select(0, sel), weight, bias, y.index_select(0, sel), softcap,
                label_smoothing, lse_square_scale)  # fmt: skip
        if needs_grad:
            parts.append(checkpoint(_mntp_rows_loss, *args, use_reentrant=False))
        else:
            parts.append(_mntp_rows_loss(*args))
    rows = h.new_zeros(h.shape[0], dtype=acc)
    if parts:
        rows = rows.index_copy(0, idx, torch.cat(parts))
    if reduction == "none":
        return rows.reshape(labels.shape)
    if reduction == "sum":
        return rows.sum()
    if reduction == "mean":
        return rows.sum() / max(idx.numel(), 1)
    raise ValueError(f"reduction must be one of mean, sum, none, got {reduction!r}")


def mntp_loss_reference_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    softcap: float | None = None,
    label_smoothing: float = 0.0,
    with_accuracy: bool = False,
    chunk_rows: int = MNTP_CHUNK_ROWS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """No-autograd forward of the MNTP loss on `hidden [N, d]`, `labels [N]`.

    Returns (loss [N], lse [N], correct [N] or [0]) in float32 (float64 for float64 inputs), 0 at
    ignored rows; `loss` is the (label-smoothed) cross-entropy, `correct` is 1.0 where
    `argmax(logits) == label` (only with `with_accuracy`). The torch path of
    `bidirlm::mntp_loss_fwd`; pairs with `mntp_loss_reference_backward`.
    """
    acc = torch.promote_types(hidden.dtype, torch.float32)
    loss = hidden.new_zeros(hidden.shape[0], dtype=acc)
    lse = hidden.new_zeros(hidden.shape[0], dtype=acc)
    correct = hidden.new_zeros(hidden.shape[0] if with_accuracy else 0, dtype=acc)
    idx = (labels != ignore_index).nonzero().squeeze(1)
    for start in range(0, idx.numel(), chunk_rows):
        sel = idx[start : start + chunk_rows]
        logits, _ = _mntp_chunk_logits(hidden.index_select(0, sel), weight, bias, softcap)
        y = labels.index_select(0, sel).long()
        row_lse = torch.logsumexp(logits, dim=-1)
        target = logits.gather(1, y[:, None]).squeeze(1)
        lse[sel] = row_lse
        eps = label_smoothing
        loss[sel] = row_lse - (1 - eps) * target - eps * logits.mean(dim=-1)
        if with_accuracy:
            correct[sel] = (logits.argmax(dim=-1) == y).to(acc)
    return loss, lse, correct


def mntp_loss_reference_backward(
    grad: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    lse: torch.Tensor,
    *,
    ignore_index: int = -100,
    softcap: float | None = None,
    chunk_rows: int = MNTP_CHUNK_ROWS,
    need_dh: bool = True,
    need_dw: bool = True,
    label_smoothing: float = 0.0,
    grad_lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """No-autograd backward: (dhidden [N, d], dweight [V, d], dbias [V]).

    `grad [N]` is d(loss)/d(per-row loss), `grad_lse [N]` d(loss)/d(per-row lse) (None = 0):
    `dlogits = (grad + grad_lse) * softmax - grad * ((1 - eps) onehot + eps / V)`. dweight and
    dbias accumulate in float32 over chunks (`addmm_` into a float32 buffer: no `[V, d]`
    temporary per chunk), then cast. Gradients not needed (need_dh; need_dw covers weight and
    bias) or absent (no bias) are None.
    """
    acc = torch.promote_types(hidden.dtype, torch.float32)
    dev = weight.device
    dh = torch.zeros_like(hidden) if need_dh else None
    dw = torch.zeros(weight.shape, dtype=acc, device=dev) if need_dw else None
    db = (
        torch.zeros(weight.shape[0], dtype=acc, device=dev)
        if bias is not None and need_dw
        else None
    )
    vocab = weight.shape[0]
    idx = (labels != ignore_index).nonzero().squeeze(1)
    for start in range(0, idx.numel(), chunk_rows):
        sel = idx[start : start + chunk_rows]
        h = hidden.index_select(0, sel)
        logits, t = _mntp_chunk_logits(h, weight, bias, softcap)
        g = grad.index_select(0, sel).to(acc)[:, None]
        coef = g if grad_lse is None else g + grad_lse.index_select(0, sel).to(acc)[:, None]
        dz = torch.exp(logits - lse.index_select(0, sel).to(acc)[:, None]) * coef
        if label_smoothing:
            dz -= g * (label_smoothing / vocab)
        rows = torch.arange(sel.numel(), device=dz.device)
        dz[rows, labels.index_select(0, sel).long()] -= g[:, 0] * (1 - label_smoothing)
        if t is not None:
            dz *= 1 - t * t
        if dh is not None:
            dh[sel] = (dz.to(weight.dtype) @ weight).to(dh.dtype)
        if dw is not None:
            dw.addmm_(dz.T, h.to(acc))
        if db is not None:
            db += dz.sum(0)
    dw = dw.to(weight.dtype) if dw is not None else None
    return dh, dw, (db.to(bias.dtype) if db is not None else None)
