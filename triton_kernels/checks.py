"""Owns argument checking for the kernel wrappers: one checker, messages that name the tensor."""

import torch


def check_tensor(
    name: str,
    tensor: torch.Tensor,
    *,
    dtype: torch.dtype | tuple[torch.dtype, ...] | None = None,
    ndim: int | None = None,
    shape: tuple[int | None, ...] | None = None,
    device: torch.device | None = None,
    last_dim_contiguous: bool = True,
) -> None:
    """Raise ValueError naming `name`, what was expected and what was given."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"Invalid {name}: expected a torch.Tensor, got {type(tensor).__name__}")
    if dtype is not None:
        allowed = dtype if isinstance(dtype, tuple) else (dtype,)
        if tensor.dtype not in allowed:
            raise ValueError(f"Invalid dtype of {name}: expected {' or '.join(map(str, allowed))}, got {tensor.dtype}")
    if ndim is not None and tensor.ndim != ndim:
        raise ValueError(f"Invalid rank of {name}: expected {ndim} dims, got shape {tuple(tensor.shape)}")
    if shape is not None:
        if len(shape) != tensor.ndim or any(s is not None and s != t for s, t in zip(shape, tensor.shape)):
            shown = tuple("*" if s is None else s for s in shape)
            raise ValueError(f"Invalid shape of {name}: expected {shown}, got {tuple(tensor.shape)}")
    if device is not None and tensor.device != device:
        raise ValueError(f"Invalid device of {name}: expected {device}, got {tensor.device}")
    if last_dim_contiguous and tensor.ndim and tensor.stride(-1) != 1:
        raise ValueError(f"Invalid layout of {name}: the last dim must be contiguous, strides {tensor.stride()}")
