"""`vllm-kvpress convert kv-head-compress` end to end on a small random checkpoint with a calibration
file, and its usage errors (one argparse line, exit status 2)."""

import json

import pytest
import torch
from test_kv_heads import tiny_model
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from vllm_kvpress.cli import main
from vllm_kvpress.convert.cli import CONVERSION_RECORD

WORDS = "the quick brown fox jumps over a lazy dog while seven wise owls watch from an old oak tree".split()


@pytest.fixture
def checkpoint(tmp_path):
    """A tiny Qwen2 checkpoint with a character-level byte-level BPE tokenizer (what Qwen2's tokenizer
    class rebuilds from a tokenizer.json), and a calibration text file."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {piece: i for i, piece in enumerate(["<unk>", "\u0120", *sorted(set("".join(WORDS)))])}
    backend = Tokenizer(models.BPE(vocab, [], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model_dir = tmp_path / "model"
    tiny_model("qwen2").save_pretrained(model_dir)
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>").save_pretrained(model_dir)
    text = tmp_path / "calibration.txt"
    generator = torch.Generator().manual_seed(0)
    text.write_text(" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (3000,), generator=generator)))
    return model_dir, text


def test_convert_writes_a_checkpoint_with_fewer_kv_heads(checkpoint, tmp_path, capsys):
    model_dir, text = checkpoint
    out = tmp_path / "out"
    assert main(["convert", "kv-head-compress", str(model_dir), str(out), "--kv-heads", "1",
                 "--calibration", str(text), "--calibration-tokens", "2048", "--window", "512",
                 "--recovery-steps", "3", "--recovery-window", "256", "--device", "cpu"]) == 0
    record = json.loads((out / CONVERSION_RECORD).read_text())
    assert record["kv_heads"] == 1 and record["merge"] == "svd" and record["calibration_tokens"] == 2048
    assert record["recovery"]["steps"] == 3 and record["recovery"]["last_kl"] >= 0
    assert record["kv_bytes_per_token"]["before"] == 2 * record["kv_bytes_per_token"]["after"]
    assert f"{record['kv_bytes_per_token']['after']:,}" in capsys.readouterr().out
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.num_key_value_heads == 1
    assert reloaded.dtype == AutoModelForCausalLM.from_pretrained(model_dir).dtype


def test_sigma_writes_fewer_k_heads_than_v_heads_and_reports_both_byte_counts(checkpoint, tmp_path, capsys):
    model_dir, text = checkpoint
    out = tmp_path / "out"
    assert main(["convert", "sigma-diffqkv", str(model_dir), str(out), "--k-heads", "1", "--v-heads", "2",
                 "--calibration", str(text), "--calibration-tokens", "2048", "--window", "512",
                 "--recovery-steps", "0", "--device", "cpu"]) == 0
    record = json.loads((out / CONVERSION_RECORD).read_text())
    assert (record["k_heads"], record["v_heads"], record["kv_heads"]) == (1, 2, 2)
    sizes = record["kv_bytes_per_token"]
    assert sizes["after"] == sizes["before"] and 4 * sizes["with_own_k_and_v_heads"] == 3 * sizes["before"]
    assert "1 K heads and 2 V heads" in capsys.readouterr().out
    assert AutoModelForCausalLM.from_pretrained(out).config.num_key_value_heads == 2


@pytest.mark.parametrize("conversion,extra,message", [
    ("sigma-diffqkv", ["--k-heads", "2", "--v-heads", "2"], "nothing to merge; allowed: at least one below 2"),
    ("sigma-diffqkv", ["--k-heads", "3", "--v-heads", "1"], "--k-heads 3: the model has 2 KV heads; allowed: 1, 2"),
    ("sigma-diffqkv", ["--k-heads", "1"], "--v-heads None: the model has 2 KV heads"),
    ("sigma-diffqkv", ["--kv-heads", "1"], "--kv-heads 1: not a setting of sigma-diffqkv; allowed: --k-heads and"),
    ("kv-head-compress", ["--v-heads", "1"], "--v-heads 1: not a setting of kv-head-compress; allowed: --kv-heads"),
])
def test_bad_sigma_head_counts_are_usage_errors(checkpoint, tmp_path, capsys, conversion, extra, message):
    model_dir, text = checkpoint
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", conversion, str(model_dir), str(tmp_path / "out"), "--calibration", str(text), *extra])
    assert exit_info.value.code == 2
    assert message in " ".join(capsys.readouterr().err.split())


@pytest.mark.parametrize("extra,message", [
    (["--kv-heads", "2"], "--kv-heads 2: the model has 2 KV heads; allowed: 1 (fewer, dividing 2)"),
    (["--kv-heads", "1", "--calibration-tokens", "100"], "--calibration-tokens 100: too few; allowed: at least 1024"),
    (["--kv-heads", "1", "--calibration-tokens", "99999"], "tokens, fewer than the 99999 of --calibration-tokens"),
    (["--kv-heads", "1", "--window", "0"], "--window 0: allowed: a positive token count"),
    (["--kv-heads", "1", "--recovery-steps", "-1"], "--recovery-steps -1: allowed: 0 (no recovery) or more"),
    (["--kv-heads", "1", "--recovery-lr", "0"], "--recovery-lr 0.0: allowed: a positive learning rate"),
    (["--kv-heads", "1", "--calibration-tokens", "2048", "--recovery-steps", "9000"],
     "fewer than the 4608000 of --recovery-steps x --recovery-window"),
])
def test_bad_input_is_a_usage_error(checkpoint, tmp_path, capsys, extra, message):
    model_dir, text = checkpoint
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "kv-head-compress", str(model_dir), str(tmp_path / "out"), "--calibration", str(text),
              *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "vllm-kvpress convert: error:" in err and message in " ".join(err.split()), err


def test_a_non_empty_output_directory_and_a_missing_corpus_are_refused(checkpoint, tmp_path, capsys):
    model_dir, _ = checkpoint
    with pytest.raises(SystemExit):
        main(["convert", "kv-head-compress", str(model_dir), str(model_dir), "--kv-heads", "1"])
    assert "the directory is not empty; allowed: a new or empty directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["convert", "kv-head-compress", str(model_dir), str(tmp_path / "o"), "--kv-heads", "1",
              "--calibration", str(tmp_path / "nothing.txt")])
    assert "not a file; allowed: essays, jargon or a UTF-8 text file" in capsys.readouterr().err


def test_a_planned_conversion_says_so(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "x-ecomla", "smollm2", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    assert "convert x-ecomla: X-EcoMLA" in capsys.readouterr().err
