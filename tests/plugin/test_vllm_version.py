"""On any vLLM release but the pinned one the plugin refuses to start, with one message naming both
versions, unless KVPRESS_ALLOW_UNPINNED_VLLM=1 asks to try."""

import json
import os
import subprocess
import sys

import pytest

from vllm_kvpress.errors import VLLMVersionError
from vllm_kvpress.vllm_patches import ALLOW_UNPINNED_ENV, PINNED_VLLM, check_vllm_version

START = """
import json, sys
import vllm
vllm.__version__ = "0.33.0"  # what another installed release reports
from vllm.engine.arg_utils import EngineArgs
try:
    EngineArgs(model=sys.argv[1], skip_tokenizer_init=True, load_format="dummy")
    print(json.dumps({"error": None}))
except Exception as e:
    print(json.dumps({"error": type(e).__name__, "message": str(e)}))
"""


def _start_engine(model_dir: str, **env) -> dict:
    """Create engine args in a fresh process (vLLM loads its plugins there, as every engine does)."""
    out = subprocess.run([sys.executable, "-c", START, model_dir], capture_output=True, text=True, timeout=300,
                         env={**os.environ, **env})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_starting_engine_on_another_vllm_names_both_versions(tiny_llama_dir):
    result = _start_engine(tiny_llama_dir)
    assert result["error"] == "VLLMVersionError"
    assert f"vllm-kvpress supports vLLM {PINNED_VLLM}, but vLLM 0.33.0 is installed" in result["message"]
    assert f"Install vllm=={PINNED_VLLM}, or set {ALLOW_UNPINNED_ENV}=1" in result["message"]


def test_the_override_lets_it_try(tiny_llama_dir):
    assert _start_engine(tiny_llama_dir, **{ALLOW_UNPINNED_ENV: "1"}) == {"error": None}


def test_the_pinned_release_passes(monkeypatch):
    monkeypatch.delenv(ALLOW_UNPINNED_ENV, raising=False)
    check_vllm_version(PINNED_VLLM)
    check_vllm_version()  # the installed vLLM: the one setup.py pins
    with pytest.raises(VLLMVersionError, match="but vLLM 0.26.1 is installed"):
        check_vllm_version("0.26.1")
