"""BatchNorm kernels of the triton backend: partial statistics, finalize (Chan merge and
running statistics), the fused normalise + residual + ReLU pass, and the backward reduce
and apply passes.

Elementwise kernels walk the output in its own memory order (NHWC or NCHW, so stores are
contiguous) and read every input through its four logical strides, so inputs in another
layout, or non-contiguous, need no copy. Reductions work on tiles of (rows = pixels,
columns = channels) and write per-tile partials that are merged in a fixed order: no
atomics, results are deterministic. bn_finalize merges the (count, mean, M2) partials of
the training forward with a tree of fixed shape (``tl.reduce`` within a program, levels of
programs), so thousands of tiles per channel take a few parallel launches.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _config
from ._common import relu, to_storage

_BLOCK = 1024  # elements per program of the elementwise kernels (GPU)


def _block() -> int:
    return 256 if _config.interpreting() else _BLOCK


def _fix_bf16(dtype: torch.dtype) -> bool:
    return _config.interpreting() and dtype == torch.bfloat16


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@triton.jit
def _nchw_of(idx, C, H, W, OUT_CL: tl.constexpr):
    """Logical (n, c, h, w) of linear index ``idx`` in an NHWC (OUT_CL) or NCHW tensor."""
    HW = H * W
    if OUT_CL:
        c = idx % C
        pix = idx // C
        n = pix // HW
        hw = pix % HW
    else:
        hw = idx % HW
        nc = idx // HW
        c = nc % C
        n = nc // C
    return n, c, hw // W, hw % W


@triton.jit
def _bn_add_act_kernel(
    y_ptr, out_ptr, scale_ptr, shift_ptr, res_ptr, rscale_ptr, rshift_ptr, sample_ptr,
    total, C, H, W,
    syn, syc, syh, syw,
    srn, src, srh, srw,
    HAS_RES: tl.constexpr, DUAL: tl.constexpr, HAS_SAMPLE: tl.constexpr, RELU: tl.constexpr,
    OUT_CL: tl.constexpr, ACC64: tl.constexpr, FIX_BF16: tl.constexpr, BLOCK: tl.constexpr,
):
    acc_t = tl.float64 if ACC64 else tl.float32
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < total
    n, c, h, w = _nchw_of(idx, C, H, W, OUT_CL)
    y = tl.load(y_ptr + n * syn + c * syc + h * syh + w * syw, mask=mask, other=0.0).to(acc_t)
    z = y * tl.load(scale_ptr + c, mask=mask, other=0.0).to(acc_t) + tl.load(shift_ptr + c, mask=mask, other=0.0).to(acc_t)
    if HAS_SAMPLE:
        z = z * tl.load(sample_ptr + n, mask=mask, other=0.0).to(acc_t)
    if HAS_RES:
        r = tl.load(res_ptr + n * srn + c * src + h * srh + w * srw, mask=mask, other=0.0).to(acc_t)
        if DUAL:
            r = r * tl.load(rscale_ptr + c, mask=mask, other=0.0).to(acc_t) + tl.load(rshift_ptr + c, mask=mask, other=0.0).to(acc_t)
        z = z + r
    if RELU:
        z = relu(z)
    tl.store(out_ptr + idx, to_storage(z, out_ptr.dtype.element_ty, FIX_BF16), mask=mask)


@triton.jit
def _masked_grad(dout, y, scale, shift, out, sample, HAS_OUT: tl.constexpr, RELU: tl.constexpr,
                 HAS_SAMPLE: tl.constexpr):
    # g = dout where the ReLU was active (out > 0, or y*scale + shift > 0), times sample scale
    g = dout
    if RELU:
        if HAS_OUT:
            z = out
        else:
            z = y * scale + shift
        g = tl.where(z <= 0, 0.0, g)
    if HAS_SAMPLE:
        g = g * sample
    return g


@triton.jit
def _bn_bwd_apply_kernel(
    dout_ptr, y_ptr, out_ptr, add_ptr, gout_ptr, dy_ptr, scale_ptr, shift_ptr, sample_ptr, a_ptr, b_ptr, c_ptr,
    total, C, H, W,
    sdn, sdc, sdh, sdw,
    syn, syc, syh, syw,
    son, soc, soh, sow,
    san, sac, sah, saw,
    HAS_OUT: tl.constexpr, RELU: tl.constexpr, HAS_SAMPLE: tl.constexpr, HAS_ADD: tl.constexpr, HAS_GOUT: tl.constexpr,
    OUT_CL: tl.constexpr, ACC64: tl.constexpr, FIX_BF16: tl.constexpr, BLOCK: tl.constexpr,
):
    acc_t = tl.float64 if ACC64 else tl.float32
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < total
    n, c, h, w = _nchw_of(idx, C, H, W, OUT_CL)
    dout = tl.load(dout_ptr + n * sdn + c * sdc + h * sdh + w * sdw, mask=mask, other=0.0).to(acc_t)
    y = tl.load(y_ptr + n * syn + c * syc + h * syh + w * syw, mask=mask, other=0.0).to(acc_t)
    out = 0.0
    if HAS_OUT:
        out = tl.load(out_ptr + n * son + c * soc + h * soh + w * sow, mask=mask, other=0.0).to(acc_t)
    scale = tl.load(scale_ptr + c, mask=mask, other=0.0).to(acc_t)
    shift = tl.load(shift_ptr + c, mask=mask, other=0.0).to(acc_t)
    g = _masked_grad(dout, y, scale, shift, out, 1.0, HAS_OUT, RELU, False)
    if HAS_GOUT:  # the masked gradient before the sample scale: dout's values or zeros, exact
        tl.store(gout_ptr + idx, to_storage(g, gout_ptr.dtype.element_ty, FIX_BF16), mask=mask)
    if HAS_SAMPLE:
        g = g * tl.load(sample_ptr + n, mask=mask, other=0.0).to(acc_t)
    a = tl.load(a_ptr + c, mask=mask, other=0.0)
    b = tl.load(b_ptr + c, mask=mask, other=0.0)
    cc = tl.load(c_ptr + c, mask=mask, other=0.0)
    dy = g * a + y * b + cc
    if HAS_ADD:
        dy += tl.load(add_ptr + n * san + c * sac + h * sah + w * saw, mask=mask, other=0.0).to(acc_t)
    tl.store(dy_ptr + idx, to_storage(dy, dy_ptr.dtype.element_ty, FIX_BF16), mask=mask)


@triton.jit
def _act_grad_kernel(
    dout_ptr, out_ptr, dx_ptr, total, C, H, W,
    sdn, sdc, sdh, sdw,
    son, soc, soh, sow,
    OUT_CL: tl.constexpr, BLOCK: tl.constexpr,
):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < total
    n, c, h, w = _nchw_of(idx, C, H, W, OUT_CL)
    d = tl.load(dout_ptr + n * sdn + c * sdc + h * sdh + w * sdw, mask=mask, other=0.0)
    o = tl.load(out_ptr + n * son + c * soc + h * soh + w * sow, mask=mask, other=0.0)
    # compare in float32: 16-bit values are compared exactly, on every path
    tl.store(dx_ptr + idx, tl.where(o.to(tl.float32) <= 0, tl.zeros_like(d), d), mask=mask)


@triton.jit
def _tile_rows(rm, HW, W, sn, sh, sw):
    n = (rm // HW).to(tl.int64)
    hw = rm % HW
    return n * sn + (hw // W).to(tl.int64) * sh + (hw % W).to(tl.int64) * sw


@triton.jit
def _batch_stats_kernel(
    x_ptr, part_ptr, M, C, H, W, sxn, sxc, sxh, sxw,
    ACC64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    acc_t = tl.float64 if ACC64 else tl.float32
    pid_m = tl.program_id(0)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_m = rm < M
    mask_c = rc < C
    mask = mask_m[:, None] & mask_c[None, :]
    row = _tile_rows(rm, H * W, W, sxn, sxh, sxw)
    x = tl.load(x_ptr + row[:, None] + rc[None, :].to(tl.int64) * sxc, mask=mask, other=0.0).to(acc_t)
    cnt = tl.sum(mask_m.to(acc_t), axis=0)
    mean = tl.sum(x, axis=0) / cnt
    d = tl.where(mask, x - mean[None, :], 0.0)
    base = pid_m.to(tl.int64) * 3 * C
    tl.store(part_ptr + base + rc, tl.zeros_like(mean) + cnt, mask=mask_c)
    tl.store(part_ptr + base + C + rc, mean, mask=mask_c)
    tl.store(part_ptr + base + 2 * C + rc, tl.sum(d * d, axis=0), mask=mask_c)


@triton.jit
def _bn_bwd_reduce_kernel(
    dout_ptr, y_ptr, out_ptr, scale_ptr, shift_ptr, sample_ptr, mean_ptr, invstd_ptr, part_ptr,
    M, C, H, W,
    sdn, sdc, sdh, sdw,
    syn, syc, syh, syw,
    son, soc, soh, sow,
    HAS_OUT: tl.constexpr, RELU: tl.constexpr, HAS_SAMPLE: tl.constexpr,
    ACC64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    acc_t = tl.float64 if ACC64 else tl.float32
    pid_m = tl.program_id(0)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_m = rm < M
    mask_c = rc < C
    mask = mask_m[:, None] & mask_c[None, :]
    HW = H * W
    c64 = rc[None, :].to(tl.int64)
    dout = tl.load(dout_ptr + _tile_rows(rm, HW, W, sdn, sdh, sdw)[:, None] + c64 * sdc, mask=mask, other=0.0).to(acc_t)
    y = tl.load(y_ptr + _tile_rows(rm, HW, W, syn, syh, syw)[:, None] + c64 * syc, mask=mask, other=0.0).to(acc_t)
    out = 0.0
    if HAS_OUT:
        out = tl.load(out_ptr + _tile_rows(rm, HW, W, son, soh, sow)[:, None] + c64 * soc, mask=mask,
                      other=0.0).to(acc_t)
    scale = tl.load(scale_ptr + rc, mask=mask_c, other=0.0).to(acc_t)[None, :]
    shift = tl.load(shift_ptr + rc, mask=mask_c, other=0.0).to(acc_t)[None, :]
    sample = 1.0
    if HAS_SAMPLE:
        sample = tl.load(sample_ptr + rm // HW, mask=mask_m, other=0.0).to(acc_t)[:, None]
    g = _masked_grad(dout, y, scale, shift, out, sample, HAS_OUT, RELU, HAS_SAMPLE)
    g = tl.where(mask, g, 0.0)
    mean = tl.load(mean_ptr + rc, mask=mask_c, other=0.0).to(acc_t)
    invstd = tl.load(invstd_ptr + rc, mask=mask_c, other=0.0).to(acc_t)
    xhat = (y - mean[None, :]) * invstd[None, :]
    base = pid_m.to(tl.int64) * 2 * C
    tl.store(part_ptr + base + rc, tl.sum(g, axis=0), mask=mask_c)
    tl.store(part_ptr + base + C + rc, tl.sum(g * xhat, axis=0), mask=mask_c)


@triton.jit
def _chan_combine(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan et al.'s merge of two (count, mean, M2) statistics, in float64. The mean is a
    weighted sum rather than mean + delta*nb/n: the same in finite arithmetic, and +Inf stays
    +Inf when both sides average to +Inf (as a sum does). An empty side (count 0: padding
    of the tree) leaves the other unchanged, whichever side it is on."""
    tot = n_a + n_b
    safe = tl.where(tot > 0, tot, 1.0)
    delta = mean_b - mean_a
    m2 = m2_a + m2_b + delta * delta * n_a * n_b / safe
    mean = (n_a * mean_a + n_b * mean_b) / safe
    m2 = tl.where(n_b > 0, tl.where(n_a > 0, m2, m2_b), m2_a)
    mean = tl.where(n_b > 0, tl.where(n_a > 0, mean, mean_b), mean_a)
    return tot, mean, m2


