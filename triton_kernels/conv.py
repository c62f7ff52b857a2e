"""Implicit-GEMM convolution kernels: forward (with prologue/epilogue fusion), dgrad, wgrad.

Every kernel addresses its tensors through their four logical strides (n, c, h, w), so
NCHW, NHWC (channels_last) and non-contiguous views are read in place; outputs are
allocated in the layout the reference gives them. Offsets are computed in int64.

Each kernel has ONE main loop, so that Triton software-pipelines all of it (it pipelines
innermost loops only): loads of step i+1.. are in flight while the tensor cores work on
step i, across filter taps as well as channel blocks.

forward  rows = output pixels (n, p, q), columns = output channels of one group,
         reduction over (r, s, input-channel block), flattened into one loop. Prologue:
         x*in_scale + in_shift and ReLU while loading (the previous BatchNorm), zero outside
         the image. Epilogue: + bias, + residual, ReLU, one store; or, for training, the raw
         output plus per-row-tile (count, mean, M2) per channel, computed from the stored
         values.
dgrad    one launch per stride phase (input pixels with h % stride_h, w % stride_w fixed):
         in a phase the filter taps that reach the stride grid are known on the host, so
         only those are visited (a stride-2 3x3 dgrad visits 9 taps over 4 phases, not 36);
         rows = input pixels of the phase, columns = input channels of one group, one loop
         over (tap, output-channel block).
wgrad    rows = output channels, columns = input channels of one filter tap (r, s), so an
         NHWC input patch is read as contiguous channel vectors; reduction over output
         pixels, split in a fixed number of chunks whose fp32 partial sums are added in a
         fixed order (deterministic); the same prologue recomputes relu(x*s + t) on load.
"""

from __future__ import annotations

import math

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
def _bn_coefs(kg, mask_k, scale_ptr, shift_ptr, coef_ptr, K, acc_t: tl.constexpr):
    """Per-channel vectors of the BatchNorm(+ReLU) backward apply: scale, shift and the
    A, B, C of dy = A*g + B*y + C (``coef`` is [3, K])."""
    sc = tl.load(scale_ptr + kg, mask=mask_k, other=0.0).to(acc_t)
    sh = tl.load(shift_ptr + kg, mask=mask_k, other=0.0).to(acc_t)
    ca = tl.load(coef_ptr + kg, mask=mask_k, other=0.0).to(acc_t)
    cb = tl.load(coef_ptr + K + kg, mask=mask_k, other=0.0).to(acc_t)
    cc = tl.load(coef_ptr + 2 * K + kg, mask=mask_k, other=0.0).to(acc_t)
    return sc, sh, ca, cb, cc


@triton.jit
def _bn_apply(dh, yv, sc, sh, ca, cb, cc, mask, acc_t: tl.constexpr, out_t: tl.constexpr,
              EXACT_BF16: tl.constexpr):
    """BatchNorm(+ReLU) backward apply on a loaded tile of the output gradient: dh masked
    where y*scale + shift <= 0, then A*g + B*y + C; zero outside ``mask``, rounded to the
    storage dtype as the stored gradient would be (coefficients already broadcast)."""
    y = yv.to(acc_t)
    g = tl.where(y * sc + sh <= 0, 0.0, dh.to(acc_t))
    d = tl.where(mask, g * ca + y * cb + cc, 0.0)
    return to_storage(d, out_t, EXACT_BF16)


@triton.jit
def _prologue(v, mask, sc, sh, HAS_PRO: tl.constexpr, IN_RELU: tl.constexpr, acc_t: tl.constexpr,
              out_t: tl.constexpr, EXACT_BF16: tl.constexpr):
    """The previous BatchNorm (+ReLU) on a loaded input tile; the padding of the convolution
    is applied after it (zero outside ``mask``). Coefficients already broadcast."""
    if HAS_PRO:
        h = v.to(acc_t) * sc + sh
        if IN_RELU:
            h = relu(h)
        v = to_storage(tl.where(mask, h, 0.0), out_t, EXACT_BF16)
    elif IN_RELU:
        v = relu(v.to(acc_t)).to(out_t)  # exact
    return v


