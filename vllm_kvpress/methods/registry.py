"""Owns the table of KV-compression methods: the names users type, the class behind each, and the
papers still to come.

A method is found among the package's own classes (`BUILT_IN`), then among the classes other
packages publish in the `vllm_kvpress.methods` entry-point group:

    # the other package's pyproject.toml
    [project.entry-points."vllm_kvpress.methods"]
    knorm = "my_package.knorm:KNorm"

Entry points load at the first lookup, in whichever process asks (API server, engine core, every
worker: the same as vLLM's own plugins, so the package must be installed wherever vLLM runs). A
package that fails to load is reported when its method is asked for, and does not break the others.
"""

import functools
import logging
from dataclasses import dataclass, replace
from importlib import metadata

from vllm_kvpress.errors import KVCompressionConfigError, MethodNotImplementedError
from vllm_kvpress.methods.base import CompressionMethod, Family, MethodInfo, Status
from vllm_kvpress.methods.gear import Gear
from vllm_kvpress.methods.kivi import Kivi
from vllm_kvpress.methods.kvcrush import KVCrush
from vllm_kvpress.methods.mikv import MiKV
from vllm_kvpress.methods.minicache import MiniCache
from vllm_kvpress.methods.razor import Razor
from vllm_kvpress.methods.scissorhands import Scissorhands
from vllm_kvpress.methods.sentencekv import SentenceKV
from vllm_kvpress.methods.snapkv import SnapKV
from vllm_kvpress.methods.xkv import XKV
from vllm_kvpress.methods.zipvl import ZipVL

logger = logging.getLogger("vllm.kvpress")

ENTRY_POINT_GROUP = "vllm_kvpress.methods"
BUILT_IN: tuple[type[CompressionMethod], ...] = (Kivi, Gear, MiKV, ZipVL, KVCrush, Scissorhands, SnapKV, Razor, XKV,
                                                MiniCache, SentenceKV)

PLANNED = (
    MethodInfo("ems", "EMS: adaptive evict-then-merge strategy for head-wise KV-cache compression", "2412.08521",
               Family.EVICTION_MERGE, "global-local scores, head-wise evict-then-merge", Status.PLANNED),
    MethodInfo("loopserve", "LoopServe: adaptive dual-phase LLM inference acceleration for multi-turn dialogues",
               "2507.13681", Family.ADAPTIVE, "online prefill sparsification + progressive decode-time compression",
               Status.PLANNED),
    MethodInfo("speckv", "SpecKV / SpecPC: draft-based approximate inference", "2506.08373", Family.DRAFT_GUIDED,
               "a small draft model's attention picks the KV and prompt tokens to keep", Status.PLANNED),
    MethodInfo("x-ecomla", "X-EcoMLA: upcycling pre-trained attention into MLA", "2503.11132",
               Family.OFFLINE_WEIGHTS, "attention to MLA latent KV via SVD init + light distillation, an offline tool",
               Status.PLANNED),
    MethodInfo("lococo", "LoCoCo: dropping in convolutions for long context compression", "2406.05317",
               Family.LEARNED, "fixed-size cache via learned 1-D convolution mixing", Status.PLANNED),
    MethodInfo("sigma-diffqkv", "Sigma: differential rescaling of query, key and value (DiffQKV)", "2501.13629",
               Family.ASYMMETRIC_KV, "differently compressed K and V (bits, heads, dims)", Status.PLANNED),
    MethodInfo("sub-moe", "Sub-MoE: efficient MoE compression via subspace expert merging", "2506.23266",
               Family.OFFLINE_WEIGHTS, "subspace expert merging: an offline tool producing a smaller checkpoint",
               Status.PLANNED),
)
"""Seed papers not implemented yet: they keep their row (and a clear refusal) until they land."""
OFFLINE_TOOLS = (
    MethodInfo("kv-head-compress", "Effectively compress KV heads for LLM", "2406.07056", Family.OFFLINE_WEIGHTS,
               "fewer KV heads: a GQA checkpoint from a KV-cache SVD on calibration text (RoPE-aware keys)",
               Status.OFFLINE_TOOL),
)
"""Seed papers implemented as checkpoint conversions (`vllm-kvpress convert`), not `--kv-compression`."""
TABLE_ORDER = ("kivi", "gear", "mikv", "zipvl", "kvcrush", "scissorhands", "snapkv", "ems", "razor", "loopserve",
               "sentencekv", "speckv", "minicache", "xkv", "kv-head-compress", "x-ecomla", "lococo",
               "sigma-diffqkv", "sub-moe")
"""Order of the methods table: the design's, by family; methods from other packages follow by name."""


