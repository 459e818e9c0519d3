"""A whole soak invocation against the stand-in server, started as `vllm serve` would be: one
server per configuration, a configuration whose server fails is recorded while the others run,
and the results land as JSON, markdown and plots."""

import json

import pytest

from vllm_kvpress.soak import summary
from vllm_kvpress.soak.client import OK
from vllm_kvpress.soak.probes import RANDOM_TOKENS
from vllm_kvpress.soak.runner import RECORDS_DIR, SOAK_FILE, SUMMARY_FILE, run_soak

from .conftest import SMALL_CONTEXT, small_soak_request
from .stand_in_server import StandIn

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def soaked(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("soak")
    request = small_soak_request(tmp_path, ['kivi:{"bits": 2}'],
                                 "vllm-kvpress soak --model tiny-llama --configs kivi:bits=2")
    return request.out, run_soak(request)


def test_a_model_directory_without_weights_or_tokenizer_is_served_with_dummy_weights(soaked):
    _, soak = soaked
    assert soak["model"]["real_weights"] is False and soak["model"]["has_tokenizer"] is False
    assert soak["probes"]["kind"] == RANDOM_TOKENS and len(soak["probes"]["probes"]) == 4
    argv = soak["results"][0]["vllm_serve_argv"]
    assert argv[:2] == ["vllm", "serve"] and argv[argv.index("--load-format") + 1] == "dummy"
    assert "--skip-tokenizer-init" in argv and argv[argv.index("--max-model-len") + 1] == str(SMALL_CONTEXT)
    kivi = soak["results"][1]["vllm_serve_argv"]
    assert kivi[kivi.index("--kv-compression") + 1] == "kivi"
    assert json.loads(kivi[kivi.index("--kv-compression-config") + 1])["bits"] == 2


def test_each_configuration_is_soaked_on_its_own_server_and_a_failed_start_is_recorded(soaked):
    out, soak = soaked
    results = {r["config"]["label"]: r for r in soak["results"]}
    assert {label: r["status"] for label, r in results.items()} == {"auto": "ok", "kivi:bits=2": "failed"}
    assert "kivi fails to start" in results["kivi:bits=2"]["error"]
    for result in [results["auto"]]:
        assert result["engine"]["kv_capacity_tokens"] == StandIn.capacity_tokens  # its vllm:cache_config_info
        requests = result["summary"]["requests"]
        assert requests["requests"] == result["plan"]["num_requests"] and requests[OK] > 0
        assert requests["failed_not_cancelled"] == 0
        assert result["summary"]["leak_checks"][summary.CLEAN] == 1
        assert result["summary"]["probes"]["divergence_rate"] == 0.0
        assert result["summary"]["verdicts"]["server_stayed_up"] is True
        record = json.loads((out / result["record"]).read_text())
        assert len(record["outcomes"]) == requests["requests"] and len(record["series"]["t_s"]) > 5
        assert (out / result["plot"]).read_bytes().startswith(PNG_SIGNATURE)
    assert soak["totals"]["all_criteria_met"] is False and soak["totals"]["ran"] == 1


def test_the_results_directory_holds_json_markdown_plots_and_ignored_logs(soaked):
    out, soak = soaked
    assert json.loads((out / SOAK_FILE).read_text()) == soak
    assert soak["schema"] == summary.SCHEMA
    text = (out / SUMMARY_FILE).read_text()
    assert text.startswith("# Soak: ") and summary.TABLE_HEADER in text
    assert "![gauges over time: auto](gauges__auto.png)" in text and "kivi fails to start" in text
    assert sorted(p.name for p in (out / RECORDS_DIR).iterdir()) == ["auto.json"]
    assert (out / ".gitignore").read_text().startswith("logs/")
    assert sorted(p.name for p in (out / "logs").iterdir()) == ["auto.log", "kivi-bits2.log"]
