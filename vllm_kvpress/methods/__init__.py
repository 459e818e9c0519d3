"""Owns the mapping from method names to their typed configs (the registry lives in registry.py)."""

from vllm_kvpress.methods.base import MethodConfig
from vllm_kvpress.methods.gear import GearConfig
from vllm_kvpress.methods.kivi import KiviConfig
from vllm_kvpress.methods.kvcrush import KVCrushConfig
from vllm_kvpress.methods.razor import RazorConfig
from vllm_kvpress.methods.registry import METHODS, MethodInfo, Status, available_method_names
from vllm_kvpress.methods.scissorhands import ScissorhandsConfig
from vllm_kvpress.methods.snapkv import SnapKVConfig

CONFIG_CLASSES: dict[str, type[MethodConfig]] = {
    cls.method: cls for cls in (KiviConfig, GearConfig, KVCrushConfig, RazorConfig, ScissorhandsConfig, SnapKVConfig)
}

__all__ = ["CONFIG_CLASSES", "METHODS", "MethodConfig", "MethodInfo", "Status", "available_method_names"]
