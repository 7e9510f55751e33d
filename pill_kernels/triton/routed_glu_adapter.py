"""Triton forward and backward of the hard-routed GLU adapter (PILL MoMAE; E=1 is PILL's attention adapter).

    y = n + W_up[e](SiLU(n W_gate[e]) * (n W_down[e])),   e = expert_ids[t],   n = RMSNorm(x; g) or x

Forward: one launch. Each program owns a tile of tokens; it loops over the experts present in the tile (one for
every tile inside an image or text run; each present expert on its own rows at the boundary between runs, so
mixed tiles need neither padding nor a host sync). Per expert: one pass over D accumulates (x*g) W_down and
(x*g) W_gate and the sum of squares, so rstd is applied after the reduction (n W = rstd * ((x*g) W)); a second
pass writes n + act W_up.

Backward: two launches and no atomics, so results are deterministic.
- `_backward_tokens_kernel` (token tiles): recomputes the bottleneck activations, writes dx and the per-token
  bottleneck gradients (T x r, small) for the weight gradients. The RMSNorm backward needs
  sum_d(dn * g * x); with dn = dy + d_hd W_down^T + d_hg W_gate^T that sum is
  sum_d(dy * g * x) + d_hd . ((x*g) W_down) + d_hg . ((x*g) W_gate), known after the first pass, so dx is
  written in the second pass without a third.
- `_backward_weights_kernel` (D chunks x experts x token splits): reduces W_down, W_gate, W_up and norm-weight
  gradients over the tokens of its expert, skipping tiles without them; the few token splits are summed in
  a fixed order afterwards.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (INTERPRET, accumulator_dtype, cast, check_dtype, check_index_range, dot, mma_precision,
                      pow2_at_least_16, rms_rstd, token_blocks, token_splits)


@triton.jit
def _expert_range(ids_ptr, rows, row_ok, E, HAS_IDS: tl.constexpr):
    if HAS_IDS:
        ids = tl.load(ids_ptr + rows, mask=row_ok, other=-1).to(tl.int32)
        # Out-of-range ids (only possible with PILL_KERNELS_CHECKS=0) are never read as expert indices.
        lo = tl.maximum(tl.min(tl.where(row_ok, ids, E)), 0)
        hi = tl.minimum(tl.max(ids), E - 1)
    else:
        ids = tl.zeros_like(rows)
        lo = 0
        hi = 0
    return ids, lo, hi


@triton.jit
def _forward_kernel(x_ptr, wd_ptr, wg_ptr, wu_ptr, ids_ptr, g_ptr, y_ptr, T, D, R, E, eps,
                    HAS_IDS: tl.constexpr, HAS_NORM: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr,
                    IEEE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R
    dd = tl.arange(0, BLOCK_D)
    ids, lo, hi = _expert_range(ids_ptr, rows, row_ok, E, HAS_IDS)
    for e in range(lo, hi + 1):
        mine = row_ok & (ids == e)
        if tl.max(mine.to(tl.int32)) > 0:
            acc_d = tl.zeros([BLOCK_T, BLOCK_R], ACC)
            acc_g = tl.zeros([BLOCK_T, BLOCK_R], ACC)
            sumsq = tl.zeros([BLOCK_T], ACC)
            for d0 in range(0, D, BLOCK_D):
                cols = d0 + dd
                c_ok = cols < D
                x = tl.load(x_ptr + rows[:, None] * D + cols[None, :], mask=mine[:, None] & c_ok[None, :], other=0.)
                if HAS_NORM:
                    xf = x.to(ACC)
                    sumsq += tl.sum(xf * xf, axis=1)
                    g = tl.load(g_ptr + cols, mask=c_ok, other=0.).to(ACC)
                    a = cast(xf * g[None, :], x.dtype)
                else:
                    a = x
                w_off = e * D * R + cols[:, None] * R + rr[None, :]
                w_ok = c_ok[:, None] & r_ok[None, :]
                acc_d += dot(a, tl.load(wd_ptr + w_off, mask=w_ok, other=0.), UPCAST, IEEE)
                acc_g += dot(a, tl.load(wg_ptr + w_off, mask=w_ok, other=0.), UPCAST, IEEE)
            rstd = rms_rstd(sumsq, D, eps, HAS_NORM)
            hd = acc_d * rstd[:, None]
            hg = acc_g * rstd[:, None]
            act = cast(hg * tl.sigmoid(hg) * hd, y_ptr.dtype.element_ty)
            for d0 in range(0, D, BLOCK_D):
                cols = d0 + dd
                c_ok = cols < D
                tile_ok = mine[:, None] & c_ok[None, :]
                n = tl.load(x_ptr + rows[:, None] * D + cols[None, :], mask=tile_ok, other=0.).to(ACC)
                if HAS_NORM:
                    n = n * rstd[:, None] * tl.load(g_ptr + cols, mask=c_ok, other=0.).to(ACC)[None, :]
                wu = tl.load(wu_ptr + e * R * D + rr[:, None] * D + cols[None, :], mask=r_ok[:, None] & c_ok[None, :],
                             other=0.)
                y = n + dot(act, wu, UPCAST, IEEE)
                tl.store(y_ptr + rows[:, None] * D + cols[None, :], cast(y, y_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _backward_tokens_kernel(dy_ptr, x_ptr, wd_ptr, wg_ptr, wu_ptr, ids_ptr, g_ptr,
                            dx_ptr, act_ptr, dhd_ptr, dhg_ptr, rstd_ptr, T, D, R, E, eps,
                            HAS_IDS: tl.constexpr, HAS_NORM: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr,
                            IEEE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                            BLOCK_R: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R
    dd = tl.arange(0, BLOCK_D)
    ids, lo, hi = _expert_range(ids_ptr, rows, row_ok, E, HAS_IDS)
    for e in range(lo, hi + 1):
        mine = row_ok & (ids == e)
        if tl.max(mine.to(tl.int32)) > 0:
            acc_d = tl.zeros([BLOCK_T, BLOCK_R], ACC)
            acc_g = tl.zeros([BLOCK_T, BLOCK_R], ACC)
            d_act = tl.zeros([BLOCK_T, BLOCK_R], ACC)
            sumsq = tl.zeros([BLOCK_T], ACC)
            dy_gx = tl.zeros([BLOCK_T], ACC)
            for d0 in range(0, D, BLOCK_D):
                cols = d0 + dd
                c_ok = cols < D
                tile = rows[:, None] * D + cols[None, :]
                tile_ok = mine[:, None] & c_ok[None, :]
                x = tl.load(x_ptr + tile, mask=tile_ok, other=0.)
                dy = tl.load(dy_ptr + tile, mask=tile_ok, other=0.)
                if HAS_NORM:
                    xf = x.to(ACC)
                    g = tl.load(g_ptr + cols, mask=c_ok, other=0.).to(ACC)
                    xg = xf * g[None, :]
                    sumsq += tl.sum(xf * xf, axis=1)
                    dy_gx += tl.sum(dy.to(ACC) * xg, axis=1)
                    a = cast(xg, x.dtype)
                else:
                    a = x
                w_off = e * D * R + cols[:, None] * R + rr[None, :]
                w_ok = c_ok[:, None] & r_ok[None, :]
                acc_d += dot(a, tl.load(wd_ptr + w_off, mask=w_ok, other=0.), UPCAST, IEEE)
                acc_g += dot(a, tl.load(wg_ptr + w_off, mask=w_ok, other=0.), UPCAST, IEEE)
                # W_up[e] read transposed: [BLOCK_D, BLOCK_R] from the [r, D] matrix.
                wu_t = tl.load(wu_ptr + e * R * D + rr[None, :] * D + cols[:, None], mask=w_ok, other=0.)
                d_act += dot(dy, wu_t, UPCAST, IEEE)
            rstd = rms_rstd(sumsq, D, eps, HAS_NORM)
            hd = acc_d * rstd[:, None]
            hg = acc_g * rstd[:, None]
            sig = tl.sigmoid(hg)
            silu = hg * sig
            d_hd = d_act * silu
            d_hg = d_act * hd * sig * (1.0 + hg * (1.0 - sig))
            small = rows[:, None] * R + rr[None, :]
            small_ok = mine[:, None] & r_ok[None, :]
            tl.store(act_ptr + small, silu * hd, mask=small_ok)
            tl.store(dhd_ptr + small, d_hd, mask=small_ok)
            tl.store(dhg_ptr + small, d_hg, mask=small_ok)
            tl.store(rstd_ptr + rows, rstd, mask=mine)
            # sum_d(dn * g * x) / D, from sums already at hand (see the module docstring).
            mean_dn_gx = (dy_gx + tl.sum(d_hd * acc_d, axis=1) + tl.sum(d_hg * acc_g, axis=1)) / D
            d_hd_op = cast(d_hd, dx_ptr.dtype.element_ty)
            d_hg_op = cast(d_hg, dx_ptr.dtype.element_ty)
            for d0 in range(0, D, BLOCK_D):
                cols = d0 + dd
                c_ok = cols < D
                tile = rows[:, None] * D + cols[None, :]
                tile_ok = mine[:, None] & c_ok[None, :]
                # W_down[e], W_gate[e] read transposed: [BLOCK_R, BLOCK_D].
                w_off_t = e * D * R + cols[None, :] * R + rr[:, None]
                w_ok_t = r_ok[:, None] & c_ok[None, :]
                dn = tl.load(dy_ptr + tile, mask=tile_ok, other=0.).to(ACC)
                dn += dot(d_hd_op, tl.load(wd_ptr + w_off_t, mask=w_ok_t, other=0.), UPCAST, IEEE)
                dn += dot(d_hg_op, tl.load(wg_ptr + w_off_t, mask=w_ok_t, other=0.), UPCAST, IEEE)
                if HAS_NORM:
                    xf = tl.load(x_ptr + tile, mask=tile_ok, other=0.).to(ACC)
                    g = tl.load(g_ptr + cols, mask=c_ok, other=0.).to(ACC)
                    dx = rstd[:, None] * (dn * g[None, :]) - xf * (rstd * rstd * rstd * mean_dn_gx)[:, None]
                else:
                    dx = dn
                tl.store(dx_ptr + tile, cast(dx, dx_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _backward_weights_kernel(dy_ptr, x_ptr, wd_ptr, wg_ptr, ids_ptr, g_ptr, act_ptr, dhd_ptr, dhg_ptr, rstd_ptr,
                             dwd_ptr, dwg_ptr, dwu_ptr, dg_ptr, T, D, R, E, tiles_per_split,
                             HAS_IDS: tl.constexpr, HAS_NORM: tl.constexpr, ACC: tl.constexpr,
                             UPCAST: tl.constexpr, IEEE: tl.constexpr, BLOCK_T: tl.constexpr,
                             BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    pid_d = tl.program_id(0)
    e = tl.program_id(1)
    split = tl.program_id(2)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    c_ok = cols < D
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R
    dtype = dy_ptr.dtype.element_ty
    acc_wu = tl.zeros([BLOCK_R, BLOCK_D], ACC)
    acc_wd = tl.zeros([BLOCK_D, BLOCK_R], ACC)
    acc_wg = tl.zeros([BLOCK_D, BLOCK_R], ACC)
    acc_g = tl.zeros([BLOCK_D], ACC)
    if HAS_NORM:
        g = tl.load(g_ptr + cols, mask=c_ok, other=0.).to(ACC)
        w_off_t = e * D * R + cols[None, :] * R + rr[:, None]
        w_ok_t = r_ok[:, None] & c_ok[None, :]
        wd_t = tl.load(wd_ptr + w_off_t, mask=w_ok_t, other=0.)
        wg_t = tl.load(wg_ptr + w_off_t, mask=w_ok_t, other=0.)
    first_tile = split * tiles_per_split
    for tile_idx in range(first_tile, first_tile + tiles_per_split):
        rows = tile_idx * BLOCK_T + tl.arange(0, BLOCK_T)
        row_ok = rows < T
        if HAS_IDS:
            mine = row_ok & (tl.load(ids_ptr + rows, mask=row_ok, other=-1) == e)
        else:
            mine = row_ok
        if tl.max(mine.to(tl.int32)) > 0:
            tile = rows[:, None] * D + cols[None, :]
            tile_ok = mine[:, None] & c_ok[None, :]
            small = rows[:, None] * R + rr[None, :]
            small_ok = mine[:, None] & r_ok[None, :]
            dy = tl.load(dy_ptr + tile, mask=tile_ok, other=0.)
            x = tl.load(x_ptr + tile, mask=tile_ok, other=0.)
            act = cast(tl.load(act_ptr + small, mask=small_ok, other=0.), dtype)
            d_hd = cast(tl.load(dhd_ptr + small, mask=small_ok, other=0.), dtype)
            d_hg = cast(tl.load(dhg_ptr + small, mask=small_ok, other=0.), dtype)
            if HAS_NORM:
                rstd = tl.load(rstd_ptr + rows, mask=mine, other=0.)
                xr = x.to(ACC) * rstd[:, None]
                n = cast(xr * g[None, :], dtype)
            else:
                n = x
            acc_wu += dot(tl.trans(act), dy, UPCAST, IEEE)
            acc_wd += dot(tl.trans(n), d_hd, UPCAST, IEEE)
            acc_wg += dot(tl.trans(n), d_hg, UPCAST, IEEE)
            if HAS_NORM:
                dn = dy.to(ACC) + dot(d_hd, wd_t, UPCAST, IEEE) + dot(d_hg, wg_t, UPCAST, IEEE)
                acc_g += tl.sum(dn * xr, axis=0)
    # Partial sums per token split: [split, E, ...], reduced in a fixed order by the launcher.
    base = split * E + e
    tl.store(dwu_ptr + base * R * D + rr[:, None] * D + cols[None, :], acc_wu, mask=r_ok[:, None] & c_ok[None, :])
    w_off = base * D * R + cols[:, None] * R + rr[None, :]
    tl.store(dwd_ptr + w_off, acc_wd, mask=c_ok[:, None] & r_ok[None, :])
    tl.store(dwg_ptr + w_off, acc_wg, mask=c_ok[:, None] & r_ok[None, :])
    if HAS_NORM:
        tl.store(dg_ptr + base * D + cols, acc_g, mask=c_ok)


def _common_args(x, w_down, expert_ids, norm_weight):
    tokens, hidden = x.shape
    num_experts, _, rank = w_down.shape
    flags = dict(HAS_IDS=expert_ids is not None, HAS_NORM=norm_weight is not None,
                 ACC=accumulator_dtype(x.dtype), UPCAST=INTERPRET and x.dtype in (torch.float16, torch.bfloat16),
                 IEEE=mma_precision(x.dtype), BLOCK_R=pow2_at_least_16(rank))
    # Unused pointer arguments still need a tensor; x stands in for absent optional inputs.
    ids = expert_ids if expert_ids is not None else x
    g = norm_weight if norm_weight is not None else x
    return tokens, hidden, num_experts, rank, ids, g, flags


def forward(x, w_down, w_gate, w_up, expert_ids, norm_weight, eps):
    check_dtype("routed_glu_adapter", x.dtype, x.device)
    check_index_range("routed_glu_adapter", x)
    tokens, hidden, num_experts, rank, ids, g, flags = _common_args(x, w_down, expert_ids, norm_weight)
    y = torch.empty_like(x)
    if tokens == 0:
        return y
    block_t, block_d, warps = token_blocks(hidden, x.dtype)
    _forward_kernel[(triton.cdiv(tokens, block_t),)](
        x, w_down, w_gate, w_up, ids, g, y, tokens, hidden, rank, num_experts, eps,
        BLOCK_T=block_t, BLOCK_D=block_d, num_warps=warps, **flags)
    return y


def backward(grad_y, x, w_down, w_gate, w_up, expert_ids, norm_weight, eps):
    check_dtype("routed_glu_adapter", x.dtype, x.device)
    check_index_range("routed_glu_adapter", x)
    tokens, hidden, num_experts, rank, ids, g, flags = _common_args(x, w_down, expert_ids, norm_weight)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    block_t, block_d, warps = token_blocks(hidden, x.dtype)
    dx = torch.empty_like(x)
    act, d_hd, d_hg = (torch.empty(tokens, rank, device=x.device, dtype=acc) for _ in range(3))
    rstd = torch.empty(tokens, device=x.device, dtype=acc)
    tiles = triton.cdiv(tokens, block_t)
    if tokens:
        _backward_tokens_kernel[(tiles,)](
            grad_y, x, w_down, w_gate, w_up, ids, g, dx, act, d_hd, d_hg, rstd, tokens, hidden, rank, num_experts,
            eps, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=warps, **flags)
    d_chunks = triton.cdiv(hidden, block_d)
    splits = token_splits(x.device, d_chunks, num_experts, max(tiles, 1))
    dwd = torch.empty(splits, num_experts, hidden, rank, device=x.device, dtype=acc)
    dwg = torch.empty_like(dwd)
    dwu = torch.empty(splits, num_experts, rank, hidden, device=x.device, dtype=acc)
    dg = torch.empty(splits, num_experts, hidden, device=x.device, dtype=acc) if norm_weight is not None else dwd
    _backward_weights_kernel[(d_chunks, num_experts, splits)](
        grad_y, x, w_down, w_gate, ids, g, act, d_hd, d_hg, rstd, dwd, dwg, dwu, dg, tokens, hidden, rank,
        num_experts, triton.cdiv(tiles, splits), BLOCK_T=block_t, BLOCK_D=block_d, num_warps=warps, **flags)
    dnorm = dg.sum(dim=(0, 1)).to(x.dtype) if norm_weight is not None else None
    return dx, dwd.sum(0).to(x.dtype), dwg.sum(0).to(x.dtype), dwu.sum(0).to(x.dtype), dnorm
