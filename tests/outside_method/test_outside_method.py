"""A method from outside the package: kvpress_knorm.py, installed here as the distribution
`kvpress-knorm` with an entry point in the `vllm_kvpress.methods` group (a dist-info folder on the
import path, as pip writes it), runs through the registry and `vllm-kvpress methods`, vLLM's engine
config and KV-cache spec, the reference engine, and the backend under the Triton interpreter, with
nothing in vllm_kvpress/ naming it."""

import shutil
import sys
from pathlib import Path

import pytest
import torch
from helpers import run_steps_against_reference

from vllm_kvpress.config import load_method_config
from vllm_kvpress.errors import KVCompressionConfigError
from vllm_kvpress.methods import registry

HERE = Path(__file__).resolve().parent
HEADS, KV_HEADS, HEAD_SIZE = 8, 2, 64  # the tiny_llama_dir model
SETTINGS = {"method": "knorm", "budget": 48, "block_size": 16, "window": 8, "sink": 4}
PROMPT = 150  # 9 full blocks of 16 + a tail of 6; the budget keeps 3 blocks


@pytest.fixture
def knorm_installed(tmp_path, monkeypatch):
    """`pip install kvpress-knorm`, as far as Python can tell: the module and its dist-info."""
    site = tmp_path / "site"
    info = site / "kvpress_knorm-0.1.0.dist-info"
    info.mkdir(parents=True)
    shutil.copy(HERE / "kvpress_knorm.py", site)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kvpress-knorm\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[vllm_kvpress.methods]\nknorm = kvpress_knorm:KNorm\n")
    monkeypatch.syspath_prepend(str(site))
    registry._outside_methods.cache_clear()  # a process loads the entry points once
    yield
    registry._outside_methods.cache_clear()
    sys.modules.pop("kvpress_knorm", None)


def test_unknown_until_its_package_is_installed():
    with pytest.raises(KVCompressionConfigError, match="method='knorm' is unknown"):
        load_method_config({"method": "knorm"})


def test_the_registry_loads_it_and_the_methods_table_lists_it(knorm_installed, capsys):
    from vllm_kvpress.cli import main

    method = load_method_config({"method": "knorm", "norm": 1, "budget": 0.25})
    assert type(method).__module__ == "kvpress_knorm" and method.norm == 1 and method.evicts_tokens
    row = [line for line in registry.format_methods_table().splitlines() if line.startswith("| `knorm`")]
    assert row == ["| `knorm` | eviction | available (kvpress-knorm) | A simple and effective L2 norm-based strategy "
                   "for KV cache compression (arXiv 2406.11430) | keep the tokens whose keys have the lowest L2 norm "
                   "(no attention scores) |"]
    with pytest.raises(KVCompressionConfigError, match="knorm: norm=3 is not allowed; allowed: 1, 2"):
        load_method_config({"method": "knorm", "norm": 3})
    # it composes with the package's quantizers like the built-in selections
    on_gear = load_method_config({"method": "knorm", "pages": "gear", "bits": 4})
    assert on_gear.page_layout(128).rank == 1 and on_gear.to_dict()["pages"] == "gear"
    assert main(["methods"]) == 0 and row[0] in capsys.readouterr().out
    assert main(["methods", "knorm"]) == 0
    listed = capsys.readouterr().out
    assert listed.startswith("knorm: A simple and effective")
    assert "  norm: 2\n" in listed and '  pages: "kivi"' in listed


def test_a_broken_package_names_itself_and_spares_the_others(knorm_installed, tmp_path):
    site = tmp_path / "site"
    (site / "kvpress_knorm-0.1.0.dist-info" / "entry_points.txt").write_text(
        "[vllm_kvpress.methods]\nknorm = kvpress_knorm:KNorm\nbroken = kvpress_knorm:Missing\n")
    registry._outside_methods.cache_clear()
    with pytest.raises(KVCompressionConfigError, match="method='broken' could not be loaded: kvpress_knorm:Missing "
                                                       r"\(from kvpress-knorm\) failed to import"):
        load_method_config({"method": "broken"})
    assert load_method_config({"method": "knorm"}).method == "knorm"


def test_vllm_builds_its_engine_config_and_eviction_spec(knorm_installed, v2_engine_config):
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from vllm_kvpress.backend.spec import KVPressEvictionSpec, compressed_spec_for_layer

    vllm_config = v2_engine_config(block_size=16, additional_config={"kv_compression": SETTINGS})
    assert vllm_config.cache_config.enable_prefix_caching is False  # an evicting method, as the built-in ones
    base = FullAttentionSpec(block_size=16, num_kv_heads=KV_HEADS, head_size=HEAD_SIZE, dtype=torch.bfloat16)
    spec = compressed_spec_for_layer(base, vllm_config)
    assert type(spec) is KVPressEvictionSpec and spec.budget == 48