@triton.jit
def _merge_tiles(part_ptr, t0, T, C, rc, mask_c, TILES: tl.constexpr):
    """Merge partials [t0, t0 + TILES) ∩ [0, T) of [T, 3, C] for channels ``rc`` with a
    fixed-shape reduction tree (``tl.reduce``): same order on every run, no atomics."""
    rt = t0 + tl.arange(0, TILES)
    mask = (rt < T)[:, None] & mask_c[None, :]
    base = rt[:, None].to(tl.int64) * 3 * C + rc[None, :]
    n = tl.load(part_ptr + base, mask=mask, other=0.0).to(tl.float64)
    mean = tl.load(part_ptr + base + C, mask=mask, other=0.0).to(tl.float64)
    m2 = tl.load(part_ptr + base + 2 * C, mask=mask, other=0.0).to(tl.float64)
    return tl.reduce((n, mean, m2), 0, _chan_combine)


@triton.jit
def _bn_merge_kernel(part_ptr, out_ptr, T, C, TILES: tl.constexpr, BLOCK_C: tl.constexpr):
    # one level of the tree: partials [T, 3, C] -> [cdiv(T, TILES), 3, C] in float64
    rc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = rc < C
    pid = tl.program_id(0)
    n, mean, m2 = _merge_tiles(part_ptr, pid * TILES, T, C, rc, mask_c, TILES)
    base = pid.to(tl.int64) * 3 * C
    tl.store(out_ptr + base + rc, n, mask=mask_c)
    tl.store(out_ptr + base + C + rc, mean, mask=mask_c)
    tl.store(out_ptr + base + 2 * C + rc, m2, mask=mask_c)


