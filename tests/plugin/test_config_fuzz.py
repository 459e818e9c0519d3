"""Hostile `--kv-compression-config` values: whatever a user (or a YAML file) puts there, the
settings either load as a method whose settings survive the trip to every vLLM process, or are
refused with the plugin's own error naming them; never another exception from deep inside."""

import json
import math
import re

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from vllm_kvpress.config import load_method_config, parse_config_argument
from vllm_kvpress.errors import KVCompressionConfigError, MethodNotImplementedError
from vllm_kvpress.methods.base import setting_names
from vllm_kvpress.methods.registry import method_classes, method_table

NAMES = [info.name for info in method_table()]
SETTINGS = sorted({name for cls in method_classes().values() for name in setting_names(cls)} | {"pages"})
PLAUSIBLE = st.one_of(
    st.sampled_from([0, 1, 2, 3, 4, 8, 16, 32, 64, 128, 512, 2048, 0.25, 0.5, 1.5, -1]),
    st.sampled_from(["head", "auto", "exact", "staged", "kivi", "gear", "snapkv", "mean", "first", "scores"]),
)
JUNK = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=6),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=5,
)


FUZZ_CASES = 10_000
"""Generated settings per CI run for the test below (about half a minute on a 2-core CPU)."""
_tried: list[int] = []


@settings(max_examples=FUZZ_CASES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(method=st.one_of(st.sampled_from(NAMES + ["nope", ""]), JUNK),
       values=st.dictionaries(st.sampled_from(SETTINGS + ["junk"]), st.one_of(PLAUSIBLE, JUNK), max_size=5))
@example(method="mikv", values={"block_size": 0, "decode_interval": 1})  # found by this test: a modulo by zero
def _load_or_refuse(method, values):
    _tried.append(1)
    try:
        loaded = load_method_config({"method": method, **values})
    except (KVCompressionConfigError, MethodNotImplementedError) as e:
        assert str(e).startswith(("kv-compression: ", "--kv-compression "))
        return
    carried = loaded.to_dict()  # what vLLM hashes (as JSON) and pickles to every process
    assert json.loads(json.dumps(carried, allow_nan=False)) == carried
    assert load_method_config(carried) == loaded


def test_any_settings_load_or_are_refused_with_a_message():
    _tried.clear()
    _load_or_refuse()
    assert len(_tried) >= FUZZ_CASES, f"only {len(_tried)} cases were tried"
    print(f"{len(_tried)} generated settings, each loaded or refused with the plugin's message")


@st.composite
def own_settings(draw):
    """A method and a few of its own settings (its pages' too), at plausible values: most load."""
    name = draw(st.sampled_from(sorted(method_classes())))
    keys = setting_names(method_classes()[name]) + (["bits", "group_size", "tail_keys"] if "pages" in
                                                    setting_names(method_classes()[name]) else [])
    return name, draw(st.dictionaries(st.sampled_from(keys), PLAUSIBLE, max_size=2))


@settings(max_examples=200, deadline=None)
@given(drawn=own_settings())
def test_accepted_settings_survive_the_trip_to_every_process(drawn):
    name, values = drawn
    try:
        loaded = load_method_config({"method": name, **values})
    except KVCompressionConfigError:
        return
    carried = json.loads(json.dumps(loaded.to_dict(), allow_nan=False))
    assert load_method_config(carried) == loaded and carried["method"] == name


@pytest.mark.parametrize("settings", [
    {"method": "gear", "bits": math.nan}, {"method": "snapkv", "budget": math.inf},
    {"method": "kvcrush", "representative_fraction": math.nan}, {"method": ["gear"]}, {"method": {"name": "gear"}},
    {"method": "snapkv", "pages": ["gear"]}, {"method": "gear", "pages": "kivi"}, {"method": "snapkv", "window": 2**70},
])
def test_hostile_values_are_named(settings):
    with pytest.raises(KVCompressionConfigError) as info:
        load_method_config(settings)
    assert any(f"{key}=" in str(info.value) or f"setting(s) {key}" in str(info.value) for key in settings)


@pytest.mark.parametrize("name,text,message", [
    ("tag.yaml", "method: !!python/object/apply:os.system ['true']\n",
     "is not valid YAML (could not determine a constructor"),
    ("broken.yaml", "method: [gear\n", "is not valid YAML (while parsing a flow sequence"),
    ("broken.json", "{bits: 2", "is not valid JSON (Expecting property name"),
    ("list.yaml", "- bits: 2\n", "must be a JSON/YAML object (mapping), got list"),
    ("empty.yaml", "", "must be a JSON/YAML object (mapping), got NoneType"),
])
def test_hostile_files_are_named(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(KVCompressionConfigError, match=re.escape(message)):
        parse_config_argument(str(path))


def test_paths_that_are_no_readable_file_are_named(tmp_path):
    (tmp_path / "dir.yaml").mkdir()
    with pytest.raises(KVCompressionConfigError, match="is not a file"):
        parse_config_argument(str(tmp_path / "dir.yaml"))
    with pytest.raises(KVCompressionConfigError, match="does not exist"):
        parse_config_argument(str(tmp_path / "missing.yaml"))
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(KVCompressionConfigError, match="is not valid YAML"):
        parse_config_argument(str(tmp_path / "binary.yaml"))


VLLM_FLAGS = st.fixed_dictionaries({}, optional={  # compatible values drawn more often, so that many build
    "kv_cache_dtype": st.sampled_from(["auto", "auto", "auto", "bfloat16", "fp8", "fp8_e5m2", "int4_per_token_head"]),
    "attention_backend": st.sampled_from(["CUSTOM", "CUSTOM", "CUSTOM", "FLASH_ATTN", "TRITON_ATTN"]),
    "block_size": st.sampled_from([64, 64, 64, 16, 32, 128]),
    "enable_prefix_caching": st.booleans(),
    "max_model_len": st.sampled_from([256, 1024, 4096]),
    "enforce_eager": st.booleans(),
})
ENGINE_CASES = 1_000
"""vLLM flag combinations per CI run (an engine config each: about 10 s in all on a 2-core CPU)."""


def test_settings_with_vllm_flags_build_an_engine_or_are_refused(v2_engine_config, monkeypatch):
    """The method settings beside vLLM's own flags: an engine config, or the plugin's message
    naming the setting or flag; never another exception."""
    monkeypatch.setenv("KVPRESS_ALLOW_UNVERIFIED_METHODS", "1")  # the held-back methods' checks too
    tried, built = [], []

    @settings(max_examples=ENGINE_CASES, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                               HealthCheck.function_scoped_fixture])
    @given(drawn=own_settings(), flags=VLLM_FLAGS)
    def build_or_refuse(drawn, flags):
        name, values = drawn
        tried.append(1)
        try:
            config = v2_engine_config(additional_config={"kv_compression": {"method": name, **values}}, **flags)
        except (KVCompressionConfigError, MethodNotImplementedError) as e:
            assert str(e).startswith(("kv-compression: ", "--kv-compression ")), str(e)
            return
        built.append(1)
        assert config.additional_config["kv_compression"]["method"] == name

    build_or_refuse()
    assert len(tried) >= ENGINE_CASES and len(built) >= ENGINE_CASES // 10, (len(tried), len(built))
    print(f"{len(tried)} settings x vLLM flags: {len(built)} engine configs, the rest refused with a message")
