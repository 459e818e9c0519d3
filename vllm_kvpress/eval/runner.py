"""Owns one evaluation: the typed `EvalConfig`, building the samples once, and running every method
of the config on its engine (one engine at a time), scoring, and writing the result directory.
"""

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from vllm_kvpress.eval import multiturn, niah, perplexity, results, ruler
from vllm_kvpress.eval.samples import Sample
from vllm_kvpress.eval.scoring import score_task

TASKS = ("niah", "ruler", "multiturn", "multiturn-position", "ppl", "decode-ppl")
DEFAULT_TASKS = ("niah", "ruler", "multiturn", "ppl")
"""What `--tasks` runs by default: decode-ppl only runs on the reference engine."""
UNCOMPRESSED = "none"
VLLM_DTYPE_BYTES_VS_BF16 = {"auto": 1.0, "fp8": 0.5, "int4_per_token_head": 0.25}
"""Code bytes of vLLM's own KV dtypes over bf16's (int4: its per-token scales not counted)."""


@dataclass(frozen=True)
class MethodRun:
    """One row of the results: a method (or none) with its resolved settings."""

    method: str
    overrides: dict[str, Any]
    """Settings the user gave (--config), on top of the method's defaults."""
    resolved: dict[str, Any] | None
    """Every setting after validation (`CompressionMethod.to_dict()`); None for the uncompressed run."""

    @property
    def label(self) -> str:
        return results.run_slug(self.method, self.overrides)


@dataclass(frozen=True)
class EvalConfig:
    engine: str
    model: str
    """Embedded model name or checkpoint directory, as given."""
    model_path: str
    runs: tuple[MethodRun, ...]
    kv_cache_dtype: str
    tasks: tuple[str, ...]
    ruler_tasks: tuple[str, ...]
    lengths: tuple[int, ...]
    """NIAH, RULER and multi-turn prompt lengths in tokens."""
    depths: tuple[float, ...]
    """NIAH needle depths in percent of the haystack."""
    samples_per_length: int
    """RULER samples per task and length; multi-turn samples per length."""
    ppl_tokens: int
    ppl_windows: int
    prefill_chunk: int
    max_model_len: int
    seed: int
    quick: bool
    out: str
    device: str | None = None
    dtype: str | None = None
    gpu_memory_utilization: float = 0.85
    enforce_eager: bool = False

    def directory_name(self) -> str:
        model = results.slug(self.model.rstrip("/").split("/")[-1])
        name = f"{model}-{self.engine}-" + "+".join(run.label for run in self.runs)
        if self.kv_cache_dtype != "auto":
            name += f"-kv_{self.kv_cache_dtype}"
        return name + ("-quick" if self.quick else "")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def model_geometry(model_path: str) -> tuple[int, int, int]:
    """(head_size, num_kv_heads, num_layers) of a checkpoint, from its config."""
    from transformers import AutoConfig

    from vllm_kvpress.models import head_size

    config = AutoConfig.from_pretrained(model_path).get_text_config()
    return head_size(config), config.num_key_value_heads, config.num_hidden_layers


def kept_token_fraction(method_config, prompt_lengths: list[int], num_kv_heads: int | None = None,
                        head_size: int | None = None) -> float:
    """Tokens an eviction method stores after prefill over the prompt tokens, summed over prompts:
    the kept blocks plus each prompt's last partial block (`eviction.policy`); 1.0 for a method
    that evicts nothing or without prompts."""
    if not method_config.evicts_tokens or not prompt_lengths:
        return 1.0
    prompt_lengths = np.asarray(prompt_lengths, dtype=np.int64)
    bs = method_config.block_size
    kept = method_config.kept_prompt_blocks(prompt_lengths, num_kv_heads, head_size) * bs + prompt_lengths % bs
    return float(kept.sum() / prompt_lengths.sum())


def decoded_kv_fraction(method_config, prompt_len: int, num_tokens: int, num_kv_heads: int | None = None,
                        head_size: int | None = None) -> float:
    """Tokens attended to over the full cache's, summed over the decode steps of a `decode-ppl`
    window (sequence lengths prompt_len + 1 .. num_tokens - 1): each step reads its view, the
    sequence minus the blocks freed before it (`policy.freed_end`); 1.0 for a method that evicts
    nothing."""
    if not method_config.evicts_tokens:
        return 1.0
    from vllm_kvpress.eviction.policy import freed_end, kept_blocks

    bs = method_config.block_size
    packing = method_config.middle_packing(num_kv_heads, head_size) if num_kv_heads else None
    schedule = (method_config.budget, bs, packing, method_config.interval_blocks)
    seq = np.arange(prompt_len + 1, num_tokens, dtype=np.int64)
    freed = (freed_end(prompt_len, seq - 1, *schedule) - kept_blocks(prompt_len, *schedule)) * bs
    return float((seq - freed).sum() / seq.sum())


