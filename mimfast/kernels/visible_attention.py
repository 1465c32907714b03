"""Triton kernels for ``visible_attention``: non-causal softmax attention over packed variable-length sequences.

Layouts. Packed: q, k, v are [T, H, d] and sequence b owns rows cu_seqlens[b] .. cu_seqlens[b+1]; rows past
cu_seqlens[N] (the tail of an over-allocated buffer) belong to no sequence, are never read into a result, and
their outputs and gradients are written as zeros by one extra program column (b == N). Dense: [N, S, H, d],
every sequence S long. Both reach the kernels as (batch stride, token stride, head stride, dim stride), with a
batch stride of 0 for packed input, so one kernel serves both.

The log-sum-exp and, for longer sequences, delta = rowsum(dO * O) live in fp32 [H, R] buffers whose row index is
the flattened token index: cu_seqlens[b] + i packed, b * S + i dense. The log-sum-exp is kept in base 2 of the
log2(e)-scaled scores (lse2 = log2(sum(exp2(s * scale * log2(e))))), the units the kernels compute in, so the
backward recomputes exactly the forward's probabilities (a one-key row gets p = 1 exactly, as in the reference).

Short sequences (max_seqlen up to SHORT_MAX_SEQLEN): one program per (sequence, head) holds the whole sequence
in one tile whose size is picked per sequence at run time, the smallest power of two >= max(16, its length), so a
ragged batch pays for its own lengths, not the longest's. The forward needs no online rescaling; the backward
computes delta (as rowsum(P * dP) from its fp32 tiles), dQ, dK and dV in one pass over tiles loaded once.

Longer sequences. Forward: one program per (query block, sequence, head), online softmax with fp32 running max /
sum / output. Backward: a preprocess kernel for delta, then one program per (block, sequence, head) that first
accumulates dK, dV of the key block over every query block of its sequence, then dQ of the query block over every
key block.

Each gradient row is written by exactly one program: no atomics, bit-deterministic.
"""

from __future__ import annotations

import triton
import triton.language as tl

from mimfast.kernels.sizes import next_pow2

LOG2E = tl.constexpr(1.4426950408889634)
# the smallest tile of the short path (tl.dot needs 16 rows / columns at least)
MIN_TILE = tl.constexpr(16)
# rows a short-path program zeroes per step of the packed tail (stores only: the loop never waits on memory)
TAIL_ROWS = tl.constexpr(64)
# longest sequence the short path takes: a 128 x 128 fp32 score tile in registers is the most 8 warps hold without
# spilling at d 64; IEEE fp32 dots keep their operands in registers too, so fp32 (and d > 64) stops at 64
# (fp32 with d > 64 at 32)
SHORT_MAX_SEQLEN = 128
SHORT_MAX_SEQLEN_FP32 = 64


@triton.jit
def _sequence(cu_ptr, b, S, PACKED: tl.constexpr):
    """(first token row, length, first lse row) of sequence b."""
    if PACKED:
        start = tl.load(cu_ptr + b)
        seqlen = tl.load(cu_ptr + b + 1) - start
        return start, seqlen, start
    else:
        return 0, S, b * S