@triton.jit
def _bn_finalize_kernel(
    part_ptr, gamma_ptr, beta_ptr, rmean_ptr, rvar_ptr,
    mean_ptr, invstd_ptr, scale_ptr, shift_ptr,
    T, C, mom_hi, mom_lo, eps_hi, eps_lo,
    UPDATE: tl.constexpr, FIX_BF16: tl.constexpr, TILES: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # the last level of the tree (T <= TILES partials), then the per-channel outputs
    rc = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = rc < C
    n, mean, m2 = _merge_tiles(part_ptr, 0, T, C, rc, mask, TILES)
    # float scalars arrive as float32: each hyper-parameter is passed as a float32 pair
    momentum = tl.cast(mom_hi, tl.float64) + tl.cast(mom_lo, tl.float64)
    eps = tl.cast(eps_hi, tl.float64) + tl.cast(eps_lo, tl.float64)
    invstd64 = 1.0 / tl.sqrt(m2 / n + eps)
    out_t = mean_ptr.dtype.element_ty
    mean_o = mean.to(out_t)
    invstd_o = invstd64.to(out_t)
    scale = tl.load(gamma_ptr + rc, mask=mask, other=0.0).to(out_t) * invstd_o
    shift = tl.load(beta_ptr + rc, mask=mask, other=0.0).to(out_t) - mean_o * scale
    tl.store(mean_ptr + rc, mean_o, mask=mask)
    tl.store(invstd_ptr + rc, invstd_o, mask=mask)
    tl.store(scale_ptr + rc, scale, mask=mask)
    tl.store(shift_ptr + rc, shift, mask=mask)
    if UPDATE:
        # like running_mean.mul_(1 - m).add_(mean, alpha=m): two roundings to the buffer's
        # dtype, math in float32 (float64 for float64 buffers)
        r_t = rmean_ptr.dtype.element_ty
        c_t = tl.float64 if r_t == tl.float64 else tl.float32
        keep = (1.0 - momentum).to(c_t)
        mom = momentum.to(c_t)
        rm = to_storage(tl.load(rmean_ptr + rc, mask=mask, other=0.0).to(c_t) * keep, r_t, FIX_BF16)
        rv = to_storage(tl.load(rvar_ptr + rc, mask=mask, other=0.0).to(c_t) * keep, r_t, FIX_BF16)
        rm = to_storage(rm.to(c_t) + to_storage(mean_o, r_t, FIX_BF16).to(c_t) * mom, r_t, FIX_BF16)
        rv = to_storage(rv.to(c_t) + to_storage((m2 / (n - 1)).to(c_t), r_t, FIX_BF16).to(c_t) * mom, r_t, FIX_BF16)
        tl.store(rmean_ptr + rc, rm, mask=mask)
        tl.store(rvar_ptr + rc, rv, mask=mask)


# ------------------------------------------------------------------------------ launchers


def _cl(t: torch.Tensor) -> bool:
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _empty_like_layout(t: torch.Tensor, dtype=None) -> torch.Tensor:
    fmt = torch.channels_last if _cl(t) else torch.contiguous_format
    return torch.empty(t.shape, dtype=dtype or t.dtype, device=t.device, memory_format=fmt)


def _red_blocks(m: int, c: int):
    if _config.interpreting():
        return _config.stats_block_m(m), 16
    return _config.stats_block_m(m), 32


def batch_stats(x: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    m = n * h * w
    bm, bc = _red_blocks(m, c)
    part = torch.empty((triton.cdiv(m, bm), 3, c), dtype=_stat_dtype(x.dtype), device=x.device)
    if part.numel():
        _config.launch_fixed(_batch_stats_kernel, (triton.cdiv(m, bm), triton.cdiv(c, bc)),
                             (x, part, m, c, h, w, *x.stride()),
                             dict(ACC64=x.dtype == torch.float64, BLOCK_M=bm, BLOCK_C=bc))
    return part


def _split_f64(v: float):
    """(hi, lo) float32 pair with hi + lo == v to ~48 bits."""
    hi = float(torch.tensor(v, dtype=torch.float32))
    return hi, float(torch.tensor(v - hi, dtype=torch.float32))


def bn_finalize(partials, gamma, beta, running_mean, running_var, momentum, eps):
    """Chan-merge the [T, 3, C] partials and finalize. The merge is a tree of fixed shape:
    levels of ``merge_tiles_per_program()`` partials per program (float64 in between), so the
    result depends on T alone (bitwise the same on every run), and a BatchNorm over thousands
    of tiles takes a few short, parallel launches instead of one serial loop."""
    t, _, c = partials.shape
    partials = partials.contiguous()
    outs = [torch.empty((c,), dtype=partials.dtype, device=partials.device) for _ in range(4)]
    update = running_mean is not None
    rm, rv = (running_mean, running_var) if update else (outs[0], outs[0])
    # the running statistics are updated in place; work on contiguous views of them
    rm_c, rv_c = rm.contiguous(), rv.contiguous()
    if c and t:
        tiles = _config.merge_tiles_per_program()
        bc = 16 if _config.interpreting() else 32
        while t > tiles:
            merged = torch.empty((triton.cdiv(t, tiles), 3, c), dtype=torch.float64, device=partials.device)
            _config.launch_fixed(_bn_merge_kernel, (merged.shape[0], triton.cdiv(c, bc)), (partials, merged, t, c),
                                 dict(TILES=tiles, BLOCK_C=bc, num_warps=4))
            partials, t = merged, merged.shape[0]
        _config.launch_fixed(
            _bn_finalize_kernel, (triton.cdiv(c, bc),),
            (partials, gamma, beta, rm_c, rv_c, *outs, t, c, *_split_f64(momentum), *_split_f64(eps)),
            dict(UPDATE=update, FIX_BF16=_fix_bf16(rm_c.dtype), TILES=tiles, BLOCK_C=bc, num_warps=4),
        )
    if update:
        if rm_c.data_ptr() != running_mean.data_ptr():
            running_mean.copy_(rm_c)
        if rv_c.data_ptr() != running_var.data_ptr():
            running_var.copy_(rv_c)
    return tuple(outs)


def bn_add_act(y, scale, shift, residual, res_scale, res_shift, sample_scale, relu):
    n, c, h, w = y.shape
    out = _empty_like_layout(y)
    total = out.numel()
    if total == 0:
        return out
    res = residual if residual is not None else y
    dual = res_scale is not None
    blk = _block()
    _config.launch_fixed(
        _bn_add_act_kernel, (triton.cdiv(total, blk),),
        (y, out, scale, shift, res,
         res_scale if dual else scale, res_shift if dual else shift,
         sample_scale if sample_scale is not None else scale,
         total, c, h, w, *y.stride(), *res.stride()),
        dict(HAS_RES=residual is not None, DUAL=dual, HAS_SAMPLE=sample_scale is not None, RELU=bool(relu),
             OUT_CL=_cl(out), ACC64=y.dtype == torch.float64, FIX_BF16=_fix_bf16(y.dtype), BLOCK=blk),
    )
    return out


def bn_backward_reduce(dout, y, mean, invstd, scale, shift, out, relu, sample_scale):
    n, c, h, w = y.shape
    m = n * h * w
    bm, bc = _red_blocks(m, c)
    tiles = triton.cdiv(m, bm)
    sd = mean.dtype
    part = torch.empty((tiles, 2, c), dtype=sd, device=y.device)
    if m == 0 or c == 0:
        z = torch.zeros((c,), dtype=sd, device=y.device)
        return z, z.clone()
    o = out if out is not None else y
    _config.launch_fixed(
        _bn_bwd_reduce_kernel, (tiles, triton.cdiv(c, bc)),
        (dout, y, o, scale, shift, sample_scale if sample_scale is not None else scale, mean, invstd, part,
         m, c, h, w, *dout.stride(), *y.stride(), *o.stride()),
        dict(HAS_OUT=out is not None, RELU=bool(relu), HAS_SAMPLE=sample_scale is not None,
             ACC64=sd == torch.float64, BLOCK_M=bm, BLOCK_C=bc),
    )
    # fixed-order reductions over tiles: deterministic; two separate outputs (no aliasing)
    return part[:, 0].sum(dim=0), part[:, 1].sum(dim=0)


def bn_backward_apply(dout, y, mean, invstd, scale, shift, out, relu, sample_scale, sum_g, sum_gx, addend=None,
                      grad_out=None):
    n, c, h, w = y.shape
    dy = _empty_like_layout(y)
    total = dy.numel()
    if total == 0:
        return dy
    m = n * h * w
    sd = mean.dtype
    # per-channel coefficients of dy = A*g + B*y + C (C-sized work, done with torch ops)
    a = scale.to(sd)
    b = -a * invstd * sum_gx / m
    cc = -a * sum_g / m - b * mean
    o = out if out is not None else y
    ad = addend if addend is not None else y
    # grad_out is written at dy's flat index: y's layout (dense, as empty_like(y) makes it)
    if grad_out is not None and grad_out.stride() != dy.stride():
        grad_out_dense = torch.empty_like(dy)
    else:
        grad_out_dense = grad_out
    blk = _block()
    _config.launch_fixed(
        _bn_bwd_apply_kernel, (triton.cdiv(total, blk),),
        (dout, y, o, ad, grad_out_dense if grad_out is not None else dy, dy, scale, shift,
         sample_scale if sample_scale is not None else scale,
         a.contiguous(), b.contiguous(), cc.contiguous(),
         total, c, h, w, *dout.stride(), *y.stride(), *o.stride(), *ad.stride()),
        dict(HAS_OUT=out is not None, RELU=bool(relu), HAS_SAMPLE=sample_scale is not None,
             HAS_ADD=addend is not None, HAS_GOUT=grad_out is not None, OUT_CL=_cl(dy), ACC64=sd == torch.float64,
             FIX_BF16=_fix_bf16(y.dtype), BLOCK=blk),
    )
    if grad_out is not None and grad_out_dense is not grad_out:
        grad_out.copy_(grad_out_dense)
    return dy


def bn_apply_coefs(dh, y, scale, shift, coefs):
    """dy = A*g + B*y + C with g = dh where y*scale + shift > 0 (else 0) and ``coefs`` =
    [A; B; C] per channel ([3, C]): the BatchNorm(+ReLU) backward apply with precomputed
    coefficients, stored in y's layout and dtype (what the conv kernels compute on load)."""
    n, c, h, w = y.shape
    dy = _empty_like_layout(y)
    total = dy.numel()
    if total == 0:
        return dy
    coefs = coefs.contiguous()
    blk = _block()
    _config.launch_fixed(
        _bn_bwd_apply_kernel, (triton.cdiv(total, blk),),
        (dh, y, y, y, dy, dy, scale, shift, scale, coefs[0], coefs[1], coefs[2],
         total, c, h, w, *dh.stride(), *y.stride(), *y.stride(), *y.stride()),
        dict(HAS_OUT=False, RELU=True, HAS_SAMPLE=False, HAS_ADD=False, HAS_GOUT=False, OUT_CL=_cl(dy),
             ACC64=coefs.dtype == torch.float64,
             FIX_BF16=_fix_bf16(y.dtype), BLOCK=blk),
    )
    return dy


def act_grad(dout, out):
    n, c, h, w = out.shape
    dx = _empty_like_layout(dout)
    total = dx.numel()
    if total == 0:
        return dx
    blk = _block()
    _config.launch_fixed(_act_grad_kernel, (triton.cdiv(total, blk),),
                         (dout, out, dx, total, c, h, w, *dout.stride(), *out.stride()),
                         dict(OUT_CL=_cl(dx), BLOCK=blk))
    return dx