def compression_ratio(
    run: MethodRun, method_config, head_size: int, kv_cache_dtype: str, prompt_lengths: list[int] = (),
    num_kv_heads: int | None = None, num_layers: int | None = None,
) -> float:
    """Stored KV bytes over bf16 bytes of the full context: 1 / layout.compression_vs_bf16, times the
    kept-token fraction of the generation prompts for a method that evicts (`kept_token_fraction`);
    a cross-layer method's own count of the prompts' bytes (`kv_bytes_vs_bf16`: methods/xkv.py)."""
    if method_config is None:
        return VLLM_DTYPE_BYTES_VS_BF16[kv_cache_dtype]
    if num_layers is not None and prompt_lengths and method_config.layer_groups(num_layers) is not None:
        return method_config.kv_bytes_vs_bf16(list(prompt_lengths), num_layers, num_kv_heads, head_size)
    bytes_ratio = 1.0 / method_config.page_layout(head_size).compression_vs_bf16
    return bytes_ratio * kept_token_fraction(method_config, list(prompt_lengths), num_kv_heads, head_size)


def build_samples(config: EvalConfig, tokenizer) -> list[Sample]:
    samples: list[Sample] = []
    if "niah" in config.tasks:
        samples += niah.build_samples(tokenizer, list(config.lengths), list(config.depths), config.seed)
    if "ruler" in config.tasks:
        samples += ruler.build_samples(
            tokenizer, list(config.ruler_tasks), list(config.lengths), config.samples_per_length, config.seed
        )
    if "multiturn" in config.tasks:
        samples += multiturn.build_samples(
            tokenizer, list(config.lengths), config.samples_per_length, config.seed
        )
    if multiturn.POSITION_TASK in config.tasks:
        samples += multiturn.build_samples(
            tokenizer, list(config.lengths), config.samples_per_length, config.seed, multiturn.QUESTION_POSITIONS
        )
    for sample in samples:
        if sample.num_prompt_tokens + sample.max_tokens > config.max_model_len:
            raise ValueError(
                f"{sample.task} {sample.sample_id}: {sample.num_prompt_tokens} prompt + "
                f"{sample.max_tokens} generated tokens exceed --max-model-len {config.max_model_len}; "
                "use shorter --lengths"
            )
    return samples


def niah_grid(samples: list[Sample], correct: list[bool]) -> dict[str, dict[str, int]]:
    grid: dict[str, dict[str, int]] = {}
    for sample, ok in zip(samples, correct, strict=True):
        if sample.task == niah.TASK:
            grid.setdefault(str(sample.info["target_tokens"]), {})[f"{sample.info['depth_percent']:g}"] = int(
                ok
            )
    return grid


def _nll_summary(windows: list, scored_nll: list[float]) -> dict[str, Any]:
    mean = sum(scored_nll) / len(scored_nll)
    return {"corpus": windows[0].corpus, "windows": len(windows), "tokens_scored": len(scored_nll),
            "mean_nll": mean, "ppl": math.exp(mean)}


