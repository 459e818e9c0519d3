"""Owns what the backend needs of the model runner vLLM picked: evicting methods and exact tail keys
read each row's prompt length and request-state slot, which only vLLM's V2 model runner hands over
(through vllm_kvpress/vllm_patches.py)."""


def needs_runner_rows(method) -> bool:
    """Whether the metadata builder reads each row's prompt length and request-state slot: for
    eviction (compaction steps, the compacted view, the recent queries) and exact tail keys."""
    return method.evicts_tokens or method.pages.exact_tail_keys


def runner_problems(vllm_config, method) -> list[str]:
    """What the settings need of the model runner vLLM picked for this engine (its V2 runner for
    dense decoder models unless VLLM_USE_V2_MODEL_RUNNER=0): checked when the engine config is made,
    before any model loads, and by the metadata builder of every worker."""
    if vllm_config.use_v2_model_runner:
        return []
    problems = []
    if method.evicts_tokens:
        problems.append(
            f"method '{method.method}' evicts tokens and needs vLLM's V2 model runner, which vLLM uses "
            "for dense (non-MoE) decoder models; allowed: such a model without VLLM_USE_V2_MODEL_RUNNER=0"
        )
    if method.pages.exact_tail_keys:
        problems.append(
            "tail_keys='exact' keeps each request's partial block under its request-state slot, which only "
            "vLLM's V2 model runner hands over; allowed: a model vLLM runs on it (dense decoder models) "
            "without VLLM_USE_V2_MODEL_RUNNER=0, or tail_keys='staged' or 'auto'"
        )
    return problems
