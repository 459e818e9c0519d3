"""How alike adjacent layers' KV are: what a cross-layer merge (MiniCache, methods/minicache.py) needs.

    python -m vllm_kvpress.eval.layer_similarity --model smollm2 --length 2000

runs the model (transformers, real weights) over a needle-in-a-haystack prompt and prints, for every
pair of adjacent layers, the mean cosine similarity of a token's K vectors of the two layers (per KV
head, keys after RoPE, which both layers share at a position), the same for V, and the relative error
MiniCache's merge leaves in the first layer's keys at its defaults. MiniCache merges where the
similarity is high; xKV (methods/xkv.py) needs only the layers' bases to align.
"""

import argparse

import torch

from vllm_kvpress.methods.minicache import MiniCache, slerp_merge


def pair_similarity(first: tuple[torch.Tensor, torch.Tensor], second: tuple[torch.Tensor, torch.Tensor],
                    method: MiniCache) -> dict[str, float]:
    """Two layers' (K, V), each [T, Hkv, D] -> the mean cosine similarity of their rows (K and V) and
    the relative error of the first layer's K once merged with `method`'s settings."""
    (k1, v1), (k2, v2) = first, second
    merged, _ = slerp_merge(k1, k2, t=method.t, retain=method.retain)
    return {
        "cos_k": float(torch.nn.functional.cosine_similarity(k1.float(), k2.float(), dim=-1).mean()),
        "cos_v": float(torch.nn.functional.cosine_similarity(v1.float(), v2.float(), dim=-1).mean()),
        "merge_error_k": float((merged - k1.float()).norm() / k1.float().norm()),
    }


@torch.inference_mode()
def adjacent_layer_similarity(model: str, length: int, seed: int = 0) -> list[dict[str, float]]:
    """Per pair of adjacent layers (0-1, 1-2, ...), `pair_similarity` over one prompt of `length`
    tokens (a needle at half depth in the Paul Graham essays)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_kvpress.eval import niah
    from vllm_kvpress.models import ensure_model

    path = ensure_model(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    network = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    (sample,) = niah.build_samples(tokenizer, [length], [50], seed)
    cache = network(torch.tensor([sample.prompt_ids]), use_cache=True).past_key_values
    layers = [(layer.keys[0].transpose(0, 1), layer.values[0].transpose(0, 1)) for layer in cache.layers]
    method = MiniCache()
    return [pair_similarity(a, b, method) for a, b in zip(layers, layers[1:])]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vllm_kvpress.eval.layer_similarity", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="an embedded model name or a checkpoint directory")
    parser.add_argument("--length", type=int, default=2000, help="prompt tokens (default 2000)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print("| layers | cos K | cos V | MiniCache merge: relative error of K |")
    print("|---|---:|---:|---:|")
    for i, row in enumerate(adjacent_layer_similarity(args.model, args.length, args.seed)):
        print(f"| {i}-{i + 1} | {row['cos_k']:.3f} | {row['cos_v']:.3f} | {row['merge_error_k']:.3f} |")


if __name__ == "__main__":
    main()
