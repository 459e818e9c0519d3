"""Token eviction that returns paged blocks to vLLM: the kept-block rule, the block manager, the
compacted block-table view and the importance scores that choose which tokens stay."""
