"""Owns the contract every method config fulfils: typed fields, validation that lists every problem."""

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

SUPPORTED_HEAD_SIZES = (64, 128)
"""Head sizes the Triton kernels are built and tested for (power-of-two tiles)."""


def check_choice(name: str, value: Any, allowed: tuple, problems: list[str]) -> None:
    if value not in allowed or isinstance(value, bool):
        shown = ", ".join(repr(a) if isinstance(a, str) else str(a) for a in allowed)
        problems.append(f"{name}={value!r} is not allowed; allowed: {shown}")


def check_range(name: str, value: Any, low: int, high: int, problems: list[str]) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        problems.append(f"{name}={value!r} is not allowed; allowed: an integer from {low} to {high}")


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method's settings. Subclasses are frozen dataclasses with no defaults:
    the defaults live in `configs/<method>.yaml`, the single source of each default number."""

    method: ClassVar[str]
    supports_tensor_parallel: ClassVar[bool] = True
    """False where the method needs every KV head of a layer in one process."""

    def problems(self) -> list[str]:
        """Every field-level problem, as 'field=value is not allowed; allowed: ...' lines."""
        return []

    def problems_for_model(self, *, head_size: int, num_kv_heads: int, max_model_len: int) -> list[str]:
        """Problems that show only once the model is known (head size, context length)."""
        problems: list[str] = []
        if head_size not in SUPPORTED_HEAD_SIZES:
            problems.append(
                f"the model's head size {head_size} is not supported by method '{self.method}'; "
                f"supported head sizes: {', '.join(map(str, SUPPORTED_HEAD_SIZES))}"
            )
        return problems

    @property
    def evicts_tokens(self) -> bool:
        """Whether the method frees blocks of dropped tokens (needs prefix caching off)."""
        return False

    @property
    def exact_tail_keys(self) -> bool:
        """Whether partial blocks' keys are kept exact beside the pages (`tail_keys: exact` of the
        quantized pages, methods/kivi.py): they need vLLM's V2 model runner."""
        return False

    def resolve_tail_keys(self, exact_available: bool) -> "MethodConfig":
        """This config with its engine-dependent settings made concrete (`tail_keys: auto` of the
        quantized pages, methods/kivi.py); `exact_available`: the engine can keep exact tails."""
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}
