"""Eviction and prefix caching: a compacted block holds kept tokens under the hash of the tokens it
held before, so engine_args switches prefix caching off for every evicting method, and says why
when the user asked for it (`--enable-prefix-caching`)."""

import logging

import pytest

from vllm_kvpress import engine_args
from vllm_kvpress.config import load_method_config

EVICTING = load_method_config({"method": "snapkv", "budget": 256, "window": 32})


@pytest.fixture
def evicting_method(monkeypatch):
    """Any settings load as an evicting method."""
    monkeypatch.setattr(engine_args, "load_method_config", lambda settings: EVICTING)


@pytest.mark.parametrize("requested,level", [(True, logging.WARNING), (None, logging.INFO)])
def test_prefix_caching_is_switched_off_and_the_reason_named(v2_engine_config, evicting_method, caplog, requested,
                                                             level):
    with caplog.at_level(logging.INFO, logger="vllm.kvpress"):
        cfg = v2_engine_config(additional_config={"kv_compression": {"method": "snapkv"}},
                            enable_prefix_caching=requested)
    assert cfg.cache_config.enable_prefix_caching is False
    records = [r for r in caplog.records if "prefix caching is switched off" in r.getMessage()]
    assert len(records) == 1 and records[0].levelno == level
    message = records[0].getMessage()
    assert "evicts prompt tokens" in message and "block hashes no longer match" in message
    assert ("--enable-prefix-caching is ignored" in message) == bool(requested)


def test_prefix_caching_off_stays_off_silently(v2_engine_config, evicting_method, caplog):
    with caplog.at_level(logging.INFO, logger="vllm.kvpress"):
        cfg = v2_engine_config(additional_config={"kv_compression": {"method": "snapkv"}}, enable_prefix_caching=False)
    assert cfg.cache_config.enable_prefix_caching is False
    assert "prefix caching" not in caplog.text


def test_quantizing_methods_keep_prefix_caching(engine_config):
    cfg = engine_config(additional_config={"kv_compression": {"method": "kivi"}}, enable_prefix_caching=True)
    assert cfg.cache_config.enable_prefix_caching is True