def test_the_reference_engine_keeps_the_lowest_norm_keys(knorm_installed):
    """Through the reference engine's pages: after the prompt, each KV head holds the sink, the
    recent window and, for the rest of the budget, the candidates of lowest key norm."""
    from vllm_kvpress.eval.engines.reference import SequencePages
    from vllm_kvpress.reference import page_codec

    method = load_method_config(SETTINGS)
    generator = torch.Generator().manual_seed(7)
    keys = torch.randn(PROMPT, KV_HEADS, HEAD_SIZE, generator=generator)
    keys = keys * torch.rand(PROMPT, KV_HEADS, 1, generator=generator) * 3  # norms spread over 0..3x
    values = torch.randn(PROMPT, KV_HEADS, HEAD_SIZE, generator=generator)
    queries = torch.randn(PROMPT, HEADS, HEAD_SIZE, generator=generator)
    pages = SequencePages(method.page_layout(HEAD_SIZE), 1, KV_HEADS, PROMPT, torch.device("cpu"),
                          eviction=method.eviction, prompt_len=PROMPT)
    stored_k, stored_v = pages.append(keys.bfloat16(), values.bfloat16())
    pages.compact_if_due(queries, stored_k, stored_v, HEAD_SIZE ** -0.5)
    assert pages.num_evicted == (9 - 3) * 16

    kept_k, _ = page_codec.read_sequence(pages.cache, torch.arange(3), 3 * 16, pages.layout)
    candidates = 9 * 16
    forced = set(range(4)) | set(range(PROMPT - 8, candidates))
    for head in range(KV_HEADS):
        norms = stored_k[:candidates, head].norm(dim=-1)
        free = torch.tensor([j not in forced for j in range(candidates)])
        chosen = norms.masked_fill(~free, float("inf")).topk(48 - len(forced), largest=False).indices
        expected = stored_k[sorted(forced | set(chosen.tolist())), head]
        torch.testing.assert_close(kept_k[:, head], expected, atol=0.05, rtol=0.02)


def test_the_backend_runs_it_as_the_reference_engine(knorm_installed, v2_engine_config, device):
    """KVPressMetadataBuilder + KVPressImpl (Triton interpreter on the CPU) made by vLLM's route,
    the method read from the engine config: the prompt compacts once, and every step's attention
    equals the reference engine's over its own pages."""
    from vllm.config import set_current_vllm_config

    from vllm_kvpress.backend.impl import KVPressImpl
    from vllm_kvpress.backend.metadata import KVPressMetadataBuilder

    vllm_config = v2_engine_config(block_size=16, additional_config={"kv_compression": SETTINGS})
    with set_current_vllm_config(vllm_config):
        impl = KVPressImpl(HEADS, HEAD_SIZE, HEAD_SIZE ** -0.5, KV_HEADS, None, None, "auto")
    assert type(impl.eviction).__name__ == "KNorm"
    builder = KVPressMetadataBuilder(None, ["layer"], vllm_config, torch.device(device))
    compacted = []
    steps = [(0, 128), (128, PROMPT), (PROMPT, PROMPT + 1), (PROMPT + 1, PROMPT + 2)]
    reference = run_steps_against_reference(
        impl, builder, impl.eviction, steps, PROMPT, HEADS, device,
        check=lambda context, seq_len, metadata: compacted.extend(c.kept_blocks for c in metadata.compactions))
    assert compacted == [3] and reference.num_tokens == 3 * 16 + 6 + 2


@pytest.mark.downloads
def test_the_reference_engine_evaluates_it_on_smollm2(knorm_installed):
    """`vllm-kvpress eval --engine reference` on the embedded SmolLM2: half of a real prompt evicted
    by key norm; the loss of the tokens after it rises above the full cache's, modestly."""
    from vllm_kvpress.eval.corpora import essays
    from vllm_kvpress.eval.engines.reference import ReferenceEngine
    from vllm_kvpress.models import ensure_model

    path = ensure_model("smollm2")
    engines = {name: ReferenceEngine(path, load_method_config(settings), prefill_chunk=256, max_model_len=2048)
               for name, settings in (("kivi-8", {"method": "kivi", "bits": 8, "group_size": "head"}),
                                      ("knorm", {"method": "knorm", "budget": 0.5}))}
    tokens = engines["knorm"].tokenizer(essays()[0]).input_ids[:640]
    prompt = 512
    nll = {name: torch.tensor(engine.decode_nll(tokens, prompt)[prompt - 1:]).mean().item()
           for name, engine in engines.items()}
    print(nll)
    assert nll["kivi-8"] < nll["knorm"] < nll["kivi-8"] + 1.0