@triton.jit
def _zero_rows(ptr, row0, n_rows, step, h, stride_t, stride_h, stride_d,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """Write zeros into head h of rows [row0, n_rows) of a [T, H, d] tensor, BLOCK_M rows every ``step`` rows."""
    offs_d = tl.arange(0, BLOCK_D)
    zeros = tl.zeros([BLOCK_M, BLOCK_D], dtype=ptr.dtype.element_ty)
    for r in range(row0, n_rows, step):
        rows = (r + tl.arange(0, BLOCK_M)).to(tl.int64)
        ptrs = ptr + rows[:, None] * stride_t + h * stride_h + offs_d[None, :] * stride_d
        tl.store(ptrs, zeros, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _fwd_block(q, k_base, v_base, tok0, start_n, seqlen, stride_kt, stride_vt, m_i, l_i, acc, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
               MASKED: tl.constexpr, NEG_SCALE: tl.constexpr):
    """One key block of the online softmax: (m_i, l_i, acc) updated with keys start_n .. start_n + BLOCK_N.

    The running max is taken of the raw scores and scaled after (the max commutes with a positive scale; a
    negative one takes the min), so each score costs one fused multiply-add before exp2. MASKED: the block runs
    past seqlen, and those keys get probability 0; it still holds at least one valid key, so m_new is finite.
    NEG_SCALE (scale < 0, fixed per launch): no branch on the scale's sign inside the key loop."""
    cols = start_n + tl.arange(0, BLOCK_N)
    rows_n = (tok0 + cols).to(tl.int64)[:, None]
    offs_d = tl.arange(0, BLOCK_D)[None, :]
    if MASKED:
        kv_mask = (cols < seqlen)[:, None] & (offs_d < HEAD_DIM)
        k = tl.load(k_base + rows_n * stride_kt, mask=kv_mask, other=0.0)
        v = tl.load(v_base + rows_n * stride_vt, mask=kv_mask, other=0.0)
    elif BLOCK_D == HEAD_DIM:
        k = tl.load(k_base + rows_n * stride_kt)
        v = tl.load(v_base + rows_n * stride_vt)
    else:
        k = tl.load(k_base + rows_n * stride_kt, mask=offs_d < HEAD_DIM, other=0.0)
        v = tl.load(v_base + rows_n * stride_vt, mask=offs_d < HEAD_DIM, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    valid = (cols < seqlen)[None, :]
    if not NEG_SCALE:
        top = tl.max(tl.where(valid, s, float("-inf")), 1) if MASKED else tl.max(s, 1)
    else:
        top = tl.min(tl.where(valid, s, float("inf")), 1) if MASKED else tl.min(s, 1)
    m_new = tl.maximum(m_i, top * qk_scale)
    t = s * qk_scale - m_new[:, None]
    if MASKED:
        t = tl.where(valid, t, float("-inf"))
    p = tl.exp2(t)
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _attn_fwd(
    q_ptr, k_ptr, v_ptr,  # [T, H, d] packed or [N, S, H, d] dense
    o_ptr,  # same layout as q: output
    lse_ptr,  # [H, R] fp32: base-2 log-sum-exp of every query row's log2(e)-scaled scores
    cu_ptr,  # [N + 1] int32 cumulative sequence lengths (packed only)
    n_seq, S, T,  # sequences; dense length; rows of the packed buffer
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_ob, stride_ot, stride_oh, stride_od,
    stride_lh,
    scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    TAIL_LEVELS: tl.constexpr, PACKED: tl.constexpr, DOT_PRECISION: tl.constexpr, NEG_SCALE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    if PACKED:
        if b == n_seq:
            # the extra column of a packed launch: zero the output and lse rows past cu_seqlens[N], spread over
            # pid_m, so every output element is defined
            row0 = tl.load(cu_ptr + n_seq) + pid_m * BLOCK_M
            step = tl.num_programs(0) * BLOCK_M
            _zero_rows(o_ptr, row0, T, step, h, stride_ot, stride_oh, stride_od, HEAD_DIM, BLOCK_D, BLOCK_M)
            for r in range(row0, T, step):
                rows = r + tl.arange(0, BLOCK_M)
                tl.store(lse_ptr + h.to(tl.int64) * stride_lh + rows, tl.zeros([BLOCK_M], tl.float32), mask=rows < T)
    if b < n_seq:
        tok0, seqlen, lse0 = _sequence(cu_ptr, b, S, PACKED)
        start_m = pid_m * BLOCK_M
        if start_m < seqlen:
            qk_scale = scale * LOG2E  # exp2 with log2(e) folded into the scale
            offs_m = start_m + tl.arange(0, BLOCK_M)
            offs_d = tl.arange(0, BLOCK_D)
            mask_d = offs_d < HEAD_DIM
            mask_m = offs_m < seqlen
            rows_m = (tok0 + offs_m).to(tl.int64)
            bb = b.to(tl.int64)
            q_ptrs = (q_ptr + bb * stride_qb + rows_m[:, None] * stride_qt + h * stride_qh
                      + offs_d[None, :] * stride_qd)
            q = tl.load(q_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
            k_base = k_ptr + bb * stride_kb + h * stride_kh + offs_d[None, :] * stride_kd
            v_base = v_ptr + bb * stride_vb + h * stride_vh + offs_d[None, :] * stride_vd

            m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
            acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
            # whole key blocks need no key mask; only the last, partial block does
            n_full = seqlen - seqlen % BLOCK_N
            for start_n in range(0, n_full, BLOCK_N):
                m_i, l_i, acc = _fwd_block(q, k_base, v_base, tok0, start_n, seqlen, stride_kt, stride_vt,
                                           m_i, l_i, acc, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION,
                                           False, NEG_SCALE)
            if n_full < seqlen:
                # the partial block is as narrow as its keys allow (16, 32, ... up to BLOCK_N columns, picked per
                # sequence at run time; TAIL_LEVELS 1: always BLOCK_N): at 197 tokens and 64-key blocks it computes
                # 16 columns for the last 5 keys instead of 64, so 208 score columns a row instead of 256
                tail = _tile_level(seqlen - n_full, TAIL_LEVELS)
                for i in tl.static_range(TAIL_LEVELS):
                    if tail == i:
                        m_i, l_i, acc = _fwd_block(q, k_base, v_base, tok0, n_full, seqlen, stride_kt, stride_vt,
                                                   m_i, l_i, acc, qk_scale, HEAD_DIM, BLOCK_D,
                                                   BLOCK_N >> (TAIL_LEVELS - 1 - i), DOT_PRECISION, True,
                                                   NEG_SCALE)
            acc = acc / l_i[:, None]
            o_ptrs = (o_ptr + bb * stride_ob + rows_m[:, None] * stride_ot + h * stride_oh
                      + offs_d[None, :] * stride_od)
            tl.store(o_ptrs, acc.to(o_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
            lse2 = m_i + tl.log2(l_i)
            tl.store(lse_ptr + h.to(tl.int64) * stride_lh + lse0 + offs_m, lse2, mask=mask_m)


@triton.jit
def _attn_bwd_delta(
    o_ptr, do_ptr,  # [T, H, d] / [N, S, H, d]: output and its gradient
    delta_ptr,  # [H, R] fp32: rowsum(dO * O)
    cu_ptr, S,
    stride_ob, stride_ot, stride_oh, stride_od,
    stride_gb, stride_gt, stride_gh, stride_gd,
    stride_dh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, PACKED: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    tok0, seqlen, lse0 = _sequence(cu_ptr, b, S, PACKED)
    start_m = pid_m * BLOCK_M
    if start_m < seqlen:
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask_m = offs_m < seqlen
        mask = mask_m[:, None] & (offs_d[None, :] < HEAD_DIM)
        rows = (tok0 + offs_m).to(tl.int64)
        bb = b.to(tl.int64)
        o = tl.load(o_ptr + bb * stride_ob + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :] * stride_od,
                    mask=mask, other=0.0).to(tl.float32)
        do = tl.load(do_ptr + bb * stride_gb + rows[:, None] * stride_gt + h * stride_gh
                     + offs_d[None, :] * stride_gd, mask=mask, other=0.0).to(tl.float32)
        tl.store(delta_ptr + h.to(tl.int64) * stride_dh + lse0 + offs_m, tl.sum(o * do, 1), mask=mask_m)


@triton.jit
def _attn_bwd(
    q_ptr, k_ptr, v_ptr,  # [T, H, d] packed or [N, S, H, d] dense
    do_ptr,  # gradient of the output, layout of q
    lse_ptr, delta_ptr,  # [H, R] fp32 from the forward and the preprocess kernel
    dq_ptr, dk_ptr, dv_ptr,  # gradients, layouts of q, k, v
    cu_ptr,  # [N + 1] int32 (packed only)
    n_seq, S, T,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_gb, stride_gt, stride_gh, stride_gd,
    stride_dqb, stride_dqt, stride_dqh, stride_dqd,
    stride_dkb, stride_dkt, stride_dkh, stride_dkd,
    stride_dvb, stride_dvt, stride_dvh, stride_dvd,
    stride_lh,
    scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_OUT: tl.constexpr, BLOCK_IN: tl.constexpr,
    PACKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    if PACKED:
        if b == n_seq:
            row0 = tl.load(cu_ptr + n_seq) + pid * BLOCK_OUT
            step = tl.num_programs(0) * BLOCK_OUT
            _zero_rows(dq_ptr, row0, T, step, h, stride_dqt, stride_dqh, stride_dqd, HEAD_DIM, BLOCK_D, BLOCK_OUT)
            _zero_rows(dk_ptr, row0, T, step, h, stride_dkt, stride_dkh, stride_dkd, HEAD_DIM, BLOCK_D, BLOCK_OUT)
            _zero_rows(dv_ptr, row0, T, step, h, stride_dvt, stride_dvh, stride_dvd, HEAD_DIM, BLOCK_D, BLOCK_OUT)
    if b < n_seq:
        tok0, seqlen, lse0 = _sequence(cu_ptr, b, S, PACKED)
        start = pid * BLOCK_OUT
        if start < seqlen:
            qk_scale = scale * LOG2E
            offs_out = start + tl.arange(0, BLOCK_OUT)
            offs_in = tl.arange(0, BLOCK_IN)
            offs_d = tl.arange(0, BLOCK_D)
            mask_d = offs_d < HEAD_DIM
            mask_out = offs_out < seqlen
            out_mask = mask_out[:, None] & mask_d[None, :]
            rows_out = (tok0 + offs_out).to(tl.int64)
            bb = b.to(tl.int64)
            q_base = q_ptr + bb * stride_qb + h * stride_qh + offs_d[None, :] * stride_qd
            k_base = k_ptr + bb * stride_kb + h * stride_kh + offs_d[None, :] * stride_kd
            v_base = v_ptr + bb * stride_vb + h * stride_vh + offs_d[None, :] * stride_vd
            do_base = do_ptr + bb * stride_gb + h * stride_gh + offs_d[None, :] * stride_gd
            stat_base = h.to(tl.int64) * stride_lh + lse0

            # phase 1: dK, dV of keys [start, start + BLOCK_OUT) over every query block; scores kept transposed
            # (keys x queries) so no accumulator needs a transpose. *_out: this program's rows, *_in: the loop's
            # (distinct names: the compiler rejects a loop-carried name that changes shape)
            k_out = tl.load(k_base + rows_out[:, None] * stride_kt, mask=out_mask, other=0.0)
            v_out = tl.load(v_base + rows_out[:, None] * stride_vt, mask=out_mask, other=0.0)
            dk = tl.zeros([BLOCK_OUT, BLOCK_D], dtype=tl.float32)
            dv = tl.zeros([BLOCK_OUT, BLOCK_D], dtype=tl.float32)
            for start_m in range(0, seqlen, BLOCK_IN):
                cols = start_m + offs_in
                mask_m = cols < seqlen
                rows_m = (tok0 + cols).to(tl.int64)
                in_mask = mask_m[:, None] & mask_d[None, :]
                q_in = tl.load(q_base + rows_m[:, None] * stride_qt, mask=in_mask, other=0.0)
                do_in = tl.load(do_base + rows_m[:, None] * stride_gt, mask=in_mask, other=0.0)
                lse_in = tl.load(lse_ptr + stat_base + cols, mask=mask_m, other=0.0)
                delta_in = tl.load(delta_ptr + stat_base + cols, mask=mask_m, other=0.0)
                s_t = tl.dot(k_out, tl.trans(q_in), input_precision=DOT_PRECISION)
                # padded key rows (k = 0, score 0) would overflow exp2 when a query's real scores are all very
                # negative: their rows are never stored, but masking them keeps inf / NaN out of the accumulators.
                # Padded query columns need no mask: q = 0 and lse = 0 give p_t = 1, and dO = 0 there zeroes their
                # terms of dK and dV.
                p_t = tl.exp2(tl.where(mask_out[:, None], s_t * qk_scale - lse_in[None, :], float("-inf")))
                dv += tl.dot(p_t.to(do_in.dtype), do_in, input_precision=DOT_PRECISION)
                dp_t = tl.dot(v_out, tl.trans(do_in), input_precision=DOT_PRECISION)
                ds_t = p_t * (dp_t - delta_in[None, :])
                dk += tl.dot(ds_t.to(q_in.dtype), q_in, input_precision=DOT_PRECISION)
            dk = dk * scale
            tl.store(dk_ptr + bb * stride_dkb + rows_out[:, None] * stride_dkt + h * stride_dkh
                     + offs_d[None, :] * stride_dkd, dk.to(dk_ptr.dtype.element_ty), mask=out_mask)
            tl.store(dv_ptr + bb * stride_dvb + rows_out[:, None] * stride_dvt + h * stride_dvh
                     + offs_d[None, :] * stride_dvd, dv.to(dv_ptr.dtype.element_ty), mask=out_mask)

            # phase 2: dQ of queries [start, start + BLOCK_OUT) over every key block
            q_out = tl.load(q_base + rows_out[:, None] * stride_qt, mask=out_mask, other=0.0)
            do_out = tl.load(do_base + rows_out[:, None] * stride_gt, mask=out_mask, other=0.0)
            lse_out = tl.load(lse_ptr + stat_base + offs_out, mask=mask_out, other=0.0)
            delta_out = tl.load(delta_ptr + stat_base + offs_out, mask=mask_out, other=0.0)
            dq = tl.zeros([BLOCK_OUT, BLOCK_D], dtype=tl.float32)
            for start_n in range(0, seqlen, BLOCK_IN):
                cols = start_n + offs_in
                mask_n = cols < seqlen
                rows_n = (tok0 + cols).to(tl.int64)
                in_mask = mask_n[:, None] & mask_d[None, :]
                k_in = tl.load(k_base + rows_n[:, None] * stride_kt, mask=in_mask, other=0.0)
                v_in = tl.load(v_base + rows_n[:, None] * stride_vt, mask=in_mask, other=0.0)
                s = tl.dot(q_out, tl.trans(k_in), input_precision=DOT_PRECISION)
                # padded keys score 0, and exp2(0 - lse) overflows when every real score is very negative: mask
                p = tl.exp2(tl.where(mask_n[None, :], s * qk_scale - lse_out[:, None], float("-inf")))
                dp = tl.dot(do_out, tl.trans(v_in), input_precision=DOT_PRECISION)
                ds = p * (dp - delta_out[:, None])
                dq += tl.dot(ds.to(k_in.dtype), k_in, input_precision=DOT_PRECISION)
            dq = dq * scale
            tl.store(dq_ptr + bb * stride_dqb + rows_out[:, None] * stride_dqt + h * stride_dqh
                     + offs_d[None, :] * stride_dqd, dq.to(dq_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _tile_level(seqlen, LEVELS: tl.constexpr):
    """Index i of the tile MIN_TILE * 2**i the short path gives a sequence of ``seqlen`` >= 1 tokens."""
    level = 0
    for i in tl.static_range(LEVELS - 1):
        level += tl.where(seqlen > (MIN_TILE << i), 1, 0)
    return level


@triton.jit
def _fwd_tile(q_base, k_base, v_base, o_base, lse_base, tok0, seqlen,
              stride_qt, stride_qd, stride_kt, stride_kd, stride_vt, stride_vd, stride_ot, stride_od, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Attention of one whole sequence (at most BLOCK tokens) for one head: plain softmax, no rescaling loop."""
    offs = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs < seqlen
    mask = mask_s[:, None] & (offs_d[None, :] < HEAD_DIM)
    rows = (tok0 + offs).to(tl.int64)[:, None]
    q = tl.load(q_base + rows * stride_qt + offs_d[None, :] * stride_qd, mask=mask, other=0.0)
    k = tl.load(k_base + rows * stride_kt + offs_d[None, :] * stride_kd, mask=mask, other=0.0)
    v = tl.load(v_base + rows * stride_vt + offs_d[None, :] * stride_vd, mask=mask, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    s = tl.where(mask_s[None, :], s, float("-inf"))
    m = tl.max(s, 1)
    p = tl.exp2(s - m[:, None])
    denom = tl.sum(p, 1)
    o = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION) / denom[:, None]
    tl.store(o_base + rows * stride_ot + offs_d[None, :] * stride_od, o.to(o_base.dtype.element_ty), mask=mask)
    tl.store(lse_base + offs, m + tl.log2(denom), mask=mask_s)


@triton.jit
def _attn_fwd_short(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, cu_ptr,  # as in _attn_fwd
    n_seq, S, T,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_ob, stride_ot, stride_oh, stride_od,
    stride_lh,
    scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, LEVELS: tl.constexpr, PACKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # one program per (sequence, head); sequences on axis 0, which has no 65535 limit
    b = tl.program_id(0)
    h = tl.program_id(1)
    if PACKED:
        if b == n_seq:
            # the extra program row of a packed launch: zero the output and lse rows past cu_seqlens[N]
            row0 = tl.load(cu_ptr + n_seq)
            _zero_rows(o_ptr, row0, T, TAIL_ROWS, h, stride_ot, stride_oh, stride_od, HEAD_DIM, BLOCK_D, TAIL_ROWS)
            for r in range(row0, T, TAIL_ROWS):
                rows = r + tl.arange(0, TAIL_ROWS)
                tl.store(lse_ptr + h.to(tl.int64) * stride_lh + rows, tl.zeros([TAIL_ROWS], tl.float32),
                         mask=rows < T)
    if b < n_seq:
        tok0, seqlen, lse0 = _sequence(cu_ptr, b, S, PACKED)
        if seqlen > 0:
            bb = b.to(tl.int64)
            q_base = q_ptr + bb * stride_qb + h * stride_qh
            k_base = k_ptr + bb * stride_kb + h * stride_kh
            v_base = v_ptr + bb * stride_vb + h * stride_vh
            o_base = o_ptr + bb * stride_ob + h * stride_oh
            lse_base = lse_ptr + h.to(tl.int64) * stride_lh + lse0
            level = _tile_level(seqlen, LEVELS)
            for i in tl.static_range(LEVELS):
                if level == i:
                    _fwd_tile(q_base, k_base, v_base, o_base, lse_base, tok0, seqlen,
                              stride_qt, stride_qd, stride_kt, stride_kd, stride_vt, stride_vd, stride_ot, stride_od,
                              scale * LOG2E, HEAD_DIM, BLOCK_D, MIN_TILE << i, DOT_PRECISION)


@triton.jit
def _bwd_tile(q_base, k_base, v_base, do_base, dq_base, dk_base, dv_base, lse_base, tok0, seqlen,
              stride_qt, stride_qd, stride_kt, stride_kd, stride_vt, stride_vd, stride_gt, stride_gd,
              stride_dqt, stride_dqd, stride_dkt, stride_dkd, stride_dvt, stride_dvd,
              scale,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dQ, dK, dV of one whole sequence (at most BLOCK tokens) for one head. delta = rowsum(P * dP), which equals
    rowsum(dO * O) but comes from the fp32 P and dP the gradient subtracts it from, not from O rounded to the
    inputs' dtype: at fp16 / bf16 that rounding left dq and dk of short, peaked sequences several times less
    accurate than the same attention computed in the inputs' dtype (and the output is not read at all)."""
    offs = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)[None, :]
    mask_s = offs < seqlen
    mask = mask_s[:, None] & (offs_d < HEAD_DIM)
    rows = (tok0 + offs).to(tl.int64)[:, None]
    q = tl.load(q_base + rows * stride_qt + offs_d * stride_qd, mask=mask, other=0.0)
    k = tl.load(k_base + rows * stride_kt + offs_d * stride_kd, mask=mask, other=0.0)
    v = tl.load(v_base + rows * stride_vt + offs_d * stride_vd, mask=mask, other=0.0)
    do = tl.load(do_base + rows * stride_gt + offs_d * stride_gd, mask=mask, other=0.0)
    lse = tl.load(lse_base + offs, mask=mask_s, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    # padded keys (k = 0, score 0) would overflow exp2 when a query's real scores are all very negative: mask them.
    # Padded query rows need no mask: q = 0 and lse = 0 give p = 1, and dO = 0 there gives dP = 0, zeroing their terms.
    p = tl.exp2(tl.where(mask_s[None, :], s * (scale * LOG2E) - lse[:, None], float("-inf")))
    dv = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = p * (dp - tl.sum(p * dp, 1)[:, None])
    dq = tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION) * scale
    dk = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION) * scale
    tl.store(dq_base + rows * stride_dqt + offs_d * stride_dqd, dq.to(dq_base.dtype.element_ty), mask=mask)
    tl.store(dk_base + rows * stride_dkt + offs_d * stride_dkd, dk.to(dk_base.dtype.element_ty), mask=mask)
    tl.store(dv_base + rows * stride_dvt + offs_d * stride_dvd, dv.to(dv_base.dtype.element_ty), mask=mask)


@triton.jit
def _attn_bwd_short(
    q_ptr, k_ptr, v_ptr, do_ptr,  # [T, H, d] packed or [N, S, H, d] dense: inputs and dO
    lse_ptr,  # [H, R] fp32 from the forward
    dq_ptr, dk_ptr, dv_ptr, cu_ptr,
    n_seq, S, T,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_gb, stride_gt, stride_gh, stride_gd,
    stride_dqb, stride_dqt, stride_dqh, stride_dqd,
    stride_dkb, stride_dkt, stride_dkh, stride_dkd,
    stride_dvb, stride_dvt, stride_dvh, stride_dvd,
    stride_lh,
    scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, LEVELS: tl.constexpr, PACKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    if PACKED:
        if b == n_seq:
            row0 = tl.load(cu_ptr + n_seq)
            _zero_rows(dq_ptr, row0, T, TAIL_ROWS, h, stride_dqt, stride_dqh, stride_dqd, HEAD_DIM, BLOCK_D,
                       TAIL_ROWS)
            _zero_rows(dk_ptr, row0, T, TAIL_ROWS, h, stride_dkt, stride_dkh, stride_dkd, HEAD_DIM, BLOCK_D,
                       TAIL_ROWS)
            _zero_rows(dv_ptr, row0, T, TAIL_ROWS, h, stride_dvt, stride_dvh, stride_dvd, HEAD_DIM, BLOCK_D,
                       TAIL_ROWS)
    if b < n_seq:
        tok0, seqlen, lse0 = _sequence(cu_ptr, b, S, PACKED)
        if seqlen > 0:
            bb = b.to(tl.int64)
            q_base = q_ptr + bb * stride_qb + h * stride_qh
            k_base = k_ptr + bb * stride_kb + h * stride_kh
            v_base = v_ptr + bb * stride_vb + h * stride_vh
            do_base = do_ptr + bb * stride_gb + h * stride_gh
            dq_base = dq_ptr + bb * stride_dqb + h * stride_dqh
            dk_base = dk_ptr + bb * stride_dkb + h * stride_dkh
            dv_base = dv_ptr + bb * stride_dvb + h * stride_dvh
            lse_base = lse_ptr + h.to(tl.int64) * stride_lh + lse0
            level = _tile_level(seqlen, LEVELS)
            for i in tl.static_range(LEVELS):
                if level == i:
                    _bwd_tile(q_base, k_base, v_base, do_base, dq_base, dk_base, dv_base, lse_base,
                              tok0, seqlen,
                              stride_qt, stride_qd, stride_kt, stride_kd, stride_vt, stride_vd, stride_gt, stride_gd,
                              stride_dqt, stride_dqd, stride_dkt, stride_dkd,
                              stride_dvt, stride_dvd, scale, HEAD_DIM, BLOCK_D, MIN_TILE << i, DOT_PRECISION)


def short_config(head_dim: int, max_seqlen: int, fp32: bool, backward: bool = False) -> dict[str, int] | None:
    """Launch options of the short (whole sequence in one tile) kernels, or None when max_seqlen is too long."""
    block_d = max(16, next_pow2(head_dim))
    limit = SHORT_MAX_SEQLEN_FP32 if fp32 or block_d > 64 else SHORT_MAX_SEQLEN
    if max_seqlen > (limit // 2 if fp32 and block_d > 64 else limit):
        return None
    top = max(MIN_TILE.value, next_pow2(max_seqlen))
    levels = top.bit_length() - MIN_TILE.value.bit_length() + 1
    # 8 warps once a tile reaches 128 x 128 scores (64 fp32 registers a thread per score tile, not 128), for d 128
    # and for fp32 (IEEE dots hold their operands in registers). The backward, with five input tiles and four
    # score-sized ones, also from 64 x 64 tiles: on an H100 (bf16, d 64, 12 heads, 256 sequences of about 50
    # tokens) it took 0.365 ms with 4 warps on 64-token tiles against 0.168 ms with 8 warps on a ragged batch of
    # as many tokens whose tiles were mostly as large or larger (benchmarks/results/bench_attention.md, f1d6b9a)
    warps = 8 if top >= 128 or block_d >= 128 or fp32 or (backward and top >= 64) else 4
    return dict(BLOCK_D=block_d, LEVELS=levels, num_warps=warps, num_stages=1)


# The forward's tiles past the short path: FWD_BLOCK_M query rows by FWD_BLOCK_N keys, FWD_STAGES pipeline stages.
# Long sequences keep 128 x 64 tiles on one warpgroup: on an H100 (Triton 3.6, bf16, d 64, 1568 tokens) they ran
# the forward at 330 TFLOP/s, 128 x 128 tiles on two warpgroups at 266 (benchmarks/results/bench_attention.md).
# At 197 tokens a 128 x 64 tiling computes 256 x 208 scores with a narrow last key block (73% of them used; 256 x
# 256, 59%, without); the other tilings are not yet timed there (benchmarks/gpu_session.sh's sweep:attention).
FWD_BLOCK_M = 128
FWD_BLOCK_N = 64
FWD_STAGES = 3
# The last, partial key block of a sequence as narrow as its keys allow (16, 32, ... columns) rather than FWD_BLOCK_N
# wide: 19% fewer score columns at 197 tokens, 2% at 1568. Not yet timed (False: always FWD_BLOCK_N wide).
FWD_NARROW_TAIL = True


def fwd_config(head_dim: int, max_seqlen: int, fp32: bool) -> dict[str, int]:
    """Block sizes and launch options of the forward kernel (fp32 runs IEEE dots, so it gets smaller tiles)."""
    block_d = max(16, next_pow2(head_dim))
    if fp32:
        return dict(BLOCK_D=block_d, BLOCK_M=32, BLOCK_N=32, TAIL_LEVELS=tail_levels(32), num_warps=4, num_stages=1)
    # sequences just past the short path's limit would leave most of a 128-row tile idle
    block_m = min(64, FWD_BLOCK_M) if max_seqlen <= 128 else FWD_BLOCK_M
    return dict(BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=FWD_BLOCK_N, TAIL_LEVELS=tail_levels(FWD_BLOCK_N),
                num_warps=4 if block_d <= 64 else 8, num_stages=FWD_STAGES)


def tail_levels(block_n: int) -> int:
    """How many widths the forward's partial key block can take: 16, 32, ... block_n, or block_n alone."""
    return max(1, (block_n // MIN_TILE.value).bit_length()) if FWD_NARROW_TAIL else 1


def bwd_config(head_dim: int, fp32: bool) -> dict[str, int]:
    block_d = max(16, next_pow2(head_dim))
    if fp32:
        return dict(BLOCK_D=block_d, BLOCK_OUT=32, BLOCK_IN=32, num_warps=4, num_stages=1)
    return dict(BLOCK_D=block_d, BLOCK_OUT=64, BLOCK_IN=32, num_warps=4 if block_d <= 64 else 8, num_stages=2)