@triton.jit
def _in_registers(v, mask):
    """``v`` unchanged (it was loaded with 0 outside ``mask``), but no longer a plain load:
    Triton then feeds it to the MMA from registers (A operand) instead of staging it in
    shared memory. For inputs gathered with loads too narrow for asynchronous copies, a
    staged operand would make every step wait for the MMA; from registers it does not."""
    return tl.where(mask, v, 0.0)


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
    IS_1X1: tl.constexpr, MERGE_S: tl.constexpr, GATHER: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2)
    acc_t = tl.float64 if ACC64 else tl.float32
    in_t = x_ptr.dtype.element_ty
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
    ih0 = p * stride_h - pad_h
    iw0 = q * stride_w - pad_w
    x_n = n * sxn
    w_col = kk[None, :] * swk
    rk = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_t)
    # one loop over (r, s, channel block): Triton pipelines only innermost loops.
    # MERGE_S (few dense channels, e.g. the RGB stem): a filter row's S taps x CG channels
    # are S*CG consecutive elements of an NHWC input row, reduced as one index j = s*CG + c,
    # so a 7x7 RGB filter takes 7 steps of 21 useful columns instead of 49 steps of 3.
    if MERGE_S:
        n_cb = tl.cdiv(S * CG, BLOCK_K)
        trips = R * n_cb
    else:
        n_cb = tl.cdiv(CG, BLOCK_K)
        trips = R * S * n_cb
    for it in range(0, trips):
        if MERGE_S:
            r = it // n_cb
            jj = (it - r * n_cb) * BLOCK_K + rk
            sj = jj // CG
            cj = jj - sj * CG
            mask_c = jj < S * CG
            ih = ih0 + r * dil_h
            iw = iw0[:, None] + sj[None, :]  # dil_w == 1
            a_mask = (mask_m & (ih >= 0) & (ih < H))[:, None] & mask_c[None, :] & (iw >= 0) & (iw < W)
            x_row = x_n + ih.to(tl.int64) * sxh + iw0.to(tl.int64) * sxw
            a = tl.load(x_ptr + x_row[:, None] + jj[None, :].to(tl.int64) * sxc, mask=a_mask, other=0.0)
            cg = cj.to(tl.int64)  # groups == 1
            w_tap = (cj.to(tl.int64) * swc + sj * sws)[:, None] + r * swr
        else:
            if IS_1X1:
                # 1x1, no padding: one tap, always inside the image (and the compiler sees a
                # tap offset of 0, so the weight tile's alignment is known)
                r = 0
                s = 0
                cc = it * BLOCK_K + rk
                ih = ih0
                iw = iw0
                inside = mask_m
            else:
                rs = it // n_cb
                cc = (it - rs * n_cb) * BLOCK_K + rk
                r = rs // S
                s = rs - r * S
                ih = ih0 + r * dil_h
                iw = iw0 + s * dil_w
                inside = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            x_row = x_n + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
            mask_c = cc < CG
            cg = (g * CG + cc).to(tl.int64)
            a_mask = inside[:, None] & mask_c[None, :]
            a = tl.load(x_ptr + x_row[:, None] + cg[None, :] * sxc, mask=a_mask, other=0.0)
            w_tap = cc[:, None].to(tl.int64) * swc + r * swr + s * sws
        if HAS_PRO:
            sc = tl.load(in_scale_ptr + cg, mask=mask_c, other=0.0).to(acc_t)[None, :]
            sh = tl.load(in_shift_ptr + cg, mask=mask_c, other=0.0).to(acc_t)[None, :]
            a = _prologue(a, a_mask, sc, sh, HAS_PRO, IN_RELU, acc_t, in_t, UPCAST)
        else:
            a = _prologue(a, a_mask, 0.0, 0.0, HAS_PRO, IN_RELU, acc_t, in_t, UPCAST)
        if GATHER:
            a = _in_registers(a, a_mask)
        b = tl.load(w_ptr + w_col + w_tap, mask=mask_c[:, None] & mask_n[None, :], other=0.0)
        acc = _dot(a, b, acc, ACC64, TF32, UPCAST)

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
    dy_ptr, w_ptr, dx_ptr, by_ptr, bscale_ptr, bshift_ptr, coef_ptr, add_ptr,
    N, C, H, W, K, P, Q, R, S,
    sdn, sdk, sdp, sdq,
    sbn, sbk, sbp, sbq,
    swk, swc, swr, sws,
    sxn, sxc, sxh, sxw,
    san, sac, sah, saw,
    stride_h, stride_w,
    CG, KG,
    ph, pw, HP, WP,
    r0, s0, r_step, s_step, NR, NS, oh0, ow0, doh, dow,
    DY_PRO: tl.constexpr, HAS_ADD: tl.constexpr, ACC64: tl.constexpr, TF32: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # rows: input pixels (n, ph + i*stride_h, pw + j*stride_w) of one stride phase; the taps
    # of the phase are r = r0 + tr*r_step (tr < NR), reaching output row p = i + oh0 - tr*doh
    # (the same along w); columns: input channels of group g; reduction: (tap, k block)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2)
    acc_t = tl.float64 if ACC64 else tl.float32
    HWP = HP * WP
    M = N * HWP
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rm < M
    mask_n = rn < CG
    n = (rm // HWP).to(tl.int64)
    t = rm % HWP
    i = t // WP
    j = t % WP
    cc = (g * CG + rn).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    w_col = rn[None, :].to(tl.int64) * swc
    d_n = n * sdn
    b_n = n * sbn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_t)
    n_kb = tl.cdiv(KG, BLOCK_K)
    for it in range(0, NR * NS * n_kb):
        tap = it // n_kb
        kr = (it - tap * n_kb) * BLOCK_K + rk
        tr = tap // NS
        ts = tap - tr * NS
        r = r0 + tr * r_step
        s = s0 + ts * s_step
        p = i + (oh0 - tr * doh)
        q = j + (ow0 - ts * dow)
        hit = mask_m & (p >= 0) & (p < P) & (q >= 0) & (q < Q)
        mask_k = kr < KG
        kg = (g * KG + kr).to(tl.int64)
        a_mask = hit[:, None] & mask_k[None, :]
        a = tl.load(dy_ptr + (d_n + p.to(tl.int64) * sdp + q.to(tl.int64) * sdq)[:, None] + kg[None, :] * sdk,
                    mask=a_mask, other=0.0)
        if DY_PRO:
            yv = tl.load(by_ptr + (b_n + p.to(tl.int64) * sbp + q.to(tl.int64) * sbq)[:, None] + kg[None, :] * sbk,
                         mask=a_mask, other=0.0)
            sc, sh, ca, cb, c3 = _bn_coefs(kg, mask_k, bscale_ptr, bshift_ptr, coef_ptr, K, acc_t)
            a = _bn_apply(a, yv, sc[None, :], sh[None, :], ca[None, :], cb[None, :], c3[None, :], a_mask, acc_t,
                          dy_ptr.dtype.element_ty, UPCAST)
        b = tl.load(w_ptr + kg[:, None] * swk + w_col + r * swr + s * sws,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = _dot(a, b, acc, ACC64, TF32, UPCAST)

    h = ph + i * stride_h
    w = pw + j * stride_w
    out_mask = mask_m[:, None] & mask_n[None, :]
    if HAS_ADD:
        # the addend (a block's shortcut gradient) joins the accumulator: one rounding
        add_off = n * san + h.to(tl.int64) * sah + w.to(tl.int64) * saw
        acc += tl.load(add_ptr + add_off[:, None] + cc[None, :] * sac, mask=out_mask, other=0.0).to(acc_t)
    out_off = n * sxn + h.to(tl.int64) * sxh + w.to(tl.int64) * sxw
    tl.store(dx_ptr + out_off[:, None] + cc[None, :] * sxc, to_storage(acc, dx_ptr.dtype.element_ty, UPCAST),
             mask=out_mask)


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
    UPCAST: tl.constexpr, TAP_COLS: tl.constexpr, X_ROWS: tl.constexpr, GATHER: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # dw[k, j] = sum over output pixels of dy[pixel, k] * x_patch[pixel, j], j = (r*S + s)*CG + c.
    # Reduction: output pixels [split*CHUNK, (split+1)*CHUNK) in BLOCK_K steps. The operand
    # that a prologue transforms is the MMA's A (it may come from registers; B must come
    # from shared memory, and a register-computed B would make every step wait for the MMA):
    # X_ROWS: rows = columns j of the patch (A = transformed patch^T), columns = k;
    # else:   rows = k (A = dy^T, the BatchNorm-apply prologue), columns = j.
    # TAP_COLS: a block of j holds channels of one tap (the program axis of j runs over
    # (tap, channel block)), so a patch row is one contiguous channel vector in NHWC;
    # otherwise (few channels per group, e.g. the RGB stem) blocks run over the flattened j.
    if X_ROWS:
        BJ: tl.constexpr = BLOCK_M
        BKO: tl.constexpr = BLOCK_N
        pid_j = tl.program_id(0)
        pid_k = tl.program_id(1)
    else:
        BJ: tl.constexpr = BLOCK_N
        BKO: tl.constexpr = BLOCK_M
        pid_k = tl.program_id(0)
        pid_j = tl.program_id(1)
    pid_z = tl.program_id(2)
    g = pid_z // N_SPLIT
    split = pid_z % N_SPLIT
    acc_t = tl.float64 if ACC64 else tl.float32
    in_t = x_ptr.dtype.element_ty
    PQ = P * Q
    M = N * PQ
    RS = R * S
    rko = pid_k * BKO + tl.arange(0, BKO)
    mask_k = rko < KG
    kg = (g * KG + rko).to(tl.int64)
    if TAP_COLS:
        n_cb = tl.cdiv(CG, BJ)
        rs = pid_j // n_cb
        rc = (pid_j - rs * n_cb) * BJ + tl.arange(0, BJ)
        mask_c = rc < CG
        col = rs * CG + rc
    else:
        col = pid_j * BJ + tl.arange(0, BJ)
        mask_c = col < RS * CG
        rs = col // CG
        rc = col - rs * CG
    r = rs // S
    s = rs - r * S
    cg = (g * CG + rc).to(tl.int64)
    # per-program constants: the prologue's per-channel vectors and the BN apply's per-k ones
    if HAS_PRO:
        sc = tl.load(in_scale_ptr + cg, mask=mask_c, other=0.0).to(acc_t)[None, :]
        sh = tl.load(in_shift_ptr + cg, mask=mask_c, other=0.0).to(acc_t)[None, :]
    else:
        sc = 0.0
        sh = 0.0
    if DY_PRO:
        bs, bt, ba, bb, bc = _bn_coefs(kg, mask_k, bscale_ptr, bshift_ptr, coef_ptr, K, acc_t)
        bs, bt, ba, bb, bc = bs[None, :], bt[None, :], ba[None, :], bb[None, :], bc[None, :]
    x_col = cg[None, :] * sxc
    if not TAP_COLS:
        r_dil = r * dil_h
        s_dil = s * dil_w
        x_tap = cg * sxc + r_dil.to(tl.int64) * sxh + s_dil.to(tl.int64) * sxw
    dy_col = kg[None, :] * sdk
    by_col = kg[None, :] * sbk
    rp = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_t)
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, M)
    for m0 in range(start, start + CHUNK, BLOCK_K):
        rm = m0 + rp
        mask_m = rm < end
        n = (rm // PQ).to(tl.int64)
        pq = rm % PQ
        p = pq // Q
        q = pq % Q
        # dy tile [BLOCK_K (pixels), BKO (k)]
        d_mask = mask_m[:, None] & mask_k[None, :]
        d = tl.load(dy_ptr + (n * sdn + p.to(tl.int64) * sdp + q.to(tl.int64) * sdq)[:, None] + dy_col,
                    mask=d_mask, other=0.0)
        if DY_PRO:
            yv = tl.load(by_ptr + (n * sbn + p.to(tl.int64) * sbp + q.to(tl.int64) * sbq)[:, None] + by_col,
                         mask=d_mask, other=0.0)
            d = _bn_apply(d, yv, bs, bt, ba, bb, bc, d_mask, acc_t, dy_ptr.dtype.element_ty, UPCAST)
        # input patch tile [BLOCK_K (pixels), BJ (columns j)]
        if TAP_COLS:
            ih = p * stride_h - pad_h + r * dil_h
            iw = q * stride_w - pad_w + s * dil_w
            row_ok = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            x_mask = row_ok[:, None] & mask_c[None, :]
            x_row = n * sxn + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
            xv = tl.load(x_ptr + x_row[:, None] + x_col, mask=x_mask, other=0.0)
        else:
            # offsets as a pixel part plus a column part (1-D each, added once in 2-D)
            ih0 = p * stride_h - pad_h
            iw0 = q * stride_w - pad_w
            ih = ih0[:, None] + r_dil[None, :]
            iw = iw0[:, None] + s_dil[None, :]
            x_mask = mask_m[:, None] & mask_c[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            x_pix = n * sxn + ih0.to(tl.int64) * sxh + iw0.to(tl.int64) * sxw
            xv = tl.load(x_ptr + x_pix[:, None] + x_tap[None, :], mask=x_mask, other=0.0)
        xv = _prologue(xv, x_mask, sc, sh, HAS_PRO, IN_RELU, acc_t, in_t, UPCAST)
        if GATHER:
            xv = _in_registers(xv, x_mask)
        if X_ROWS:
            acc = _dot(tl.trans(xv), d, acc, ACC64, TF32, UPCAST)
        else:
            acc = _dot(tl.trans(d), xv, acc, ACC64, TF32, UPCAST)

    # partials [Z, KG, R*S, CG] (j innermost)
    base = pid_z.to(tl.int64) * KG * RS * CG
    if X_ROWS:
        off = base + rko[None, :].to(tl.int64) * (RS * CG) + col[:, None]
        tl.store(part_ptr + off, acc, mask=mask_c[:, None] & mask_k[None, :])
    else:
        off = base + rko[:, None].to(tl.int64) * (RS * CG) + col[None, :]
        tl.store(part_ptr + off, acc, mask=mask_k[:, None] & mask_c[None, :])


# ------------------------------------------------------------------------------ launchers


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tf32(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 and torch.backends.cudnn.allow_tf32


def _upcast(dtype: torch.dtype) -> bool:
    return _config.interpreting() and dtype in (torch.float16, torch.bfloat16)


def _out_size(size, pad, dil, k, stride):
    return (size + 2 * pad - dil * (k - 1) - 1) // stride + 1


def _rows_aligned(t, cg: int) -> bool:
    """Whether the channel vectors of an NHWC-read tensor start 16-element aligned (what
    Triton's launch specialisation can prove: unit channel stride, other strides and the
    channel count divisible by 16) so that its tiles can be copied asynchronously. Under
    the interpreter only the unit channel stride counts, so that the small test shapes
    exercise both wgrad orientations."""
    if _config.interpreting():
        return t.stride(1) == 1
    return t.stride(1) == 1 and cg % 16 == 0 and all(st % 16 == 0 for st in (t.stride(0), t.stride(2), t.stride(3)))


def _problem(n, c, h, w, k, p, q, r, s, stride, padding, dilation, cg, kg, elem):
    return dict(ELEM=elem, N=n, C=c, H=h, W=w, K=k, P=p, Q=q, R=r, S=s, CG=cg, KG=kg, stride_h=stride[0], stride_w=stride[1],
                pad_h=padding[0], pad_w=padding[1], dil_h=dilation[0], dil_w=dilation[1])


def _pack_weight(weight, channels_inner: bool):
    """The weight [K, CG, R, S] with input channels innermost (KRSC strides) or output
    channels innermost (RSCK), whichever makes the kernels' weight tiles contiguous and
    16-byte aligned: KRSC when a group has a multiple of 16 channels, else RSCK (the RGB
    stem: 3 channels per row cannot be aligned, 64 output channels can). A weight already in
    that layout is used as is; otherwise it is repacked (a small copy per call)."""
    if channels_inner:
        if weight.stride(1) == 1 or weight.shape[1] == 1:
            return weight
        return weight.contiguous(memory_format=torch.channels_last)
    if weight.stride(0) == 1 or weight.shape[0] == 1:
        return weight
    return weight.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)


def _channels_inner(cg: int, kg: int) -> bool:
    return cg % 16 == 0 or kg % 16 != 0


def _wstrides(weight):
    """The weight's strides, 0 for a dimension of size 1 (any stride addresses it): a 1x1
    filter's tap strides then do not hide the alignment of the weight tile's address."""
    return tuple(0 if n == 1 else st for n, st in zip(weight.shape, weight.stride()))


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
    # a filter row of few dense NHWC channels is reduced as one run of S*CG elements
    merge_s = cg < 16 and s > 1 and groups == 1 and dilation[1] == 1 and x.stride(3) == cg * x.stride(1)
    weight = _pack_weight(weight, not merge_s and _channels_inner(cg, kg))
    dummy = out
    res = residual if residual is not None else out
    args = (
        x, weight, out,
        bias if bias is not None else dummy, res,
        in_scale if in_scale is not None else dummy, in_shift if in_shift is not None else dummy,
        part if part is not None else dummy,
        n, c, h, w, k, p, q, r, s,
        *x.stride(), *_wstrides(weight), *out.stride(), *res.stride(),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        cg, kg,
    )
    flags = dict(
        HAS_BIAS=bias is not None, HAS_RES=residual is not None, HAS_PRO=in_scale is not None,
        IN_RELU=bool(in_relu), RELU=bool(relu), STATS=stats, ACC64=acc64, TF32=_tf32(x.dtype),
        UPCAST=_upcast(x.dtype),
        IS_1X1=r == 1 and s == 1 and padding[0] == 0 and padding[1] == 0, MERGE_S=merge_s,
        GATHER=not _rows_aligned(x, cg),
    )
    _config.launch("fwd", _conv_fwd_kernel, lambda bm, bn: (triton.cdiv(m, bm), triton.cdiv(kg, bn), groups),
                   args, flags, _problem(n, c, h, w, k, p, q, r, s, stride, padding, dilation, cg, kg, x.element_size()),
                   stats_m=m)
    return (out, part) if stats else out


def phase_taps(phase: int, pad: int, dil: int, stride: int, size: int):
    """Filter taps of one stride phase of dgrad along one axis.

    Input rows h = phase + i*stride receive output row p from tap r when
    h + pad - r*dil = p*stride, i.e. r*dil = phase + pad (mod stride). Those taps are
    r = r0 + t*step (t < count), step = stride / gcd(stride, dil), and reach p = i + o0 - t*do.
    Returns (r0, step, count, o0, do); count is 0 when no tap reaches the phase."""
    step = stride // math.gcd(stride, dil)
    r0 = next((r for r in range(min(size, step)) if (phase + pad - r * dil) % stride == 0), None)
    if r0 is None:
        return 0, 1, 0, 0, 0
    count = (size - 1 - r0) // step + 1
    return r0, step, count, (phase + pad - r0 * dil) // stride, step * dil // stride


def conv_dgrad(dy, weight, input_shape, stride, padding, dilation, groups, out_format, bn=None, add=None):
    """dx of the conv; with ``bn = (y, scale, shift, coefs)`` the output gradient is the
    BatchNorm(+ReLU) backward apply of ``dy`` (computed on load, see bn_apply_conv_backward);
    with ``add`` (a tensor of the input's shape and dy's dtype, any strides) dx + add, added
    to the accumulator before its one rounding. One launch per stride phase; a phase that no
    tap reaches is written as zeros (or as ``add``)."""
    n, c, h, w = input_shape
    k, cg, r, s = weight.shape
    kg = k // groups
    _, _, p, q = dy.shape
    dx = torch.empty((n, c, h, w), dtype=dy.dtype, device=dy.device, memory_format=out_format)
    if dx.numel() == 0:
        return dx
    if dy.numel() == 0:
        return dx.zero_() if add is None else dx.copy_(add)
    weight = _pack_weight(weight, _channels_inner(cg, kg))
    by, bsc, bsh, coef = bn if bn is not None else (dy, dy, dy, dy)
    addend = add if add is not None else dx
    common = (
        dy, weight, dx, by, bsc, bsh, coef, addend,
        n, c, h, w, k, p, q, r, s,
        *dy.stride(), *by.stride(), *_wstrides(weight), *dx.stride(), *addend.stride(),
        stride[0], stride[1],
        cg, kg,
    )
    flags = dict(DY_PRO=bn is not None, HAS_ADD=add is not None, ACC64=dy.dtype == torch.float64,
                 TF32=_tf32(dy.dtype), UPCAST=_upcast(dy.dtype))
    problem = _problem(n, c, h, w, k, p, q, r, s, stride, padding, dilation, cg, kg, dy.element_size())
    for ph in range(min(stride[0], h)):
        r0, r_step, nr, oh0, doh = phase_taps(ph, padding[0], dilation[0], stride[0], r)
        hp = triton.cdiv(h - ph, stride[0])
        for pw in range(min(stride[1], w)):
            s0, s_step, ns, ow0, dow = phase_taps(pw, padding[1], dilation[1], stride[1], s)
            wp = triton.cdiv(w - pw, stride[1])
            m = n * hp * wp
            args = common + (ph, pw, hp, wp, r0, s0, r_step, s_step, nr, ns, oh0, ow0, doh, dow)
            _config.launch("dgrad", _conv_dgrad_kernel,
                           lambda bm, bn, m=m: (triton.cdiv(m, bm), triton.cdiv(cg, bn), groups), args, flags,
                           problem)
    return dx


def conv_wgrad(dy, x, in_scale, in_shift, in_relu, weight_shape, stride, padding, dilation, groups, bn=None):
    """dw of the conv, from dy and the input x (with ``in_scale``: relu(x*in_scale + in_shift)
    recomputed on load). With ``bn = (y, scale, shift, coefs)`` the output gradient is the
    BatchNorm(+ReLU) backward apply of ``dy``: computed on load when the input has no
    prologue; when it has one, both operands would need a transform and the MMA's B operand
    cannot take one without serialising the loop, so the apply is one elementwise pass first
    (rounded to the storage dtype exactly as on load: the same result)."""
    n, c, h, w = x.shape
    k, cg, r, s = weight_shape
    kg = k // groups
    _, _, p, q = dy.shape
    m = n * p * q
    j = cg * r * s
    sd = _stat_dtype(dy.dtype)
    if m == 0 or k == 0 or j == 0:
        return torch.zeros(weight_shape, dtype=dy.dtype, device=dy.device)
    if bn is not None and in_scale is not None:
        from . import bn as _bn

        dy = _bn.bn_apply_coefs(dy, *bn)
        bn = None
    n_split = _config.wgrad_splits(m, kg, j, groups)
    chunk = triton.cdiv(triton.cdiv(m, n_split), 256) * 256
    n_split = triton.cdiv(m, chunk)
    # partial sums [groups * n_split, KG, R*S, CG]: j = (r*S + s)*CG + c innermost
    part = torch.empty((groups * n_split, kg, r * s, cg), dtype=sd, device=dy.device)
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
    tap_cols = _config.wgrad_tap_cols(cg)
    # the operand loaded through registers (transformed by the prologue, or gathered with
    # loads too narrow for asynchronous copies) is the MMA's A
    gather = not _rows_aligned(x, cg)
    x_rows = in_scale is not None or gather
    flags = dict(HAS_PRO=in_scale is not None, IN_RELU=bool(in_relu), DY_PRO=bn is not None,
                 ACC64=dy.dtype == torch.float64,
                 TF32=_tf32(dy.dtype), UPCAST=_upcast(dy.dtype), TAP_COLS=tap_cols, X_ROWS=x_rows, GATHER=gather)

    def grid(bm, bn):
        jb = bm if x_rows else bn
        cols = r * s * triton.cdiv(cg, jb) if tap_cols else triton.cdiv(j, jb)
        if x_rows:
            return cols, triton.cdiv(kg, bn), groups * n_split
        return triton.cdiv(kg, bm), cols, groups * n_split

    _config.launch("wgrad", _conv_wgrad_kernel, grid, args, flags,
                   _problem(n, c, h, w, k, p, q, r, s, stride, padding, dilation, cg, kg, dy.element_size()))
    # fixed-order sum of the split partials (deterministic), then (r, s, c) -> (c, r, s)
    dw = part.view(groups, n_split, kg, r * s, cg).sum(dim=1)
    return dw.permute(0, 1, 3, 2).reshape(weight_shape).to(dy.dtype, memory_format=torch.contiguous_format)
