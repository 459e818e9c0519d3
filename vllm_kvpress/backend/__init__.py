"""The vLLM attention backend of vllm-kvpress, registered in vLLM's CUSTOM slot.

- backend.py: KVPressBackend (stateless capabilities and cache shape)
- metadata.py: KVPressMetadata and KVPressMetadataBuilder (per-batch host work, persistent buffers)
- impl.py: KVPressImpl (picks views, calls one kernel wrapper per phase, compacts evicting requests)
- spec.py: the compressed KV-cache specs (plain, and of methods that evict tokens)
- block_manager.py: the scheduler-side manager that returns evicted blocks to vLLM's pool
- runner.py: what the backend needs of the model runner vLLM picked
- state.py: how the backend reads the active method inside vLLM processes

The backend calls the method's hooks (methods/base.py) and never imports a method; the patches
that hand it to vLLM are in vllm_kvpress/vllm_patches.py.
"""
