"""Ray actors load the plugin from the installed package's entry points, as vLLM's Ray workers do.

vLLM's `RayWorkerWrapper` / `RayWorkerProc` call `load_general_plugins()` inside each actor; that
only works when the plugin distribution is installed on the node (entry points come from
`importlib.metadata`), which is what this test exercises on a local single-node Ray cluster.
"""

import ray  # a declared test dependency (the `test` extra); a missing ray must fail, not skip


@ray.remote(num_cpus=0)
class PluginProbe:
    def probe(self) -> dict:
        from vllm.plugins import load_general_plugins

        load_general_plugins()
        from vllm.engine.arg_utils import EngineArgs
        from vllm.v1.attention.backends.registry import AttentionBackendEnum

        return {
            "custom_path": AttentionBackendEnum.CUSTOM.get_path(),
            "engine_args_patched": getattr(EngineArgs, "_kvpress_patched", False),
        }


def test_plugin_registers_inside_a_ray_actor():
    from vllm_kvpress.vllm_patches import BACKEND_PATH

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        probe = PluginProbe.remote()
        assert ray.get(probe.probe.remote(), timeout=240) == {"custom_path": BACKEND_PATH, "engine_args_patched": True}
    finally:
        ray.shutdown()
