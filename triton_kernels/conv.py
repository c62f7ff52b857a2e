"""Implicit-GEMM convolution kernels: forward (with prologue/epilogue fusion), dgrad, wgrad.

Every kernel addresses its tensors through their four logical strides (n, c, h, w), so
NCHW, NHWC (channels_last) and non-contiguous views are read in place; outputs are
allocated in the layout the reference gives them. Offsets are computed in int64.

forward  rows = output pixels (n, p, q), columns = output channels of one group,
         reduction over (r, s, input-channel block). Prologue: x*in_scale + in_shift and
         ReLU while loading (the previous BatchNorm), zero outside the image. Epilogue:
         + bias, + residual, ReLU, one store; or, for training, the raw output plus
         per-row-tile (count, mean, M2) per channel, computed from the stored values.
dgrad    rows = input pixels (n, h, w), columns = input channels of one group,
         reduction over (r, s, output-channel block); taps that do not land on the
         stride grid are masked.
wgrad    rows = output channels, columns = (c, r, s) of one group, reduction over output
         pixels, split in a fixed number of chunks whose fp32 partial sums are added in a
         fixed order (deterministic); the same prologue recomputes relu(x*s + t) on load.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _config
from ._common import relu, to_storage


@triton.jit
def _dot(a, b, acc, ACC64: tl.constexpr, TF32: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:
        # Triton's interpreter mis-multiplies 16-bit operands; their products are exact in
        # float32, so widening first gives the same fp32-accumulated result
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if ACC64:
        acc = tl.dot(a, b, acc, input_precision="ieee", out_dtype=tl.float64)
    elif TF32:
        acc = tl.dot(a, b, acc, input_precision="tf32")
    else:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    return acc


@triton.jit
def _bn_apply(dh, yv, kg, mask_k, mask, scale_ptr, shift_ptr, coef_ptr, K, acc_t: tl.constexpr,
              out_t: tl.constexpr, EXACT_BF16: tl.constexpr, AXIS: tl.constexpr):
    """BatchNorm(+ReLU) backward apply on a loaded tile of the output gradient: dh masked
    where y*scale + shift <= 0, then A*g + B*y + C; zero outside ``mask``, rounded to the
    storage dtype as the stored gradient would be. Channels run along ``AXIS`` of the tile."""
    sc = tl.load(scale_ptr + kg, mask=mask_k, other=0.0).to(acc_t)
    sh = tl.load(shift_ptr + kg, mask=mask_k, other=0.0).to(acc_t)
    ca = tl.load(coef_ptr + kg, mask=mask_k, other=0.0).to(acc_t)
    cb = tl.load(coef_ptr + K + kg, mask=mask_k, other=0.0).to(acc_t)
    cc = tl.load(coef_ptr + 2 * K + kg, mask=mask_k, other=0.0).to(acc_t)
    if AXIS == 1:
        sc, sh, ca, cb, cc = sc[None, :], sh[None, :], ca[None, :], cb[None, :], cc[None, :]
    else:
        sc, sh, ca, cb, cc = sc[:, None], sh[:, None], ca[:, None], cb[:, None], cc[:, None]
    y = yv.to(acc_t)
    g = tl.where(y * sc + sh <= 0, 0.0, dh.to(acc_t))
    d = tl.where(mask, g * ca + y * cb + cc, 0.0)
    return to_storage(d, out_t, EXACT_BF16)


@triton.jit
def _fwd_tile(acc, x_ptr, w_ptr, in_scale_ptr, in_shift_ptr, x_row, inside, c0, g, CG, kk, mask_n, r, s,
              sxc, swk, swc, swr, sws, HAS_PRO: tl.constexpr, IN_RELU: tl.constexpr, ACC64: tl.constexpr,
              TF32: tl.constexpr, UPCAST: tl.constexpr, BLOCK_K: tl.constexpr):
    """One reduction step of the forward: input channels [c0, c0 + BLOCK_K) of tap (r, s)."""
    acc_t = tl.float64 if ACC64 else tl.float32
    cc = c0 + tl.arange(0, BLOCK_K)
    mask_c = cc < CG
    cg = (g * CG + cc).to(tl.int64)
    a_mask = inside[:, None] & mask_c[None, :]
    a = tl.load(x_ptr + x_row[:, None] + cg[None, :] * sxc, mask=a_mask, other=0.0)
    if HAS_PRO:
        sc = tl.load(in_scale_ptr + cg, mask=mask_c, other=0.0).to(acc_t)
        sh = tl.load(in_shift_ptr + cg, mask=mask_c, other=0.0).to(acc_t)
        h = a.to(acc_t) * sc[None, :] + sh[None, :]
        if IN_RELU:
            h = relu(h)
        # the padding of the convolution is applied after the previous BatchNorm
        a = to_storage(tl.where(a_mask, h, 0.0), x_ptr.dtype.element_ty, UPCAST)
    elif IN_RELU:
        a = relu(a.to(acc_t)).to(x_ptr.dtype.element_ty)  # exact
    b_mask = mask_c[:, None] & mask_n[None, :]
    b = tl.load(w_ptr + kk[None, :] * swk + cc[:, None].to(tl.int64) * swc + r * swr + s * sws,
                mask=b_mask, other=0.0)
    return _dot(a, b, acc, ACC64, TF32, UPCAST)


@triton.jit
def _conv_fwd_kernel(
    x_ptr, w_ptr, out_ptr, bias_ptr, res_ptr, in_scale_ptr, in_shift_ptr, part_ptr,
    N, C, H, W, K, P, Q, R, S,
    sxn, sxc, sxh, sxw,
    swk, swc, swr, sws,
    son, sok, sop, soq,
    srn, srk, srp, srq,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    CG, KG,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, HAS_PRO: tl.constexpr, IN_RELU: tl.constexpr,
    RELU: tl.constexpr, STATS: tl.constexpr, ACC64: tl.constexpr, TF32: tl.constexpr, UPCAST: tl.constexpr,
    IS_1X1: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2)
    acc_t = tl.float64 if ACC64 else tl.float32
    PQ = P * Q
    M = N * PQ
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rm < M
    mask_n = rn < KG
    n = (rm // PQ).to(tl.int64)
    pq = rm % PQ
    p = pq // Q
    q = pq % Q
    kk = (g * KG + rn).to(tl.int64)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_t)
    if IS_1X1:
        # 1x1, no padding: a plain GEMM over (strided) input pixels, no bounds per tap
        x_row = n * sxn + (p * stride_h).to(tl.int64) * sxh + (q * stride_w).to(tl.int64) * sxw
        for c0 in range(0, CG, BLOCK_K):
            acc = _fwd_tile(acc, x_ptr, w_ptr, in_scale_ptr, in_shift_ptr, x_row, mask_m, c0, g, CG, kk, mask_n,
                            0, 0, sxc, swk, swc, swr, sws, HAS_PRO, IN_RELU, ACC64, TF32, UPCAST, BLOCK_K)
    else:
        for rs in range(0, R * S):
            r = rs // S
            s = rs % S
            ih = p * stride_h - pad_h + r * dil_h
            iw = q * stride_w - pad_w + s * dil_w
            inside = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            x_row = n * sxn + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
            for c0 in range(0, CG, BLOCK_K):
                acc = _fwd_tile(acc, x_ptr, w_ptr, in_scale_ptr, in_shift_ptr, x_row, inside, c0, g, CG, kk, mask_n,
                                r, s, sxc, swk, swc, swr, sws, HAS_PRO, IN_RELU, ACC64, TF32, UPCAST, BLOCK_K)

    out_mask = mask_m[:, None] & mask_n[None, :]
    y = acc
    if HAS_BIAS:
        y += tl.load(bias_ptr + kk, mask=mask_n, other=0.0).to(acc_t)[None, :]
    if HAS_RES:
        res_off = n * srn + p.to(tl.int64) * srp + q.to(tl.int64) * srq
        y += tl.load(res_ptr + res_off[:, None] + kk[None, :] * srk, mask=out_mask, other=0.0).to(acc_t)
    if RELU:
        y = relu(y)
    yq = to_storage(y, out_ptr.dtype.element_ty, UPCAST)
    out_off = n * son + p.to(tl.int64) * sop + q.to(tl.int64) * soq
    tl.store(out_ptr + out_off[:, None] + kk[None, :] * sok, yq, mask=out_mask)
    if STATS:
        # statistics of the values as stored (what the next BatchNorm normalises)
        yf = tl.where(out_mask, yq.to(acc_t), 0.0)
        cnt = tl.sum(mask_m.to(acc_t), axis=0)
        mean = tl.sum(yf, axis=0) / cnt
        d = tl.where(out_mask, yf - mean[None, :], 0.0)
        m2 = tl.sum(d * d, axis=0)
        base = pid_m.to(tl.int64) * 3 * K
        tl.store(part_ptr + base + kk, tl.zeros_like(mean) + cnt, mask=mask_n)
        tl.store(part_ptr + base + K + kk, mean, mask=mask_n)
        tl.store(part_ptr + base + 2 * K + kk, m2, mask=mask_n)


@triton.jit
def _conv_dgrad_kernel(
    dy_ptr, w_ptr, dx_ptr, by_ptr, bscale_ptr, bshift_ptr, coef_ptr,
    N, C, H, W, K, P, Q, R, S,
    sdn, sdk, sdp, sdq,
    sbn, sbk, sbp, sbq,
    swk, swc, swr, sws,
    sxn, sxc, sxh, sxw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    CG, KG,
    DY_PRO: tl.constexpr, ACC64: tl.constexpr, TF32: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2)
    acc_t = tl.float64 if ACC64 else tl.float32
    HW = H * W
    M = N * HW
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rm < M
    mask_n = rn < CG
    n = (rm // HW).to(tl.int64)
    hw = rm % HW
    h = hw // W
    w = hw % W
    cc = (g * CG + rn).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_t)
    for rs in range(0, R * S):
        r = rs // S
        s = rs % S
        th = h + pad_h - r * dil_h
        tw = w + pad_w - s * dil_w
        thc = tl.where(th >= 0, th, 0)
        twc = tl.where(tw >= 0, tw, 0)
        p = thc // stride_h
        q = twc // stride_w
        hit = mask_m & (th >= 0) & (tw >= 0) & (thc % stride_h == 0) & (twc % stride_w == 0) & (p < P) & (q < Q)
        dy_row = n * sdn + p.to(tl.int64) * sdp + q.to(tl.int64) * sdq
        for k0 in range(0, KG, BLOCK_K):
            kr = k0 + rk
            mask_k = kr < KG
            kg = (g * KG + kr).to(tl.int64)
            a_mask = hit[:, None] & mask_k[None, :]
            a = tl.load(dy_ptr + dy_row[:, None] + kg[None, :] * sdk, mask=a_mask, other=0.0)
            if DY_PRO:
                by_row = n * sbn + p.to(tl.int64) * sbp + q.to(tl.int64) * sbq
                yv = tl.load(by_ptr + by_row[:, None] + kg[None, :] * sbk, mask=a_mask, other=0.0)
                a = _bn_apply(a, yv, kg, mask_k, a_mask, bscale_ptr, bshift_ptr, coef_ptr, K, acc_t,
                              dy_ptr.dtype.element_ty, UPCAST, 1)
            b = tl.load(w_ptr + kg[:, None] * swk + rn[None, :].to(tl.int64) * swc + r * swr + s * sws,
                        mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            acc = _dot(a, b, acc, ACC64, TF32, UPCAST)

    out_off = n * sxn + h.to(tl.int64) * sxh + w.to(tl.int64) * sxw
    tl.store(dx_ptr + out_off[:, None] + cc[None, :] * sxc, to_storage(acc, dx_ptr.dtype.element_ty, UPCAST),
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _conv_wgrad_kernel(
    dy_ptr, x_ptr, in_scale_ptr, in_shift_ptr, part_ptr, by_ptr, bscale_ptr, bshift_ptr, coef_ptr,
    N, C, H, W, K, P, Q, R, S,
    sdn, sdk, sdp, sdq,
    sbn, sbk, sbp, sbq,
    sxn, sxc, sxh, sxw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    CG, KG, CHUNK, N_SPLIT,
    HAS_PRO: tl.constexpr, IN_RELU: tl.constexpr, DY_PRO: tl.constexpr, ACC64: tl.constexpr, TF32: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # rows: output channels of group g (BLOCK_M); columns: j = (c*R + r)*S + s (BLOCK_N);
    # reduction: output pixels [split*CHUNK, (split+1)*CHUNK) in BLOCK_K steps
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_z = tl.program_id(2)
    g = pid_z // N_SPLIT
    split = pid_z % N_SPLIT
    acc_t = tl.float64 if ACC64 else tl.float32
    RS = R * S
    J = CG * RS
    PQ = P * Q
    M = N * PQ
    rk_rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rj = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_k = rk_rows < KG
    mask_j = rj < J
    kg = (g * KG + rk_rows).to(tl.int64)
    c = rj // RS
    rs = rj % RS
    r = rs // S
    s = rs % S
    cg = (g * CG + c).to(tl.int64)
    if HAS_PRO:
        sc = tl.load(in_scale_ptr + cg, mask=mask_j, other=0.0).to(acc_t)
        sh = tl.load(in_shift_ptr + cg, mask=mask_j, other=0.0).to(acc_t)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_t)
    start = split * CHUNK
    for m0 in range(start, start + CHUNK, BLOCK_K):
        rm = m0 + tl.arange(0, BLOCK_K)
        mask_m = (rm < M) & (rm < start + CHUNK)
        n = (rm // PQ).to(tl.int64)
        pq = rm % PQ
        p = pq // Q
        q = pq % Q
        # A = dy^T tile [BLOCK_M (k), BLOCK_K (pixels)]
        dy_off = n * sdn + p.to(tl.int64) * sdp + q.to(tl.int64) * sdq
        a_mask = mask_k[:, None] & mask_m[None, :]
        a = tl.load(dy_ptr + kg[:, None] * sdk + dy_off[None, :], mask=a_mask, other=0.0)
        if DY_PRO:
            by_off = n * sbn + p.to(tl.int64) * sbp + q.to(tl.int64) * sbq
            yv = tl.load(by_ptr + kg[:, None] * sbk + by_off[None, :], mask=a_mask, other=0.0)
            a = _bn_apply(a, yv, kg, mask_k, a_mask, bscale_ptr, bshift_ptr, coef_ptr, K, acc_t,
                          dy_ptr.dtype.element_ty, UPCAST, 0)
        # B = input patch tile [BLOCK_K (pixels), BLOCK_N (c, r, s)]
        ih = p[:, None] * stride_h - pad_h + r[None, :] * dil_h
        iw = q[:, None] * stride_w - pad_w + s[None, :] * dil_w
        b_mask = mask_m[:, None] & mask_j[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_off = n[:, None] * sxn + cg[None, :] * sxc + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
        b = tl.load(x_ptr + x_off, mask=b_mask, other=0.0)
        if HAS_PRO:
            hh = b.to(acc_t) * sc[None, :] + sh[None, :]
            if IN_RELU:
                hh = relu(hh)
            b = to_storage(tl.where(b_mask, hh, 0.0), x_ptr.dtype.element_ty, UPCAST)
        elif IN_RELU:
            b = relu(b.to(acc_t)).to(x_ptr.dtype.element_ty)
        acc = _dot(a, b, acc, ACC64, TF32, UPCAST)

    # partial sums [Z = groups*n_split, KG, J], fp32 (fp64 for fp64)
    base = pid_z.to(tl.int64) * KG * J
    off = base + rk_rows[:, None].to(tl.int64) * J + rj[None, :]
    tl.store(part_ptr + off, acc, mask=mask_k[:, None] & mask_j[None, :])


# ------------------------------------------------------------------------------ launchers


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tf32(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 and torch.backends.cudnn.allow_tf32


def _upcast(dtype: torch.dtype) -> bool:
    return _config.interpreting() and dtype in (torch.float16, torch.bfloat16)


def _out_size(size, pad, dil, k, stride):
    return (size + 2 * pad - dil * (k - 1) - 1) // stride + 1


def conv_forward(x, weight, bias, residual, in_scale, in_shift, in_relu, stride, padding, dilation, groups,
                 relu, out_format, stats: bool):
    """One launch of the forward kernel. Returns y, or (y, partials [T, 3, K]) with stats."""
    n, c, h, w = x.shape
    k, cg, r, s = weight.shape
    kg = k // groups
    p = _out_size(h, padding[0], dilation[0], r, stride[0])
    q = _out_size(w, padding[1], dilation[1], s, stride[1])
    out = torch.empty((n, k, p, q), dtype=x.dtype, device=x.device, memory_format=out_format)
    m = n * p * q
    acc64 = x.dtype == torch.float64
    part = None
    if stats:
        bm = _config.stats_block_m(m)
        part = torch.empty((triton.cdiv(m, bm), 3, k), dtype=_stat_dtype(x.dtype), device=x.device)
    if out.numel() == 0:
        return (out, part) if stats else out
    dummy = out
    res = residual if residual is not None else out
    args = (
        x, weight, out,
        bias if bias is not None else dummy, res,
        in_scale if in_scale is not None else dummy, in_shift if in_shift is not None else dummy,
        part if part is not None else dummy,
        n, c, h, w, k, p, q, r, s,
        *x.stride(), *weight.stride(), *out.stride(), *res.stride(),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        cg, kg,
    )
    flags = dict(
        HAS_BIAS=bias is not None, HAS_RES=residual is not None, HAS_PRO=in_scale is not None,
        IN_RELU=bool(in_relu), RELU=bool(relu), STATS=stats, ACC64=acc64, TF32=_tf32(x.dtype),
        UPCAST=_upcast(x.dtype),
        IS_1X1=r == 1 and s == 1 and padding[0] == 0 and padding[1] == 0,
    )
    _config.launch("fwd", _conv_fwd_kernel, lambda bm, bn: (triton.cdiv(m, bm), triton.cdiv(kg, bn), groups),
                   args, flags, stats_m=m)
    return (out, part) if stats else out


def conv_dgrad(dy, weight, input_shape, stride, padding, dilation, groups, out_format, bn=None):
    """dx of the conv; with ``bn = (y, scale, shift, coefs)`` the output gradient is the
    BatchNorm(+ReLU) backward apply of ``dy`` (computed on load, see bn_apply_conv_backward)."""
    n, c, h, w = input_shape
    k, cg, r, s = weight.shape
    kg = k // groups
    _, _, p, q = dy.shape
    dx = torch.empty((n, c, h, w), dtype=dy.dtype, device=dy.device, memory_format=out_format)
    if dx.numel() == 0:
        return dx
    if dy.numel() == 0:
        return dx.zero_()
    m = n * h * w
    by, bsc, bsh, coef = bn if bn is not None else (dy, dy, dy, dy)
    args = (
        dy, weight, dx, by, bsc, bsh, coef,
        n, c, h, w, k, p, q, r, s,
        *dy.stride(), *by.stride(), *weight.stride(), *dx.stride(),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        cg, kg,
    )
    flags = dict(DY_PRO=bn is not None, ACC64=dy.dtype == torch.float64, TF32=_tf32(dy.dtype),
                 UPCAST=_upcast(dy.dtype))
    _config.launch("dgrad", _conv_dgrad_kernel, lambda bm, bn: (triton.cdiv(m, bm), triton.cdiv(cg, bn), groups),
                   args, flags)
    return dx


def conv_wgrad(dy, x, in_scale, in_shift, in_relu, weight_shape, stride, padding, dilation, groups, bn=None):
    n, c, h, w = x.shape
    k, cg, r, s = weight_shape
    kg = k // groups
    _, _, p, q = dy.shape
    m = n * p * q
    j = cg * r * s
    sd = _stat_dtype(dy.dtype)
    if m == 0 or k == 0 or j == 0:
        return torch.zeros(weight_shape, dtype=dy.dtype, device=dy.device)
    n_split = _config.wgrad_splits(m, kg, j, groups)
    chunk = triton.cdiv(triton.cdiv(m, n_split), 256) * 256
    n_split = triton.cdiv(m, chunk)
    part = torch.empty((groups * n_split, kg, j), dtype=sd, device=dy.device)
    by, bsc, bsh, coef = bn if bn is not None else (dy, part, part, part)
    args = (
        dy, x,
        in_scale if in_scale is not None else part, in_shift if in_shift is not None else part,
        part, by, bsc, bsh, coef,
        n, c, h, w, k, p, q, r, s,
        *dy.stride(), *by.stride(), *x.stride(),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        cg, kg, chunk, n_split,
    )
    flags = dict(HAS_PRO=in_scale is not None, IN_RELU=bool(in_relu), DY_PRO=bn is not None,
                 ACC64=dy.dtype == torch.float64,
                 TF32=_tf32(dy.dtype), UPCAST=_upcast(dy.dtype))
    _config.launch("wgrad", _conv_wgrad_kernel,
                   lambda bm, bn: (triton.cdiv(kg, bm), triton.cdiv(j, bn), groups * n_split), args, flags)
    # fixed-order sum of the split partials: deterministic
    dw = part.view(groups, n_split, kg, j).sum(dim=1)
    return dw.reshape(weight_shape).to(dy.dtype)