def run_method(
    config: EvalConfig, run: MethodRun, method_config, samples: list[Sample], windows: list, head_size: int,
    num_kv_heads: int | None = None, decode_windows: list = (), num_layers: int | None = None,
) -> tuple[dict[str, Any], list[dict]]:
    """Evaluate one method: generation tasks, then perplexity (`ppl`, then `decode-ppl` over
    `decode_windows`). Returns (result row, predictions)."""
    from tqdm import tqdm

    from vllm_kvpress.eval.engines import make_engine

    started = time.perf_counter()
    engine = make_engine(
        config.engine,
        config.model_path,
        method_config,
        prefill_chunk=config.prefill_chunk,
        max_model_len=config.max_model_len,
        kv_cache_dtype=config.kv_cache_dtype,
        device=config.device,
        dtype=config.dtype,
        gpu_memory_utilization=config.gpu_memory_utilization,
        enforce_eager=config.enforce_eager,
    )
    try:
        completions: list[str] = []
        if samples:
            with tqdm(total=len(samples), desc=f"{run.label}: generate", unit="sample") as bar:
                completions = engine.generate(
                    [list(s.prompt_ids) for s in samples], [s.max_tokens for s in samples], progress=bar
                )
        scored_nll: list[float] = []
        for window in tqdm(windows, desc=f"{run.label}: perplexity", unit="window", disable=not windows):
            scored_nll += engine.token_nll(list(window.token_ids))[window.first_scored :]
        decoded_nll: list[float] = []
        for window in tqdm(decode_windows, desc=f"{run.label}: decode perplexity", unit="window",
                           disable=not decode_windows):
            nll = engine.decode_nll(list(window.token_ids), window.prompt_len)
            decoded_nll += nll[window.first_scored :]
        device_name = engine.device_name
        report = engine.selection_report()
    finally:
        engine.close()

    by_task: dict[str, list[int]] = {}
    for i, sample in enumerate(samples):
        by_task.setdefault(sample.task, []).append(i)
    task_scores = {
        task: score_task(task, [completions[i] for i in idx], [samples[i].answers for i in idx]).to_dict()
        for task, idx in by_task.items()
    }
    correct = [
        all(a.lower() in c.lower() for a in s.answers) for s, c in zip(samples, completions, strict=True)
    ]
    row: dict[str, Any] = {
        "label": run.label,
        "method": run.method,
        "method_config": run.resolved,
        "kv_cache_dtype": config.kv_cache_dtype,
        "compression_ratio": compression_ratio(
            run, method_config, head_size, config.kv_cache_dtype, [s.num_prompt_tokens for s in samples],
            num_kv_heads, num_layers,
        ),
        "tasks": task_scores,
        "niah_grid": niah_grid(samples, correct),
        "seconds": round(time.perf_counter() - started, 1),
        "device": device_name,
    }
    if report:
        row.update(report)
    if windows:
        row["ppl"] = _nll_summary(windows, scored_nll)
    if decode_windows:
        window = decode_windows[0]
        kv = compression_ratio(run, method_config, head_size, config.kv_cache_dtype)  # the pages' bytes
        if method_config is not None:
            kv *= decoded_kv_fraction(method_config, window.prompt_len, len(window.token_ids), num_kv_heads,
                                      head_size)
        row["decode_ppl"] = {**_nll_summary(decode_windows, decoded_nll), "prompt_len": window.prompt_len,
                             "kv_vs_bf16": kv}
    predictions = [
        {
            "method": run.label,
            "task": s.task,
            "sample_id": s.sample_id,
            "prompt_tokens": s.num_prompt_tokens,
            "answers": list(s.answers),
            "completion": c,
            "correct": ok,
            "info": s.info,
        }
        for s, c, ok in zip(samples, completions, correct, strict=True)
    ]
    return row, predictions


def evaluate(config: EvalConfig, method_configs: list, command: str) -> str:
    """Run every method of `config`; write and return the result directory."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.model_path)
    head_size, num_kv_heads, num_layers = model_geometry(config.model_path)
    samples = build_samples(config, tokenizer)
    windows = (
        perplexity.build_windows(tokenizer, config.ppl_tokens, config.prefill_chunk, config.ppl_windows)
        if "ppl" in config.tasks
        else []
    )
    decode_windows = (
        perplexity.build_windows(tokenizer, config.ppl_tokens, config.prefill_chunk, config.ppl_windows, decode=True)
        if perplexity.DECODE_TASK in config.tasks
        else []
    )
    result_dir = results.create_result_dir(config.out, config.directory_name())
    rows, predictions = [], []
    for run, method_config in zip(config.runs, method_configs, strict=True):
        row, preds = run_method(config, run, method_config, samples, windows, head_size, num_kv_heads,
                                decode_windows, num_layers)
        rows.append(row)
        predictions += preds
        # written after every method, so a run cut short (a time limit, a crash) keeps what it measured
        _write(result_dir, config, command, rows, predictions)
    return result_dir


def _write(result_dir: str, config: EvalConfig, command: str, rows: list[dict], predictions: list[dict]) -> None:
    for key in ("ppl", "decode_ppl"):
        baseline = next((r for r in rows if r["method"] == UNCOMPRESSED and r.get(key)), None)
        for row in rows:
            if baseline is not None and row.get(key):
                row[key]["delta_nll_vs_none"] = row[key]["mean_nll"] - baseline[key]["mean_nll"]
    payload = {"name": config.directory_name(), "runs": rows}
    results.write_results(
        result_dir, config.to_dict(), command, results.environment(rows[0]["device"]), payload, predictions
    )
