"""Token eviction that returns paged blocks to vLLM, as mechanisms every evicting method shares: the
kept-block schedule, the compaction of kept tokens into a request's first blocks (head-wise packed
too), the compacted block-table view, the window statistics the methods' scorers read, and which
steps compact. Which tokens stay is each method's rule (methods/); the block manager that frees the
blocks is the backend's (backend/block_manager.py)."""
