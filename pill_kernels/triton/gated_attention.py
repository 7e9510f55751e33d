"""Triton forward and backward of gated flash attention: causal softmax attention in which image keys' values are
scaled by PILL's modality gate per query head, plus LLaMA-Adapter V2's gated prompt branch.

    O = softmax(q K^T * scale + mask) (mult * V) + tanh(g_h) * softmax(q K_p^T * scale) V_p,
    mult[b, h, j] = tanh(gate_logits[b, h, j]) for image keys, 1 otherwise

Query i sits at key position Skv - S + i (KV-cache decoding); key_padding_mask drops keys; a query that may
attend to no key gets zeros from the token branch. A sliding window (WINDOW > 0) keeps the last WINDOW key
positions up to the query's own, and the loops skip the key (query) blocks wholly outside it. Packed rows
(segment_ids): a query sees the keys of its own segment only, and the key loops skip the blocks outside it
(varlen) rather than masking them; the prompt branch sees the prompts whose id is the query's segment id. Online softmax over key blocks: no S x Skv matrix in memory.
The gate multiplies the probabilities (p * mult) rather than the value tile, so a GQA model gets a gate per
query head while its K/V tiles stay shared; the softmax denominator is that of the ungated scores.

Backward (three launches, no atomics, deterministic):
- `_backward_prompt_kernel` (query blocks): delta_i = rowsum(dO_i * O_token_i) for the token branch, and the
  prompt branch's gradients (dq part, per-block partial dK_p, dV_p, d tanh-gate), since its K prompts are few;
- `_backward_kv_kernel` (key blocks of one KV head, looping over the heads of its group): dK, dV and the gate
  logits' gradients d gl[b, h, j] = (1 - mult^2) * sum_i p_ij (dO_i . v_j) for image keys;
- `_backward_q_kernel` (query blocks): dQ.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference import segment_starts
from ._common import (INTERPRET, accumulator_dtype, cast, check_dtype, check_index_range, dot, mma_precision,
                      pow2_at_least_16, tanh)


def _blocks(head_dim: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps). Not yet timed on a GPU; 8 warps because with 4 the dK/dV kernel spills
    registers on sm_90 (checked with cuobjdump on the cubin tests/triton_gpu_compile.py builds)."""
    if INTERPRET:
        return 16, 16, 1
    if dtype == torch.float32:  # fp32 tiles take twice the registers
        return (32, 32, 8) if head_dim <= 64 else (32, 16, 8)
    return (64, 64, 8) if head_dim <= 64 else (64, 32, 8)