@dataclass(frozen=True)
class OutsideMethods:
    """What the entry-point group holds, loaded once per process."""

    classes: dict[str, type[CompressionMethod]]
    sources: dict[str, str]
    """Name -> the distribution that provides it."""
    failed: dict[str, str]
    """Name -> why it could not be loaded."""


@functools.cache
def _outside_methods() -> OutsideMethods:
    built_in = {cls.info.name for cls in BUILT_IN}
    loaded: dict[str, type[CompressionMethod]] = {}
    sources: dict[str, str] = {}
    failed: dict[str, str] = {}
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        source = entry.dist.name if entry.dist is not None else "an unknown distribution"
        try:
            cls = entry.load()
        except Exception as e:  # another package's import error must not break every method
            failed[entry.name] = f"{entry.value} (from {source}) failed to import: {type(e).__name__}: {e}"
            logger.warning("vllm-kvpress: method %s %s", entry.name, failed[entry.name])
            continue
        problem = _entry_problem(entry.name, cls, built_in | set(loaded))
        if problem:
            failed[entry.name] = f"{entry.value} (from {source}) {problem}"
            logger.warning("vllm-kvpress: method %s %s", entry.name, failed[entry.name])
            continue
        loaded[entry.name], sources[entry.name] = cls, source
    return OutsideMethods(loaded, sources, failed)


def _entry_problem(name: str, cls, taken: set[str]) -> str | None:
    if not (isinstance(cls, type) and issubclass(cls, CompressionMethod) and isinstance(
            getattr(cls, "info", None), MethodInfo)):
        return "is not a CompressionMethod subclass with an `info` (vllm_kvpress.methods.base)"
    if cls.info.name != name:
        return f"names itself {cls.info.name!r}; the entry point and `info.name` must agree"
    if name in taken:
        return "takes a name another method has"
    return None


def method_classes() -> dict[str, type[CompressionMethod]]:
    """Every available method: the built-in ones, then those of other packages."""
    return {cls.info.name: cls for cls in BUILT_IN} | _outside_methods().classes


def method_table() -> list[MethodInfo]:
    """Every row of the methods table: available methods and planned papers, in `TABLE_ORDER`."""
    rows = {info.name: info for info in PLANNED + OFFLINE_TOOLS}
    rows |= {cls.info.name: cls.info for cls in BUILT_IN}
    outside = _outside_methods()
    rows |= {name: replace(cls.info, source=outside.sources[name]) for name, cls in outside.classes.items()}
    ordered = [rows.pop(name) for name in TABLE_ORDER if name in rows]
    return ordered + [rows[name] for name in sorted(rows)]


def available_method_names() -> list[str]:
    return [info.name for info in method_table() if info.status is Status.AVAILABLE]


def method_class(name) -> type[CompressionMethod]:
    """The class of method `name`.

    Raises:
        KVCompressionConfigError: an unknown name (the allowed ones are listed), or a method whose
            package failed to load (its error is named).
        MethodNotImplementedError: a seed paper that is planned but not implemented yet.
        KVCompressionConfigError: a seed paper implemented as an offline conversion (`OFFLINE_TOOLS`).
    """
    if not isinstance(name, str):
        raise KVCompressionConfigError(
            f"method={name!r} is not allowed; allowed: a method name, one of "
            f"{', '.join(sorted(info.name for info in method_table()))}"
        )
    classes = method_classes()
    if name in classes:
        return classes[name]
    failed = _outside_methods().failed
    if name in failed:
        raise KVCompressionConfigError(f"method={name!r} could not be loaded: {failed[name]}")
    if name in {info.name for info in OFFLINE_TOOLS}:
        raise KVCompressionConfigError(
            f"--kv-compression {name}: it converts a checkpoint offline, it is not a run-time method; run "
            f"`vllm-kvpress convert {name} MODEL OUT ...` and serve OUT (with any --kv-compression method on top)"
        )
    planned = {info.name: info for info in PLANNED}
    if name in planned:
        raise MethodNotImplementedError(
            f"--kv-compression {name}: {planned[name].paper} is planned but not implemented yet "
            f"in vllm-kvpress; available now: {', '.join(available_method_names())}"
        )
    raise KVCompressionConfigError(
        f"method={name!r} is unknown; allowed: {', '.join(sorted(info.name for info in method_table()))}"
    )


def format_methods_table() -> str:
    """The methods table as GitHub markdown, as printed by `vllm-kvpress methods`."""
    rows = ["| method | family | status | paper | what it does here |", "|---|---|---|---|---|"]
    for m in method_table():
        paper = f"{m.paper} (arXiv {m.arxiv})" if m.arxiv else m.paper
        status = m.status.value if m.source == "vllm-kvpress" else f"{m.status.value} ({m.source})"
        rows.append(f"| `{m.name}` | {m.family.value} | {status} | {paper} | {m.summary} |")
    return "\n".join(rows)
