"""Owns `vllm-kvpress soak`: one real `vllm serve` per configuration under mixed, hostile traffic for
a set time, with correctness probes, leak checks after idle periods, and the gauges over time.

Modules, one idea each:
    plan.py          the traffic plan: phases, request shapes, bursts, cancels; a pure function of a seed
    served_model.py  what `--model` names: the directory vLLM loads, its weights, context and vocabulary
    probes.py        the greedy correctness probes (needles in essays) and the comparison of their rounds
    client.py        one request on the wire: streamed or not, closed early on purpose, and its outcome
    sampler.py       vLLM's gauges, preemption counter and GPU memory sampled over time
    driver.py        runs a plan against one server: phases, probe rounds, idle periods and leak checks
    summary.py       the figures drawn from a soak's record (pure functions) and the markdown summary
    plots.py         PNG plots of the gauges over time
    side_by_side.py  how servers side by side share one GPU: the memory split and the checks that refuse it
    runner.py        one invocation: a server per configuration, started and stopped as bench's online mode does,
                     one after another or all at once (side by side)
    cli.py           `vllm-kvpress soak`

Servers are started and stopped by `bench/online.py`, requests are built and parsed by
`bench/loadgen.py`, configurations are `bench/configs.py`'s, and the probes are `eval/niah.py`'s.
"""
