"""Owns what the eval harness reads from inside vLLM's workers: the selection rule's records.

The method's rule runs in vLLM's worker processes, out of the harness's sight; vLLM mixes this class
into its worker class (`worker_extension_cls`), and the harness calls it through
`LLM.collective_rpc`.
"""

WORKER_EXTENSION = "vllm_kvpress.eval.engines.worker_extension.SelectionRecords"
"""The `worker_extension_cls` the harness's vLLM engine passes."""


class SelectionRecords:
    """Mixed into vLLM's worker: the records of the method's selection rule in this worker."""

    def drain_important_shares(self) -> list[tuple[int | None, list[float]]]:
        """(layer, the important share of each selection since the last drain) per layer
        (`eviction/attention_mass.py` `ChosenRatios`): pairs, which vLLM's RPC carries as lists."""
        from vllm_kvpress.eviction.attention_mass import ChosenRatios

        return list(ChosenRatios.drain().items())
