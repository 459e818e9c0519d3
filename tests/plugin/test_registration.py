"""The plugin loads through vLLM's entry points in a fresh process and changes nothing unless asked."""

import json
import os
import subprocess
import sys

from vllm_kvpress.vllm_patches import BACKEND_PATH

PROBE = """
import json
from vllm.plugins import load_general_plugins
load_general_plugins()
from vllm.v1.attention.backends.registry import AttentionBackendEnum
from vllm.engine.arg_utils import EngineArgs
from vllm.model_executor.layers.attention.attention import Attention
try:
    custom_path = AttentionBackendEnum.CUSTOM.get_path()
    backend_name = AttentionBackendEnum.CUSTOM.get_class().get_name()
except ValueError:  # "Backend CUSTOM must be registered before use"
    custom_path = backend_name = None
print(json.dumps({
    "custom_path": custom_path,
    "backend_name": backend_name,
    "engine_args_patched": getattr(EngineArgs, "_kvpress_patched", False),
    "spec_patched": getattr(Attention.get_kv_cache_spec, "_kvpress_wrapped", False),
}))
"""


def _probe(env_extra=None) -> dict:
    env = {**os.environ, **(env_extra or {})}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_entry_point_registers_backend_and_patches_in_a_fresh_process():
    probe = _probe()
    assert probe == {
        "custom_path": BACKEND_PATH,
        "backend_name": "CUSTOM",
        "engine_args_patched": True,
        "spec_patched": True,
    }


def test_register_is_idempotent(cpu_platform):  # register() imports vLLM runner modules, which bind the platform
    from vllm.engine.arg_utils import EngineArgs

    from vllm_kvpress import plugin

    plugin.register()
    add_once = EngineArgs.add_cli_args
    plugin._registered = False  # force the body to run again
    plugin.register()
    assert EngineArgs.add_cli_args is add_once


def test_plugin_can_be_excluded_by_vllm_plugins_allowlist():
    probe = _probe({"VLLM_PLUGINS": "lora_filesystem_resolver"})
    assert probe == {"custom_path": None, "backend_name": None, "engine_args_patched": False, "spec_patched": False}
