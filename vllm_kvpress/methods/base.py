"""Owns the contract every method fulfils: its registry entry, its settings with their defaults,
their validation, and the hooks the engine calls.

A method is a frozen dataclass subclass of `CompressionMethod`:

- `info`: its row of the methods table (name users type, paper, arXiv id, family, one line);
- dataclass fields with defaults: its settings, the single source of each default number;
- `problems()` / `problems_for_model()`: every bad setting as one message line;
- hooks, called by the vLLM backend, the eviction machinery and the reference engine:
    `pages`      the quantizer whose page format holds the KV (methods/kivi.py and subclasses)
    `eviction`   None, or the object whose budget schedule, scorer and head policy decide which
                 tokens leave (methods/eviction.py)
    `for_engine` the settings made concrete once the engine is known (`tail_keys: auto`)

The engine only calls hooks: it never asks a method its name to decide what to do. docs/methods.md
has the contract with a worked example.
"""

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar, Self

from vllm_kvpress.errors import KVCompressionConfigError
from vllm_kvpress.layout import SUPPORTED_HEAD_SIZES


class Status(StrEnum):
    AVAILABLE = "available"
    REFERENCE_ONLY = "reference engine only"
    """Implemented in the reference engine; its vLLM path has not passed its GPU tests, so vLLM
    refuses it (engine_args.ALLOW_UNVERIFIED_ENV lets developers run those tests)."""
    OFFLINE_TOOL = "offline: vllm-kvpress convert"
    """A checkpoint conversion, not a run-time method: its output is served like any model, with any
    `--kv-compression` method on top."""
    PLANNED = "planned"


class Family(StrEnum):
    QUANTIZATION = "quantization"
    ERROR_CORRECTION = "quantization + error correction"
    MIXED_PRECISION = "mixed precision"
    EVICTION = "eviction"
    EVICTION_MERGE = "eviction + merge"
    HEAD_WISE = "head-wise"
    ADAPTIVE = "adaptive, multi-turn"
    RETRIEVAL = "semantic retrieval"
    DRAFT_GUIDED = "draft-guided"
    CROSS_LAYER = "cross-layer"
    OFFLINE_WEIGHTS = "offline weight transform"
    LEARNED = "learned fusion"
    ASYMMETRIC_KV = "asymmetric K/V"


@dataclass(frozen=True)
class MethodInfo:
    """A method's row of the methods table (`vllm-kvpress methods`)."""

    name: str
    """What users type after `--kv-compression`."""
    paper: str
    arxiv: str | None
    """arXiv id of the paper, or None where none is known."""
    family: Family
    summary: str
    """One line: what the method does in this system."""
    status: Status = Status.AVAILABLE
    source: str = "vllm-kvpress"
    """The distribution that provides it (another package's name for a method from outside)."""


def check_choice(name: str, value: Any, allowed: tuple, problems: list[str]) -> None:
    if value not in allowed or isinstance(value, bool):
        shown = ", ".join(repr(a) if isinstance(a, str) else str(a) for a in allowed)
        problems.append(f"{name}={value!r} is not allowed; allowed: {shown}")


def check_range(name: str, value: Any, low: int, high: int, problems: list[str]) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        problems.append(f"{name}={value!r} is not allowed; allowed: an integer from {low} to {high}")


def setting_names(cls: type) -> list[str]:
    """The settings a method class takes: its dataclass fields."""
    return [f.name for f in dataclasses.fields(cls)]


@dataclass(frozen=True)
class CompressionMethod:
    """Base of every method. Subclasses are frozen dataclasses whose fields all have defaults."""

    info: ClassVar[MethodInfo]
    supports_tensor_parallel: ClassVar[bool] = True
    """False where the method needs every KV head of a layer in one process."""

    # -- settings ------------------------------------------------------------------------------
    @property
    def method(self) -> str:
        """The name users type (`info.name`); the key "method" of `to_dict`."""
        return self.info.name

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], lookup: Callable[[str], type] | None = None) -> Self:
        """The method with `settings` (a mapping of field names to values) over its defaults.

        `lookup` finds another method class by name (the registry's `method_class`), for methods
        whose settings name another method (an evicting method's `pages`).

        Raises:
            KVCompressionConfigError: an unknown setting (the allowed ones are listed) or a value
                out of range (every problem is listed).
        """
        allowed = setting_names(cls)
        unknown = sorted(set(settings) - set(allowed))
        if unknown:
            raise KVCompressionConfigError(
                f"unknown setting(s) {', '.join(unknown)} for method '{cls.info.name}'; allowed: {', '.join(allowed)}"
            )
        return cls(**settings).validated()

    def validated(self) -> Self:
        """This method, or KVCompressionConfigError listing every problem of `problems()`."""
        problems = [f"{self.method}: {p}" for p in self.problems()]
        if problems:
            raise KVCompressionConfigError(problems)
        return self

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

    def for_engine(self, *, exact_tails_available: bool) -> Self:
        """This method with its engine-dependent settings made concrete (`tail_keys: auto` of the
        quantized pages); `exact_tails_available`: the engine can keep exact tails (vLLM's V2 model
        runner, or the reference engine)."""
        return self

    def to_dict(self) -> dict[str, Any]:
        """Every setting, flat and JSON-serializable, with the name under "method": what vLLM
        carries to every process in `additional_config` and what `from_settings` reads back."""
        return {"method": self.method, **dataclasses.asdict(self)}

    @property
    def runs_on_vllm(self) -> bool:
        """Whether vLLM can serve it (`Status.REFERENCE_ONLY` methods run on the reference engine)."""
        return self.info.status == Status.AVAILABLE

    # -- hooks ---------------------------------------------------------------------------------
    @property
    def pages(self):
        """The quantizer whose pages hold this method's KV: a `Kivi` (methods/kivi.py) or subclass,
        which gives the page layout, the encode settings and the block size."""
        raise NotImplementedError(f"method '{self.method}' names no page format (its `pages` hook)")

    @property
    def eviction(self):
        """None for a method that keeps every token; else the `EvictingMethod`
        (methods/eviction.py) whose budget schedule, scorer and head policy the engine follows."""
        return None

    def layer_groups(self, num_layers: int) -> list[range] | None:
        """Cross-layer policy: None where each layer keeps its own KV; else the groups of layers whose
        prompt KV is factored together after prefill (`factor_group`: methods/xkv.py)."""
        return None

    @property
    def evicts_tokens(self) -> bool:
        """Whether the method frees blocks of dropped tokens (needs prefix caching off)."""
        return self.eviction is not None

    @property
    def block_size(self) -> int:
        """Tokens per vLLM block: the page format's."""
        return self.pages.block_size

    def page_layout(self, head_size: int):
        """The byte layout of one page (`vllm_kvpress.layout.PageLayout`) for this head size."""
        return self.pages.page_layout(head_size)
