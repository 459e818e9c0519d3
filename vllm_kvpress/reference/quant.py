"""Owns asymmetric group-wise quantization and bit packing, in plain PyTorch.

Assumptions: a group is the last dimension of the tensor passed in (callers transpose or reshape
to put K channels or V token groups there); scales and zeros are stored as fp16 and the codes are
computed against those *stored* fp16 values, so dequantization from the page reproduces exactly
what was quantized. Rounding is floor(x + 0.5), the same in the Triton kernels.
"""

import torch

MAX_BITS = 8


def qmax(bits: int) -> int:
    return (1 << bits) - 1


def _divide(x: torch.Tensor, divisor) -> torch.Tensor:
    """IEEE x / divisor on every device. PyTorch's CUDA kernels multiply by the reciprocal of a
    Python-number divisor, which rounds differently from the kernels' division; a tensor divisor
    takes the true division path."""
    return x / torch.as_tensor(divisor, dtype=x.dtype, device=x.device)


def quantize_groups(
    x: torch.Tensor, bits: int, exclude: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize each group (last dim of `x`) to `bits`-bit unsigned codes.

    Args:
        x: shape = [..., group_len], any float dtype (computed in fp32).
        bits: 2, 4 or 8.
        exclude: optional bool mask like `x`; excluded entries (outliers) do not set the group's
            range. Their codes are clamped into it.
    Returns:
        codes uint8 [..., group_len], scale fp16 [...], zero fp16 [...] with
        x ~ codes * scale + zero.
    """
    x = x.float()
    if exclude is None:
        lo, hi = x.amin(-1), x.amax(-1)
    else:
        lo = torch.where(exclude, torch.inf, x).amin(-1)
        hi = torch.where(exclude, -torch.inf, x).amax(-1)
        empty = torch.isinf(lo)  # every entry excluded: degenerate group
        lo, hi = torch.where(empty, 0.0, lo), torch.where(empty, 0.0, hi)
    scale = _divide(hi - lo, float(qmax(bits))).half()
    zero = lo.half()
    s, z = scale.float().unsqueeze(-1), zero.float().unsqueeze(-1)
    safe_s = torch.where(s > 0, s, torch.ones_like(s))
    codes = torch.floor((x - z) / safe_s + 0.5).clamp(0, qmax(bits))
    codes = torch.where(s > 0, codes, torch.zeros_like(codes))
    return codes.to(torch.uint8), scale, zero


def quantize_groups_symmetric(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize each group (last dim) over the symmetric range [-max|x|, max|x|]: only a scale is stored.

    Returns codes uint8 [..., group_len] and scale fp16 [...] with x ~ (codes - qmax/2) * scale.
    """
    x = x.float()
    scale = _divide(2 * x.abs().amax(-1), float(qmax(bits))).half()
    s = scale.float().unsqueeze(-1)
    safe_s = torch.where(s > 0, s, torch.ones_like(s))
    codes = torch.floor(x / safe_s + qmax(bits) / 2 + 0.5).clamp(0, qmax(bits))
    codes = torch.where(s > 0, codes, torch.full_like(codes, float(qmax(bits) // 2)))
    return codes.to(torch.uint8), scale


def dequantize_groups_symmetric(codes: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `quantize_groups_symmetric` (fp32)."""
    return (codes.float() - qmax(bits) / 2) * scale.float().unsqueeze(-1)


def dequantize_groups(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Inverse of `quantize_groups` (fp32): codes [..., n], scale/zero [...]."""
    return codes.float() * scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack `bits`-bit codes along the last dim into bytes, first code in the lowest bits.

    codes uint8 [..., n] with n * bits divisible by 8 -> uint8 [..., n * bits // 8].
    """
    per_byte = 8 // bits
    grouped = codes.to(torch.int32).reshape(*codes.shape[:-1], codes.shape[-1] // per_byte, per_byte)
    shifts = torch.arange(per_byte, device=codes.device, dtype=torch.int32) * bits
    return (grouped << shifts).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack_codes`: uint8 [..., m] -> uint8 [..., m * 8 // bits]."""
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=packed.device, dtype=torch.int32) * bits
    codes = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & qmax(bits)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per_byte).to(torch.uint8)
