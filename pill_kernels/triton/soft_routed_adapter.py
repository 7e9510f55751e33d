"""Triton forward and backward of LaVIN's soft-routed adapter (RepAdapter router, mixture of modality adapters).

    z = (n W_down + b_down) * dropout_mask,   y = n + scale * sum_e w[t, e] (z W_up[e] + b_up[e])

with n = RMSNorm(x; g) or x. Every token goes through every up-expert (the routing is soft), so there is no
tile-level skipping as in the hard-routed op.

Forward: one launch over token tiles; a first pass over D accumulates (x*g) W_down and the sum of squares
(rstd applied after the reduction), a second writes n + the mixed experts.

Backward: two launches, no atomics (deterministic).
- `_backward_tokens_kernel` (token tiles): pass 1 recomputes the down projection and accumulates
  dz = scale * sum_e w_e (dy W_up[e]^T); pass 2 writes dx (the RMSNorm backward's sum_d(dn*g*x) is
  sum_d(dy*g*x) + dpre . ((x*g) W_down), known after pass 1) and the routing-weight gradients
  dw[t, e] = scale * dy . (z W_up[e] + b_up[e]). z, dpre (T x r) and rstd go to the weight kernel.
- `_backward_weights_kernel` (D chunks x token splits): all weight, bias and norm gradients. The E up-experts
  are handled as one stacked [E*r, D] matrix: the operand scale * w[t, e] * z[t, j] is gathered straight from
  z and w, so one MMA covers every expert.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (INTERPRET, accumulator_dtype, cast, check_dtype, check_index_range, dot, mma_precision,
                      pow2_at_least_16, rms_rstd, token_blocks, token_splits)


@triton.jit
def _forward_kernel(x_ptr, wd_ptr, bd_ptr, wu_ptr, bu_ptr, w_ptr, mask_ptr, g_ptr, y_ptr, T, D, R, E, eps, scale,
                    HAS_MASK: tl.constexpr, HAS_NORM: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr,
                    IEEE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R
    dd = tl.arange(0, BLOCK_D)
    dtype = y_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_T, BLOCK_R], ACC)
    sumsq = tl.zeros([BLOCK_T], ACC)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + dd
        c_ok = cols < D
        x = tl.load(x_ptr + rows[:, None] * D + cols[None, :], mask=row_ok[:, None] & c_ok[None, :], other=0.)
        if HAS_NORM:
            xf = x.to(ACC)
            sumsq += tl.sum(xf * xf, axis=1)
            a = cast(xf * tl.load(g_ptr + cols, mask=c_ok, other=0.).to(ACC)[None, :], dtype)
        else:
            a = x
        acc += dot(a, tl.load(wd_ptr + cols[:, None] * R + rr[None, :], mask=c_ok[:, None] & r_ok[None, :], other=0.),
                   UPCAST, IEEE)
    rstd = rms_rstd(sumsq, D, eps, HAS_NORM)
    small = rows[:, None] * R + rr[None, :]
    small_ok = row_ok[:, None] & r_ok[None, :]
    z = acc * rstd[:, None] + tl.load(bd_ptr + rr, mask=r_ok, other=0.).to(ACC)[None, :]
    if HAS_MASK:
        z = z * tl.load(mask_ptr + small, mask=small_ok, other=0.).to(ACC)
    z = cast(z, dtype)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + dd
        c_ok = cols < D
        tile_ok = row_ok[:, None] & c_ok[None, :]
        n = tl.load(x_ptr + rows[:, None] * D + cols[None, :], mask=tile_ok, other=0.).to(ACC)
        if HAS_NORM:
            n = n * rstd[:, None] * tl.load(g_ptr + cols, mask=c_ok, other=0.).to(ACC)[None, :]
        mixed = tl.zeros([BLOCK_T, BLOCK_D], ACC)
        for e in range(E):
            wu = tl.load(wu_ptr + e * R * D + rr[:, None] * D + cols[None, :], mask=r_ok[:, None] & c_ok[None, :],
                         other=0.)
            bu = tl.load(bu_ptr + e * D + cols, mask=c_ok, other=0.).to(ACC)
            w_e = tl.load(w_ptr + rows * E + e, mask=row_ok, other=0.).to(ACC)
            mixed += w_e[:, None] * (dot(z, wu, UPCAST, IEEE) + bu[None, :])
        y = n + scale * mixed
        tl.store(y_ptr + rows[:, None] * D + cols[None, :], cast(y, dtype), mask=tile_ok)


@triton.jit
def _backward_tokens_kernel(dy_ptr, x_ptr, wd_ptr, bd_ptr, wu_ptr, bu_ptr, w_ptr, mask_ptr, g_ptr,
                            dx_ptr, dw_ptr, z_ptr, dpre_ptr, rstd_ptr, T, D, R, E, eps, scale,
                            HAS_MASK: tl.constexpr, HAS_NORM: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr,
                            IEEE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R
    dd = tl.arange(0, BLOCK_D)
    ee = tl.arange(0, BLOCK_E)
    dtype = dx_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_T, BLOCK_R], ACC)
    dz = tl.zeros([BLOCK_T, BLOCK_R], ACC)
    sumsq = tl.zeros([BLOCK_T], ACC)
    dy_gx = tl.zeros([BLOCK_T], ACC)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + dd
        c_ok = cols < D
        tile = rows[:, None] * D + cols[None, :]
        tile_ok = row_ok[:, None] & c_ok[None, :]
        x = tl.load(x_ptr + tile, mask=tile_ok, other=0.)
        dy = tl.load(dy_ptr + tile, mask=tile_ok, other=0.)
        if HAS_NORM:
            xf = x.to(ACC)
            xg = xf * tl.load(g_ptr + cols, mask=c_ok, other=0.).to(ACC)[None, :]
            sumsq += tl.sum(xf * xf, axis=1)
            dy_gx += tl.sum(dy.to(ACC) * xg, axis=1)
            a = cast(xg, dtype)
        else:
            a = x
        w_ok = c_ok[:, None] & r_ok[None, :]
        acc += dot(a, tl.load(wd_ptr + cols[:, None] * R + rr[None, :], mask=w_ok, other=0.), UPCAST, IEEE)
        for e in range(E):
            # W_up[e] read transposed: [BLOCK_D, BLOCK_R] from the [r, D] matrix.
            wu_t = tl.load(wu_ptr + e * R * D + rr[None, :] * D + cols[:, None], mask=w_ok, other=0.)
            w_e = tl.load(w_ptr + rows * E + e, mask=row_ok, other=0.).to(ACC)
            dz += w_e[:, None] * dot(dy, wu_t, UPCAST, IEEE)
    rstd = rms_rstd(sumsq, D, eps, HAS_NORM)
    small = rows[:, None] * R + rr[None, :]
    small_ok = row_ok[:, None] & r_ok[None, :]
    z = acc * rstd[:, None] + tl.load(bd_ptr + rr, mask=r_ok, other=0.).to(ACC)[None, :]
    dpre = dz * scale
    if HAS_MASK:
        keep = tl.load(mask_ptr + small, mask=small_ok, other=0.).to(ACC)
        z = z * keep
        dpre = dpre * keep
    tl.store(z_ptr + small, z, mask=small_ok)
    tl.store(dpre_ptr + small, dpre, mask=small_ok)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)
    mean_dn_gx = (dy_gx + tl.sum(dpre * acc, axis=1)) / D
    z_op = cast(z, dtype)
    dpre_op = cast(dpre, dtype)
    dw = tl.zeros([BLOCK_T, BLOCK_E], ACC)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + dd
        c_ok = cols < D
        tile = rows[:, None] * D + cols[None, :]
        tile_ok = row_ok[:, None] & c_ok[None, :]
        dy = tl.load(dy_ptr + tile, mask=tile_ok, other=0.).to(ACC)
        wd_t = tl.load(wd_ptr + cols[None, :] * R + rr[:, None], mask=r_ok[:, None] & c_ok[None, :], other=0.)
        dn = dy + dot(dpre_op, wd_t, UPCAST, IEEE)
        if HAS_NORM:
            xf = tl.load(x_ptr + tile, mask=tile_ok, other=0.).to(ACC)
            g = tl.load(g_ptr + cols, mask=c_ok, other=0.).to(ACC)
            dx = rstd[:, None] * (dn * g[None, :]) - xf * (rstd * rstd * rstd * mean_dn_gx)[:, None]
        else:
            dx = dn
        tl.store(dx_ptr + tile, cast(dx, dtype), mask=tile_ok)
        for e in range(E):
            wu = tl.load(wu_ptr + e * R * D + rr[:, None] * D + cols[None, :], mask=r_ok[:, None] & c_ok[None, :],
                         other=0.)
            bu = tl.load(bu_ptr + e * D + cols, mask=c_ok, other=0.).to(ACC)
            out_e = dot(z_op, wu, UPCAST, IEEE) + bu[None, :]
            dw = tl.where(ee[None, :] == e, dw + tl.sum(dy * out_e, axis=1)[:, None], dw)
    tl.store(dw_ptr + rows[:, None] * E + ee[None, :], cast(dw * scale, dtype),
             mask=row_ok[:, None] & (ee < E)[None, :])


@triton.jit
def _backward_weights_kernel(dy_ptr, x_ptr, wd_ptr, w_ptr, g_ptr, z_ptr, dpre_ptr, rstd_ptr,
                             dwd_ptr, dbd_ptr, dwu_ptr, dbu_ptr, dg_ptr, T, D, R, E, scale, tiles_per_split,
                             HAS_NORM: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                             BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
                             BLOCK_E: tl.constexpr, BLOCK_E16: tl.constexpr):
    pid_d = tl.program_id(0)
    split = tl.program_id(1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    c_ok = cols < D
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R
    # Expert index padded to 16 rows so that the up-bias gradient is an MMA rather than a 3D broadcast.
    ee = tl.arange(0, BLOCK_E16)
    # Stacked expert index c = e * BLOCK_R + j over the E up-projections.
    cc = tl.arange(0, BLOCK_E * BLOCK_R)
    c_e = cc // BLOCK_R
    c_j = cc % BLOCK_R
    c_valid = (c_e < E) & (c_j < R)
    dtype = dy_ptr.dtype.element_ty
    acc_wu = tl.zeros([BLOCK_E * BLOCK_R, BLOCK_D], ACC)
    acc_bu = tl.zeros([BLOCK_E16, BLOCK_D], ACC)
    acc_wd = tl.zeros([BLOCK_D, BLOCK_R], ACC)
    acc_bd = tl.zeros([BLOCK_R], ACC)
    acc_g = tl.zeros([BLOCK_D], ACC)
    wd_t = tl.load(wd_ptr + cols[None, :] * R + rr[:, None], mask=r_ok[:, None] & c_ok[None, :], other=0.)
    if HAS_NORM:
        g = tl.load(g_ptr + cols, mask=c_ok, other=0.).to(ACC)
    first_tile = split * tiles_per_split
    for tile_idx in range(first_tile, first_tile + tiles_per_split):
        rows = tile_idx * BLOCK_T + tl.arange(0, BLOCK_T)
        row_ok = rows < T
        tile = rows[:, None] * D + cols[None, :]
        tile_ok = row_ok[:, None] & c_ok[None, :]
        small = rows[:, None] * R + rr[None, :]
        small_ok = row_ok[:, None] & r_ok[None, :]
        dy = tl.load(dy_ptr + tile, mask=tile_ok, other=0.)
        x = tl.load(x_ptr + tile, mask=tile_ok, other=0.)
        dpre = tl.load(dpre_ptr + small, mask=small_ok, other=0.)
        stacked_ok = row_ok[:, None] & c_valid[None, :]
        z_stacked = tl.load(z_ptr + rows[:, None] * R + c_j[None, :], mask=stacked_ok, other=0.)
        w_stacked = tl.load(w_ptr + rows[:, None] * E + c_e[None, :], mask=stacked_ok, other=0.).to(ACC)
        acc_wu += dot(tl.trans(cast(scale * w_stacked * z_stacked, dtype)), dy, UPCAST, IEEE)
        w = tl.load(w_ptr + rows[:, None] * E + ee[None, :], mask=row_ok[:, None] & (ee < E)[None, :],
                    other=0.).to(ACC)
        acc_bu += dot(tl.trans(cast(scale * w, dtype)), dy, UPCAST, IEEE)
        acc_bd += tl.sum(dpre, axis=0)
        dpre_op = cast(dpre, dtype)
        if HAS_NORM:
            rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.)
            xr = x.to(ACC) * rstd[:, None]
            n = cast(xr * g[None, :], dtype)
            dn = dy.to(ACC) + dot(dpre_op, wd_t, UPCAST, IEEE)
            acc_g += tl.sum(dn * xr, axis=0)
        else:
            n = x
        acc_wd += dot(tl.trans(n), dpre_op, UPCAST, IEEE)
    # Partial sums per token split, reduced in a fixed order by the launcher.
    tl.store(dwu_ptr + split * E * R * D + c_e[:, None] * R * D + c_j[:, None] * D + cols[None, :], acc_wu,
             mask=c_valid[:, None] & c_ok[None, :])
    tl.store(dbu_ptr + split * E * D + ee[:, None] * D + cols[None, :], acc_bu,
             mask=(ee < E)[:, None] & c_ok[None, :])
    tl.store(dwd_ptr + split * D * R + cols[:, None] * R + rr[None, :], acc_wd, mask=c_ok[:, None] & r_ok[None, :])
    if HAS_NORM:
        tl.store(dg_ptr + split * D + cols, acc_g, mask=c_ok)
    if pid_d == 0:
        tl.store(dbd_ptr + split * R + rr, acc_bd, mask=r_ok)


def _flags(x, rank, dropout_mask, norm_weight):
    return dict(HAS_NORM=norm_weight is not None, ACC=accumulator_dtype(x.dtype),
                UPCAST=INTERPRET and x.dtype in (torch.float16, torch.bfloat16), IEEE=mma_precision(x.dtype),
                BLOCK_R=pow2_at_least_16(rank))


def forward(x, w_down, b_down, w_up, b_up, routing_weights, dropout_mask, norm_weight, eps, scale):
    check_dtype("soft_routed_adapter", x.dtype, x.device)
    check_index_range("soft_routed_adapter", x)
    tokens, hidden = x.shape
    num_experts, rank, _ = w_up.shape
    y = torch.empty_like(x)
    if tokens == 0:
        return y
    block_t, block_d, warps = token_blocks(hidden, x.dtype)
    _forward_kernel[(triton.cdiv(tokens, block_t),)](
        x, w_down, b_down, w_up, b_up, routing_weights, dropout_mask if dropout_mask is not None else x,
        norm_weight if norm_weight is not None else x, y, tokens, hidden, rank, num_experts, eps, scale,
        HAS_MASK=dropout_mask is not None, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=warps,
        **_flags(x, rank, dropout_mask, norm_weight))
    return y


def backward(grad_y, x, w_down, b_down, w_up, b_up, routing_weights, dropout_mask, norm_weight, eps, scale):
    check_dtype("soft_routed_adapter", x.dtype, x.device)
    check_index_range("soft_routed_adapter", x)
    tokens, hidden = x.shape
    num_experts, rank, _ = w_up.shape
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    flags = _flags(x, rank, dropout_mask, norm_weight)
    block_e = triton.next_power_of_2(num_experts)
    block_t, block_d, warps = token_blocks(hidden, x.dtype)
    g = norm_weight if norm_weight is not None else x
    dx = torch.empty_like(x)
    dw = torch.empty_like(routing_weights)
    z, dpre = (torch.empty(tokens, rank, device=x.device, dtype=acc) for _ in range(2))
    rstd = torch.empty(tokens, device=x.device, dtype=acc)
    tiles = triton.cdiv(tokens, block_t)
    if tokens:
        _backward_tokens_kernel[(tiles,)](
            grad_y, x, w_down, b_down, w_up, b_up, routing_weights, dropout_mask if dropout_mask is not None else x,
            g, dx, dw, z, dpre, rstd, tokens, hidden, rank, num_experts, eps, scale,
            HAS_MASK=dropout_mask is not None, BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_E=block_e, num_warps=warps,
            **flags)
    d_chunks = triton.cdiv(hidden, block_d)
    splits = token_splits(x.device, d_chunks, 1, max(tiles, 1))
    dwd = torch.empty(splits, hidden, rank, device=x.device, dtype=acc)
    dbd = torch.empty(splits, rank, device=x.device, dtype=acc)
    dwu = torch.empty(splits, num_experts, rank, hidden, device=x.device, dtype=acc)
    dbu = torch.empty(splits, num_experts, hidden, device=x.device, dtype=acc)
    dg = torch.empty(splits, hidden, device=x.device, dtype=acc) if norm_weight is not None else dbd
    _backward_weights_kernel[(d_chunks, splits)](
        grad_y, x, w_down, routing_weights, g, z, dpre, rstd, dwd, dbd, dwu, dbu, dg, tokens, hidden, rank,
        num_experts, scale, triton.cdiv(tiles, splits), BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_E=block_e,
        BLOCK_E16=pow2_at_least_16(num_experts), num_warps=warps, **flags)
    reduce = lambda t: t.sum(0).to(x.dtype)  # noqa: E731
    return (dx, reduce(dwd), reduce(dbd), reduce(dwu), reduce(dbu), dw,
            reduce(dg) if norm_weight is not None else None)
