"""Result directories are never overwritten; the markdown table carries counts and the NLL delta."""

import os

from vllm_kvpress.eval import results


def test_result_directory_gets_a_suffix_instead_of_overwriting(tmp_path):
    first = results.create_result_dir(str(tmp_path), "smollm2-reference-none")
    with open(os.path.join(first, "results.json"), "w") as f:
        f.write("{}")
    second = results.create_result_dir(str(tmp_path), "smollm2-reference-none")
    third = results.create_result_dir(str(tmp_path), "smollm2-reference-none")
    assert [os.path.basename(p) for p in (first, second, third)] == [
        "smollm2-reference-none",
        "smollm2-reference-none-2",
        "smollm2-reference-none-3",
    ]
    with open(os.path.join(first, "results.json")) as f:
        assert f.read() == "{}"


def test_run_slug_names_overrides_and_stays_a_file_name():
    assert results.run_slug("kivi", {}) == "kivi"
    assert results.run_slug("gear", {"rank": 2, "bits": 2}) == "gear_bits=2_rank=2"
    assert "/" not in results.slug("a/b c")


def test_markdown_has_counts_ratio_and_nll_delta():
    run = {
        "label": "kivi",
        "compression_ratio": 0.28125,
        "niah_grid": {"1000": {"10": 1, "50": 0}},
        "tasks": {"niah": {"correct": 1, "total": 2, "accuracy": 50.0, "string_match_all": 50.0}},
        "ppl": {"ppl": 35.3, "mean_nll": 3.5648, "delta_nll_vs_none": 0.0071},
    }
    text = results.markdown_tables({"runs": [run]})
    assert "| kivi | 0.281 | 50.0 (1/2) | 35.300 | 3.5648 | +0.0071 |" in text
    assert "| 1000 | 1 | 0 |" in text


def test_environment_records_versions_and_device():
    env = results.environment("cpu (test)")
    assert env["device"] == "cpu (test)"
    assert env["versions"]["torch"] and env["versions"]["transformers"]


def test_markdown_shows_the_important_share_of_each_layer_where_a_run_has_one():
    run = {"label": "zipvl", "compression_ratio": 0.209, "tasks": {},
           "important_share_by_layer": [0.7165, 0.2146, 0.0323]}
    text = results.markdown_tables({"runs": [run, {"label": "none", "compression_ratio": 1.0, "tasks": {}}]})
    assert "## Important share by layer: zipvl" in text and "| share | 0.717 | 0.215 | 0.032 |" in text
    assert "Important share by layer: none" not in text