@triton.jit
def _key_mask(offs_m, offs_n, b, S, SKV, WINDOW, kpm_ptr, run_ptr, q_run, HAS_PAD: tl.constexpr,
              HAS_SEG: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    allowed = (offs_n < SKV)[None, :] & (offs_m < S)[:, None]
    if CAUSAL:
        allowed = allowed & (offs_n[None, :] <= (offs_m + SKV - S)[:, None])
    if HAS_WINDOW:
        allowed = allowed & (offs_n[None, :] > (offs_m + SKV - S - WINDOW)[:, None])
    if HAS_PAD:
        real = tl.load(kpm_ptr + b * SKV + offs_n, mask=offs_n < SKV, other=0) != 0
        allowed = allowed & real[None, :]
    if HAS_SEG:
        k_run = tl.load(run_ptr + b * SKV + offs_n, mask=offs_n < SKV, other=-1)
        allowed = allowed & (k_run[None, :] == q_run[:, None])
    return allowed


@triton.jit
def _query_runs(run_ptr, b, S, SKV, offs_m, HAS_SEG: tl.constexpr):
    # The segment (run) number of each query (unused without segments).
    if HAS_SEG:
        q_run = tl.load(run_ptr + b * SKV + offs_m + SKV - S, mask=offs_m < S, other=-2)
        return q_run
    return offs_m


@triton.jit
def _key_begin(start_ptr, b, pid_m, S, SKV, WINDOW, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               HAS_SEG: tl.constexpr, HAS_WINDOW: tl.constexpr):
    # The key block holding the first key that the block's first query sees: every key before the first key of
    # its segment belongs to earlier examples, and every key before its window is out of reach of all the
    # block's queries, so the key loop starts there.
    first = tl.minimum(pid_m * BLOCK_M, S - 1) + SKV - S
    begin = 0
    if HAS_SEG:
        begin = tl.load(start_ptr + b * SKV + first)
    if HAS_WINDOW:
        begin = tl.maximum(begin, first - WINDOW + 1)
    return (begin // BLOCK_N) * BLOCK_N


@triton.jit
def _key_multiplier(gl_ptr, img_ptr, b, h, H, SKV, offs_n, ACC: tl.constexpr):
    n_ok = offs_n < SKV
    gl = tl.load(gl_ptr + (b * H + h) * SKV + offs_n, mask=n_ok, other=0.).to(ACC)
    image = (tl.load(img_ptr + b * SKV + offs_n, mask=n_ok, other=0) != 0) & n_ok
    return tl.where(image, tanh(gl), 1.0), image


@triton.jit
def _key_end(pid_m, S, SKV, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    # Keys past the last query's position in this block are masked for every row: don't visit them.
    if CAUSAL:
        return tl.minimum(SKV, (pid_m + 1) * BLOCK_M + SKV - S)
    return SKV


@triton.jit
def _prompt_probs(q, pk_ptr, pseg_ptr, q_ids, b, hkv, HKV, NP, HD, scale, dd, d_ok, ACC: tl.constexpr,
                  UPCAST: tl.constexpr, IEEE: tl.constexpr, BLOCK_P: tl.constexpr, HAS_PSEG: tl.constexpr):
    pp = tl.arange(0, BLOCK_P)
    p_ok = pp < NP
    pk = tl.load(pk_ptr + ((b * HKV + hkv) * NP + pp[:, None]) * HD + dd[None, :], mask=p_ok[:, None] & d_ok[None, :],
                 other=0.)
    visible = p_ok[None, :] & (q_ids[:, None] == q_ids[:, None])  # [M, P]: every real prompt
    if HAS_PSEG:
        # Packed rows: a query sees the prompts of its own example only, and none (zeros) if it has none.
        p_ids = tl.load(pseg_ptr + b * NP + pp, mask=p_ok, other=0)
        visible = visible & (p_ids[None, :] == q_ids[:, None])
    scores = tl.where(visible, dot(q, tl.trans(pk), UPCAST, IEEE) * scale, float("-inf"))
    top = tl.max(scores, axis=1)
    e = tl.where(visible, tl.exp(scores - tl.where(top == float("-inf"), 0.0, top)[:, None]), 0.)
    total = tl.sum(e, axis=1)
    return e / tl.where(total > 0, total, 1.0)[:, None], pk


@triton.jit
def _query_ids(seg_ptr, b, S, SKV, offs_m, HAS_PSEG: tl.constexpr):
    # The segment id of each query, matched against the prompts' ids.
    if HAS_PSEG:
        return tl.load(seg_ptr + b * SKV + offs_m + SKV - S, mask=offs_m < S, other=0)
    return offs_m


@triton.jit
def _forward_kernel(q_ptr, k_ptr, v_ptr, gl_ptr, img_ptr, kpm_ptr, run_ptr, start_ptr, seg_ptr, pseg_ptr, pk_ptr,
                    pv_ptr, pg_ptr, o_ptr, lse_ptr, H, HKV, S, SKV, NP, HD, scale, WINDOW,
                    HAS_GATE: tl.constexpr, HAS_PAD: tl.constexpr, HAS_SEG: tl.constexpr, HAS_PSEG: tl.constexpr,
                    HAS_PROMPT: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                    ACC: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hkv = h // (H // HKV)
    dtype = o_ptr.dtype.element_ty
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < S
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < HD
    q_off = (bh * S + offs_m[:, None]) * HD + dd[None, :]
    q = tl.load(q_ptr + q_off, mask=m_ok[:, None] & d_ok[None, :], other=0.)
    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    kv_base = (b * HKV + hkv) * SKV * HD
    q_run = _query_runs(run_ptr, b, S, SKV, offs_m, HAS_SEG)
    n_begin = _key_begin(start_ptr, b, pid_m, S, SKV, WINDOW, BLOCK_M, BLOCK_N, HAS_SEG, HAS_WINDOW)
    for n0 in range(n_begin, _key_end(pid_m, S, SKV, BLOCK_M, CAUSAL), BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        kv_off = kv_base + offs_n[:, None] * HD + dd[None, :]
        kv_ok = (offs_n < SKV)[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + kv_off, mask=kv_ok, other=0.)
        allowed = _key_mask(offs_m, offs_n, b, S, SKV, WINDOW, kpm_ptr, run_ptr, q_run, HAS_PAD, HAS_SEG,
                            CAUSAL, HAS_WINDOW)
        s = tl.where(allowed, dot(q, tl.trans(k), UPCAST, IEEE) * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row with no allowed key so far keeps m = -inf; subtracting 0 instead keeps exp() at 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if HAS_GATE:
            mult, _ = _key_multiplier(gl_ptr, img_ptr, b, h, H, SKV, offs_n, ACC)
            p = p * mult[None, :]
        v = tl.load(v_ptr + kv_off, mask=kv_ok, other=0.)
        acc = acc * alpha[:, None] + dot(cast(p, dtype), v, UPCAST, IEEE)
        m_i = m_new
    has_key = l_i > 0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    lse = tl.where(has_key, tl.where(m_i == float("-inf"), 0.0, m_i) + tl.log(tl.where(has_key, l_i, 1.0)),
                   float("inf"))
    tl.store(lse_ptr + bh * S + offs_m, lse, mask=m_ok)
    if HAS_PROMPT:
        q_ids = _query_ids(seg_ptr, b, S, SKV, offs_m, HAS_PSEG)
        probs, _ = _prompt_probs(q, pk_ptr, pseg_ptr, q_ids, b, hkv, HKV, NP, HD, scale, dd, d_ok, ACC, UPCAST,
                                 IEEE, BLOCK_P, HAS_PSEG)
        pp = tl.arange(0, BLOCK_P)
        pv = tl.load(pv_ptr + ((b * HKV + hkv) * NP + pp[:, None]) * HD + dd[None, :],
                     mask=(pp < NP)[:, None] & d_ok[None, :], other=0.)
        gate = tanh(tl.load(pg_ptr + h).to(ACC))
        out += gate * dot(cast(probs, dtype), pv, UPCAST, IEEE)
    tl.store(o_ptr + q_off, cast(out, dtype), mask=m_ok[:, None] & d_ok[None, :])


@triton.jit
def _backward_prompt_kernel(q_ptr, o_ptr, do_ptr, seg_ptr, pseg_ptr, pk_ptr, pv_ptr, pg_ptr, delta_ptr, dq_ptr,
                            dpk_ptr, dpv_ptr, dpg_ptr, H, HKV, S, SKV, NP, HD, scale, HAS_PROMPT: tl.constexpr,
                            HAS_PSEG: tl.constexpr, ACC: tl.constexpr,
                            UPCAST: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                            BLOCK_P: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hkv = h // (H // HKV)
    dtype = q_ptr.dtype.element_ty
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < S
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < HD
    off = (bh * S + offs_m[:, None]) * HD + dd[None, :]
    ok = m_ok[:, None] & d_ok[None, :]
    do = tl.load(do_ptr + off, mask=ok, other=0.)
    o_token = tl.load(o_ptr + off, mask=ok, other=0.).to(ACC)
    if HAS_PROMPT:
        q = tl.load(q_ptr + off, mask=ok, other=0.)
        q_ids = _query_ids(seg_ptr, b, S, SKV, offs_m, HAS_PSEG)
        probs, pk = _prompt_probs(q, pk_ptr, pseg_ptr, q_ids, b, hkv, HKV, NP, HD, scale, dd, d_ok, ACC, UPCAST,
                                  IEEE, BLOCK_P, HAS_PSEG)
        probs = tl.where(m_ok[:, None], probs, 0.)
        pp = tl.arange(0, BLOCK_P)
        pv = tl.load(pv_ptr + ((b * HKV + hkv) * NP + pp[:, None]) * HD + dd[None, :],
                     mask=(pp < NP)[:, None] & d_ok[None, :], other=0.)
        gate = tanh(tl.load(pg_ptr + h).to(ACC))
        o_prompt = dot(cast(probs, dtype), pv, UPCAST, IEEE)
        o_token -= gate * o_prompt
        do_prompt = cast(gate * do.to(ACC), dtype)
        d_probs = dot(do_prompt, tl.trans(pv), UPCAST, IEEE)
        d_scores = probs * (d_probs - tl.sum(d_probs * probs, axis=1)[:, None])
        d_scores_op = cast(d_scores, dtype)
        tl.store(dq_ptr + off, dot(d_scores_op, pk, UPCAST, IEEE) * scale, mask=ok)
        # Partial sums of this query block; the launcher adds the blocks and the heads of a KV group in order.
        part = ((pid_m * tl.num_programs(1) + bh) * NP + pp[:, None]) * HD + dd[None, :]
        p_ok = (pp < NP)[:, None] & d_ok[None, :]
        tl.store(dpv_ptr + part, dot(tl.trans(cast(probs, dtype)), do_prompt, UPCAST, IEEE), mask=p_ok)
        tl.store(dpk_ptr + part, dot(tl.trans(d_scores_op), q, UPCAST, IEEE) * scale, mask=p_ok)
        d_gate = tl.sum(tl.sum(do.to(ACC) * o_prompt, axis=1), axis=0) * (1.0 - gate * gate)
        tl.store(dpg_ptr + pid_m * tl.num_programs(1) + bh, d_gate)
    tl.store(delta_ptr + bh * S + offs_m, tl.sum(do.to(ACC) * o_token, axis=1), mask=m_ok)


@triton.jit
def _backward_kv_kernel(q_ptr, k_ptr, v_ptr, gl_ptr, img_ptr, kpm_ptr, run_ptr, end_ptr, do_ptr, lse_ptr, delta_ptr,
                        dk_ptr, dv_ptr, dgl_ptr, H, HKV, S, SKV, HD, scale, WINDOW,
                        HAS_GATE: tl.constexpr, HAS_PAD: tl.constexpr, HAS_SEG: tl.constexpr, CAUSAL: tl.constexpr,
                        HAS_WINDOW: tl.constexpr,
                        ACC: tl.constexpr,
                        UPCAST: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_D: tl.constexpr):
    pid_n = tl.program_id(0)
    bhkv = tl.program_id(1)
    b = bhkv // HKV
    hkv = bhkv % HKV
    group = H // HKV
    dtype = k_ptr.dtype.element_ty
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < SKV
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < HD
    kv_off = (bhkv * SKV + offs_n[:, None]) * HD + dd[None, :]
    kv_ok = n_ok[:, None] & d_ok[None, :]
    k = tl.load(k_ptr + kv_off, mask=kv_ok, other=0.)
    v = tl.load(v_ptr + kv_off, mask=kv_ok, other=0.)
    dk = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    # Queries before this key block's first position cannot see it (causal).
    m_start = 0
    if CAUSAL:
        m_start = (tl.maximum(pid_n * BLOCK_N - (SKV - S), 0) // BLOCK_M) * BLOCK_M
    m_end = S
    if HAS_SEG:
        # Queries past the segment of this block's last key belong to other examples: don't visit them.
        last = tl.minimum(pid_n * BLOCK_N + BLOCK_N, SKV) - 1
        m_end = tl.minimum(S, tl.load(end_ptr + b * SKV + last) - (SKV - S))
    if HAS_WINDOW:
        # Queries a window or more past this block's last key see none of it.
        last_key = tl.minimum(pid_n * BLOCK_N + BLOCK_N, SKV) - 1
        m_end = tl.maximum(tl.minimum(m_end, last_key + WINDOW - (SKV - S)), 0)
    for g in range(group):
        h = hkv * group + g
        bh = b * H + h
        if HAS_GATE:
            mult, image = _key_multiplier(gl_ptr, img_ptr, b, h, H, SKV, offs_n, ACC)
            d_mult = tl.zeros([BLOCK_N], ACC)
        for m0 in range(m_start, m_end, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_ok = offs_m < S
            q_run = _query_runs(run_ptr, b, S, SKV, offs_m, HAS_SEG)
            q_off = (bh * S + offs_m[:, None]) * HD + dd[None, :]
            q_ok = m_ok[:, None] & d_ok[None, :]
            q = tl.load(q_ptr + q_off, mask=q_ok, other=0.)
            do = tl.load(do_ptr + q_off, mask=q_ok, other=0.)
            lse = tl.load(lse_ptr + bh * S + offs_m, mask=m_ok, other=float("inf"))
            delta = tl.load(delta_ptr + bh * S + offs_m, mask=m_ok, other=0.)
            allowed = _key_mask(offs_m, offs_n, b, S, SKV, WINDOW, kpm_ptr, run_ptr, q_run, HAS_PAD, HAS_SEG,
                            CAUSAL, HAS_WINDOW)
            s = dot(q, tl.trans(k), UPCAST, IEEE) * scale
            p = tl.where(allowed, tl.exp(s - lse[:, None]), 0.)
            do_v = dot(do, tl.trans(v), UPCAST, IEEE)
            if HAS_GATE:
                d_mult += tl.sum(p * do_v, axis=0)
                p_gated = p * mult[None, :]
                dp = do_v * mult[None, :]
            else:
                p_gated = p
                dp = do_v
            dv += dot(tl.trans(cast(p_gated, dtype)), do, UPCAST, IEEE)
            ds = p * (dp - delta[:, None])
            dk += dot(tl.trans(cast(ds, dtype)), q, UPCAST, IEEE)
        if HAS_GATE:
            d_logit = tl.where(image, d_mult * (1.0 - mult * mult), 0.)
            tl.store(dgl_ptr + bh * SKV + offs_n, cast(d_logit, dtype), mask=n_ok)
    tl.store(dk_ptr + kv_off, cast(dk * scale, dtype), mask=kv_ok)
    tl.store(dv_ptr + kv_off, cast(dv, dtype), mask=kv_ok)


@triton.jit
def _backward_q_kernel(q_ptr, k_ptr, v_ptr, gl_ptr, img_ptr, kpm_ptr, run_ptr, start_ptr, do_ptr, lse_ptr,
                       delta_ptr, dq_prompt_ptr, dq_ptr, H, HKV, S, SKV, HD, scale, WINDOW,
                       HAS_GATE: tl.constexpr, HAS_PAD: tl.constexpr, HAS_SEG: tl.constexpr, HAS_PROMPT: tl.constexpr,
                       CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr,
                       IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hkv = h // (H // HKV)
    dtype = q_ptr.dtype.element_ty
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < S
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < HD
    q_off = (bh * S + offs_m[:, None]) * HD + dd[None, :]
    q_ok = m_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + q_off, mask=q_ok, other=0.)
    do = tl.load(do_ptr + q_off, mask=q_ok, other=0.)
    lse = tl.load(lse_ptr + bh * S + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(delta_ptr + bh * S + offs_m, mask=m_ok, other=0.)
    dq = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    kv_base = (b * HKV + hkv) * SKV * HD
    q_run = _query_runs(run_ptr, b, S, SKV, offs_m, HAS_SEG)
    n_begin = _key_begin(start_ptr, b, pid_m, S, SKV, WINDOW, BLOCK_M, BLOCK_N, HAS_SEG, HAS_WINDOW)
    for n0 in range(n_begin, _key_end(pid_m, S, SKV, BLOCK_M, CAUSAL), BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        kv_off = kv_base + offs_n[:, None] * HD + dd[None, :]
        kv_ok = (offs_n < SKV)[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + kv_off, mask=kv_ok, other=0.)
        v = tl.load(v_ptr + kv_off, mask=kv_ok, other=0.)
        allowed = _key_mask(offs_m, offs_n, b, S, SKV, WINDOW, kpm_ptr, run_ptr, q_run, HAS_PAD, HAS_SEG,
                            CAUSAL, HAS_WINDOW)
        p = tl.where(allowed, tl.exp(dot(q, tl.trans(k), UPCAST, IEEE) * scale - lse[:, None]), 0.)
        dp = dot(do, tl.trans(v), UPCAST, IEEE)
        if HAS_GATE:
            mult, _ = _key_multiplier(gl_ptr, img_ptr, b, h, H, SKV, offs_n, ACC)
            dp = dp * mult[None, :]
        ds = p * (dp - delta[:, None])
        dq += dot(cast(ds, dtype), k, UPCAST, IEEE)
    dq = dq * scale
    if HAS_PROMPT:
        dq += tl.load(dq_prompt_ptr + q_off, mask=q_ok, other=0.)
    tl.store(dq_ptr + q_off, cast(dq, dtype), mask=q_ok)


def _launch_args(q, k, gate_logits, key_padding_mask, prompt_k, causal, segment_ids, prompt_segment_ids, window):
    batch, heads, seq_q, head_dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    num_prompts = prompt_k.shape[2] if prompt_k is not None else 0
    if window and not causal:
        raise ValueError("gated_attention: a sliding window needs causal=True")
    flags = dict(HAS_GATE=gate_logits is not None, HAS_PAD=key_padding_mask is not None,
                 HAS_SEG=segment_ids is not None, CAUSAL=bool(causal), HAS_WINDOW=bool(window),
                 ACC=accumulator_dtype(q.dtype), UPCAST=INTERPRET and q.dtype in (torch.float16, torch.bfloat16),
                 IEEE=mma_precision(q.dtype), BLOCK_D=pow2_at_least_16(head_dim))
    return batch, heads, kv_heads, seq_q, seq_k, head_dim, num_prompts, flags


def _segment_tables(segment_ids, like):
    """(run number, first key of the run, one past its last key) per key position [B, Skv] as int32, computed on
    the device without a host sync; placeholders without segments."""
    if segment_ids is None:
        return like, like, like
    seq = segment_ids.shape[1]
    change = segment_starts(segment_ids)
    runs = change.to(torch.int32).cumsum(-1, dtype=torch.int32)
    positions = torch.arange(seq, device=segment_ids.device, dtype=torch.int32).expand_as(runs)
    starts = torch.where(change, positions, 0).cummax(-1).values.to(torch.int32)
    last = torch.ones_like(change)
    last[:, :-1] = change[:, 1:]
    # Each position's run ends at the first run end at or after it: a minimum scanned from the right.
    ends = torch.where(last, positions + 1, seq + 1).flip(-1).cummin(-1).values.flip(-1).to(torch.int32)
    return runs.contiguous(), starts.contiguous(), ends.contiguous()


def _placeholder(t, like):
    # Absent optional inputs still need a pointer argument; the kernels never read it.
    return t if t is not None else like


def forward(q, k, v, gate_logits, image_mask, key_padding_mask, prompt_k, prompt_v, prompt_gate, segment_ids,
            prompt_segment_ids, causal, scale, window=0):
    check_dtype("gated_attention", q.dtype, q.device)
    check_index_range("gated_attention", q, k)
    batch, heads, kv_heads, seq_q, seq_k, head_dim, num_prompts, flags = _launch_args(
        q, k, gate_logits, key_padding_mask, prompt_k, causal, segment_ids, prompt_segment_ids, window)
    out = torch.empty_like(q)
    lse = torch.empty(batch, heads, seq_q, device=q.device, dtype=torch.promote_types(q.dtype, torch.float32))
    if out.numel() == 0:
        return out, lse
    runs, starts, _ = _segment_tables(segment_ids, q)
    block_m, block_n, warps = _blocks(head_dim, q.dtype)
    _forward_kernel[(triton.cdiv(seq_q, block_m), batch * heads)](
        q, k, v, _placeholder(gate_logits, q), _placeholder(image_mask, q), _placeholder(key_padding_mask, q),
        runs, starts, _placeholder(segment_ids, q), _placeholder(prompt_segment_ids, q),
        _placeholder(prompt_k, q), _placeholder(prompt_v, q), _placeholder(prompt_gate, q), out, lse,
        heads, kv_heads, seq_q, seq_k, num_prompts, head_dim, scale, window, HAS_PROMPT=prompt_k is not None,
        HAS_PSEG=prompt_segment_ids is not None, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_P=pow2_at_least_16(num_prompts), num_warps=warps, **flags)
    return out, lse


def backward(grad_o, out, lse, q, k, v, gate_logits, image_mask, key_padding_mask, prompt_k, prompt_v, prompt_gate,
             segment_ids, prompt_segment_ids, causal, scale, window=0):
    check_dtype("gated_attention", q.dtype, q.device)
    check_index_range("gated_attention", q, k)
    batch, heads, kv_heads, seq_q, seq_k, head_dim, num_prompts, flags = _launch_args(
        q, k, gate_logits, key_padding_mask, prompt_k, causal, segment_ids, prompt_segment_ids, window)
    has_prompt = prompt_k is not None
    block_m, block_n, warps = _blocks(head_dim, q.dtype)
    q_blocks = triton.cdiv(seq_q, block_m)
    runs, starts, ends = _segment_tables(segment_ids, q)
    masks = (_placeholder(gate_logits, q), _placeholder(image_mask, q), _placeholder(key_padding_mask, q), runs)
    acc = lse.dtype
    delta = torch.empty(batch, heads, seq_q, device=q.device, dtype=acc)
    dq_prompt = torch.empty(q.shape, device=q.device, dtype=acc) if has_prompt else delta
    part_shape = (q_blocks, batch, heads, num_prompts, head_dim)
    dpk_parts = torch.empty(part_shape, device=q.device, dtype=acc) if has_prompt else delta
    dpv_parts = torch.empty(part_shape, device=q.device, dtype=acc) if has_prompt else delta
    dpg_parts = torch.empty(q_blocks, batch, heads, device=q.device, dtype=acc) if has_prompt else delta
    prompt_flags = {k: flags[k] for k in ("ACC", "UPCAST", "IEEE", "BLOCK_D")}
    if q.numel():
        _backward_prompt_kernel[(q_blocks, batch * heads)](
            q, out, grad_o, _placeholder(segment_ids, q), _placeholder(prompt_segment_ids, q),
            _placeholder(prompt_k, q), _placeholder(prompt_v, q), _placeholder(prompt_gate, q),
            delta, dq_prompt, dpk_parts, dpv_parts, dpg_parts, heads, kv_heads, seq_q, seq_k, num_prompts, head_dim,
            scale, HAS_PROMPT=has_prompt, HAS_PSEG=prompt_segment_ids is not None, BLOCK_M=block_m,
            BLOCK_P=pow2_at_least_16(num_prompts), num_warps=warps, **prompt_flags)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    dgl = torch.empty_like(gate_logits) if gate_logits is not None else None
    if k.numel():
        _backward_kv_kernel[(triton.cdiv(seq_k, block_n), batch * kv_heads)](
            q, k, v, *masks, ends, grad_o, lse, delta, dk, dv, _placeholder(dgl, q), heads, kv_heads, seq_q, seq_k,
            head_dim, scale, window, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, **flags)
    dq = torch.empty_like(q)
    if q.numel():
        _backward_q_kernel[(q_blocks, batch * heads)](
            q, k, v, *masks, starts, grad_o, lse, delta, dq_prompt, dq, heads, kv_heads, seq_q, seq_k, head_dim,
            scale, window, HAS_PROMPT=has_prompt, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, **flags)
    if not has_prompt:
        return dq, dk, dv, dgl, None, None, None
    group = heads // kv_heads
    fold = lambda t: t.sum(0).view(batch, kv_heads, group, num_prompts, head_dim).sum(2).to(q.dtype)  # noqa: E731
    return dq, dk, dv, dgl, fold(dpk_parts), fold(dpv_parts), dpg_parts.sum((0, 1)).to(q.dtype)
