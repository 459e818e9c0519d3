"""Owns the numbers of GEAR's block encode that the Triton write kernel and its PyTorch reference
must share bit for bit (triton_kernels/cache_write.py, reference/gear.py): both read them from here,
so neither the kernel depends on its oracle nor the oracle on the kernel."""

ZSCORE_EPS = 1e-6
"""Keeps an outlier z-score |x - mean| / (std + eps) finite in constant groups."""
POWER_ITER_EPS = 1e-12
"""Keeps a power-iteration step's normalization finite when the residual is zero."""
GOLDEN = 0.6180339887498949
"""Power iteration starts from the golden-ratio sequence (c * GOLDEN) mod 1 - 0.5, c = 1..length:
deterministic, so the kernel and the reference start from the same vector on every device."""
