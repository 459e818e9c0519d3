"""configs/: a preset named after a method writes out its defaults (the method's class is their
only source; a preset that drifts from it fails here; a new method needs none), and every preset
loads as `--kv-compression-config` does."""

from pathlib import Path

import pytest
import yaml

from vllm_kvpress.config import load_method_config, parse_config_argument
from vllm_kvpress.methods.registry import BUILT_IN

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEFAULTS_PRESETS = sorted(p for p in CONFIGS.glob("*.yaml") if p.stem in {cls.info.name for cls in BUILT_IN})


def test_the_shipped_methods_have_their_defaults_written_out():
    assert [p.stem for p in DEFAULTS_PRESETS] == sorted(["kivi", "gear", "snapkv", "scissorhands", "kvcrush", "razor"])


@pytest.mark.parametrize("path", DEFAULTS_PRESETS, ids=lambda p: p.name)
def test_a_preset_named_after_a_method_is_its_defaults(path):
    preset = yaml.safe_load(path.read_text())
    assert preset == load_method_config({"method": path.stem}).to_dict()


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_preset_loads_as_the_flag_reads_it(path):
    settings = parse_config_argument(str(path))
    assert load_method_config(settings).method == settings["method"]


def test_the_composition_preset_is_kvcrush_on_gear_4bit_pages():
    method = load_method_config(parse_config_argument(str(CONFIGS / "kvcrush-gear4.yaml")))
    assert method.method == "kvcrush" and method.budget == 0.25
    assert method.pages.method == "gear" and method.pages.bits == 4 and method.pages.tail_keys == "staged"
    # its pages are GEAR's layout (low-rank terms), and evicting keeps the eviction machinery
    assert method.page_layout(128).rank == 1 and method.eviction is method
