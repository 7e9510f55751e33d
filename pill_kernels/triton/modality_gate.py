"""Triton forward and backward of PILL's modality attention gate (MAG) on values.

    gate = tanh(x W_gate) [T, Hg];   v_out[t, h, :] = v[t, h, :] * (gate[t, h] if image[t] else 1)

Forward: one launch over token tiles. Tiles without image tokens only copy v (x and W_gate are not read);
tiles with image tokens reduce x W_gate over D for their image rows, then scale each head's values.

Backward: two launches, no atomics (deterministic). The token kernel writes dv, dx = dlogit W_gate^T and
dlogit = (sum_k dv_out * v) * (1 - gate^2) (T x Hg, small); the weight kernel reduces
dW_gate = x^T dlogit per D chunk over the tiles that hold image tokens.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (INTERPRET, accumulator_dtype, cast, check_dtype, check_index_range, dot, mma_precision,
                      pow2_at_least_16, tanh, token_splits)


def _blocks(hidden: int, head_dim: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_D, num_warps); the value tile of one head is BLOCK_T x head_dim. Not yet tuned on a GPU."""
    if INTERPRET:
        return 16, 32, 1
    return 32, 64, 4


@triton.jit
def _gate_logits(x_ptr, wg_ptr, rows, image, D, H, ACC: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                 BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr):
    hh = tl.arange(0, BLOCK_H)
    dd = tl.arange(0, BLOCK_D)
    logits = tl.zeros([BLOCK_T, BLOCK_H], ACC)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + dd
        c_ok = cols < D
        x = tl.load(x_ptr + rows[:, None] * D + cols[None, :], mask=image[:, None] & c_ok[None, :], other=0.)
        w = tl.load(wg_ptr + cols[:, None] * H + hh[None, :], mask=c_ok[:, None] & (hh < H)[None, :], other=0.)
        logits += dot(x, w, UPCAST, IEEE)
    return logits


