"""Owns `vllm-kvpress bench` and `vllm-kvpress report`: KV capacity and throughput of vLLM with and
without compressed pages, on real architectures with dummy weights.

Modules, one idea each:
    models.py      the architectures we benchmark (config-only model directories in model_configs/)
    workloads.py   the fixed workloads and their deterministic prompts
    configs.py     what a benchmark configuration is (`fp8`, `gear:{"bits":2}`) and the vLLM settings
                   it implies, offline (`vllm.LLM` keyword arguments) and online (`vllm serve` flags)
    figures.py     arithmetic turning raw measurements into the reported figures
    gpu.py         GPU name and device-level memory through NVML
    environment.py versions, git commit, the command line
    offline.py     the per-configuration worker process: `vllm.LLM` + `generate`
    loadgen.py     the streaming HTTP client of online mode (`vllm bench serve`-style)
    online.py      `vllm serve` lifecycle + load generation for one configuration
    runner.py      one benchmark invocation: a fresh process per configuration, deadline, resume
    results.py     the result files and the run directory
    tables.py      markdown and terminal tables
    quality.py     quality scores read from eval result files, matched to configurations
    plots.py       PNG figures
    cli.py         `vllm-kvpress bench`;  report.py: `vllm-kvpress report`

vLLM and torch are imported only inside functions of offline.py: the parent process of a benchmark
never touches the GPU, so each configuration's process gets all of it and frees all of it.
"""
