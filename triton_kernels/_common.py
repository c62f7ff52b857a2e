"""Small device functions shared by the kernels."""

import triton
import triton.language as tl


@triton.jit
def to_storage(v, dtype: tl.constexpr, EXACT_BF16: tl.constexpr):
    """``v.to(dtype)`` with round-to-nearest-even. On a GPU that is what the conversion does;
    Triton's interpreter converts float32 to bfloat16 differently, so there (EXACT_BF16) the
    value is first rounded to the nearest bfloat16 in float32 bits, making the conversion exact.
    Other target dtypes ignore the flag (callers pass one flag for any 16-bit storage)."""
    if EXACT_BF16 and dtype == tl.bfloat16:
        u = v.to(tl.float32).to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        v = r.to(tl.float32, bitcast=True)
    return v.to(dtype)


@triton.jit
def relu(v):
    """max(v, 0) keeping NaN as NaN, like torch.relu (a plain max returns 0 for NaN on GPUs)."""
    return tl.maximum(v, 0.0, propagate_nan=tl.PropagateNan.ALL)