@triton.jit
def _forward_kernel(x_ptr, wg_ptr, v_ptr, mask_ptr, out_ptr, T, D, H, HD,
                    ACC: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, BLOCK_T: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HD: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    image = (tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0) & row_ok
    hh = tl.arange(0, BLOCK_H)
    kk = tl.arange(0, BLOCK_HD)
    k_ok = kk < HD
    any_image = tl.max(image.to(tl.int32)) > 0
    multiplier = tl.full([BLOCK_T, BLOCK_H], 1.0, ACC)
    if any_image:
        gate = tanh(_gate_logits(x_ptr, wg_ptr, rows, image, D, H, ACC, UPCAST, IEEE, BLOCK_T, BLOCK_D, BLOCK_H))
        multiplier = tl.where(image[:, None], gate, multiplier)
    for h in range(H):
        m_h = tl.sum(tl.where(hh[None, :] == h, multiplier, 0.), axis=1)
        off = rows[:, None] * H * HD + h * HD + kk[None, :]
        ok = row_ok[:, None] & k_ok[None, :]
        v = tl.load(v_ptr + off, mask=ok, other=0.)
        if any_image:
            v = cast(v.to(ACC) * m_h[:, None], out_ptr.dtype.element_ty)
        tl.store(out_ptr + off, v, mask=ok)


@triton.jit
def _backward_tokens_kernel(dout_ptr, x_ptr, wg_ptr, v_ptr, mask_ptr, dx_ptr, dv_ptr, dlogit_ptr, T, D, H, HD,
                            ACC: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, BLOCK_T: tl.constexpr,
                            BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HD: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    image = (tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0) & row_ok
    hh = tl.arange(0, BLOCK_H)
    kk = tl.arange(0, BLOCK_HD)
    k_ok = kk < HD
    dd = tl.arange(0, BLOCK_D)
    dtype = dx_ptr.dtype.element_ty
    any_image = tl.max(image.to(tl.int32)) > 0
    gate = tl.zeros([BLOCK_T, BLOCK_H], ACC)
    if any_image:
        gate = tanh(_gate_logits(x_ptr, wg_ptr, rows, image, D, H, ACC, UPCAST, IEEE, BLOCK_T, BLOCK_D, BLOCK_H))
    multiplier = tl.where(image[:, None], gate, 1.0)
    dgate = tl.zeros([BLOCK_T, BLOCK_H], ACC)
    for h in range(H):
        m_h = tl.sum(tl.where(hh[None, :] == h, multiplier, 0.), axis=1)
        off = rows[:, None] * H * HD + h * HD + kk[None, :]
        ok = row_ok[:, None] & k_ok[None, :]
        dout = tl.load(dout_ptr + off, mask=ok, other=0.).to(ACC)
        tl.store(dv_ptr + off, cast(dout * m_h[:, None], dtype), mask=ok)
        if any_image:
            v = tl.load(v_ptr + off, mask=ok & image[:, None], other=0.).to(ACC)
            dgate = tl.where(hh[None, :] == h, tl.sum(dout * v, axis=1)[:, None], dgate)
    dlogit = tl.where(image[:, None], dgate * (1.0 - gate * gate), 0.)
    tl.store(dlogit_ptr + rows[:, None] * H + hh[None, :], dlogit, mask=row_ok[:, None] & (hh < H)[None, :])
    dlogit_op = cast(dlogit, dtype)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + dd
        c_ok = cols < D
        if any_image:
            w_t = tl.load(wg_ptr + cols[None, :] * H + hh[:, None], mask=(hh < H)[:, None] & c_ok[None, :], other=0.)
            dx = dot(dlogit_op, w_t, UPCAST, IEEE)
        else:
            dx = tl.zeros([BLOCK_T, BLOCK_D], ACC)
        tl.store(dx_ptr + rows[:, None] * D + cols[None, :], cast(dx, dtype), mask=row_ok[:, None] & c_ok[None, :])


@triton.jit
def _backward_weights_kernel(x_ptr, mask_ptr, dlogit_ptr, dwg_ptr, T, D, H, tiles_per_split,
                             ACC: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, BLOCK_T: tl.constexpr,
                             BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr):
    pid_d = tl.program_id(0)
    split = tl.program_id(1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    c_ok = cols < D
    hh = tl.arange(0, BLOCK_H)
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_D, BLOCK_H], ACC)
    first_tile = split * tiles_per_split
    for tile_idx in range(first_tile, first_tile + tiles_per_split):
        rows = tile_idx * BLOCK_T + tl.arange(0, BLOCK_T)
        row_ok = rows < T
        image = (tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0) & row_ok
        if tl.max(image.to(tl.int32)) > 0:
            x = tl.load(x_ptr + rows[:, None] * D + cols[None, :], mask=image[:, None] & c_ok[None, :], other=0.)
            dlogit = tl.load(dlogit_ptr + rows[:, None] * H + hh[None, :], mask=image[:, None] & (hh < H)[None, :],
                             other=0.)
            acc += dot(tl.trans(x), cast(dlogit, dtype), UPCAST, IEEE)
    tl.store(dwg_ptr + split * D * H + cols[:, None] * H + hh[None, :], acc, mask=c_ok[:, None] & (hh < H)[None, :])


def _flags(x, heads, head_dim):
    return dict(ACC=accumulator_dtype(x.dtype), UPCAST=INTERPRET and x.dtype in (torch.float16, torch.bfloat16),
                IEEE=mma_precision(x.dtype), BLOCK_H=pow2_at_least_16(heads),
                BLOCK_HD=triton.next_power_of_2(head_dim))


def forward(x, w_gate, v, image_mask):
    check_dtype("modality_gate", x.dtype, x.device)
    check_index_range("modality_gate", x, v)
    tokens, hidden = x.shape
    _, heads, head_dim = v.shape
    out = torch.empty_like(v)
    if tokens == 0:
        return out
    block_t, block_d, warps = _blocks(hidden, head_dim)
    _forward_kernel[(triton.cdiv(tokens, block_t),)](
        x, w_gate, v, image_mask, out, tokens, hidden, heads, head_dim, BLOCK_T=block_t, BLOCK_D=block_d,
        num_warps=warps, **_flags(x, heads, head_dim))
    return out


def backward(grad_out, x, w_gate, v, image_mask):
    check_dtype("modality_gate", x.dtype, x.device)
    check_index_range("modality_gate", x, v)
    tokens, hidden = x.shape
    _, heads, head_dim = v.shape
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    flags = _flags(x, heads, head_dim)
    block_t, block_d, warps = _blocks(hidden, head_dim)
    dx, dv = torch.empty_like(x), torch.empty_like(v)
    dlogit = torch.empty(tokens, heads, device=x.device, dtype=acc)
    tiles = triton.cdiv(tokens, block_t)
    if tokens:
        _backward_tokens_kernel[(tiles,)](
            grad_out, x, w_gate, v, image_mask, dx, dv, dlogit, tokens, hidden, heads, head_dim, BLOCK_T=block_t,
            BLOCK_D=block_d, num_warps=warps, **flags)
    d_chunks = triton.cdiv(hidden, block_d)
    splits = token_splits(x.device, d_chunks, 1, max(tiles, 1))
    dwg = torch.empty(splits, hidden, heads, device=x.device, dtype=acc)
    flags.pop("BLOCK_HD")
    _backward_weights_kernel[(d_chunks, splits)](
        x, image_mask, dlogit, dwg, tokens, hidden, heads, triton.cdiv(tiles, splits), BLOCK_T=block_t,
        BLOCK_D=block_d, num_warps=warps, **flags)
    return dx, dwg.sum(0).to(x.dtype), dv
