"""Owns the quality harness `vllm-kvpress eval`: tasks, engines, scoring, result files."""
