"""The vLLM attention backend of vllm-kvpress, registered in vLLM's CUSTOM slot.

- backend.py: KVPressBackend (stateless capabilities and cache shape)
- metadata.py: KVPressMetadata and KVPressMetadataBuilder (per-batch host work, persistent buffers)
- impl.py: KVPressImpl (picks views, calls one kernel wrapper per phase)
- spec.py: the compressed KV-cache spec and the patch that hands it to vLLM
- state.py: reading the active compression settings inside vLLM processes
"""
