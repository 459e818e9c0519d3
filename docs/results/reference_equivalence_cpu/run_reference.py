"""Greedy answers and per-token NLLs of the reference engine (CPU) for a few methods, as JSON."""
import json, os, sys
if os.environ.get("OLD_KVPRESS"):
    sys.meta_path = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()]
    sys.path.insert(0, os.environ["OLD_KVPRESS"])
import torch
import vllm_kvpress
from vllm_kvpress.config import load_method_config
from vllm_kvpress.eval.corpora import essays
from vllm_kvpress.eval.engines.reference import ReferenceEngine
from vllm_kvpress.models import ensure_model

torch.set_num_threads(2)
path = ensure_model("smollm2")
settings = [{"method": "gear"}, {"method": "kivi", "bits": 2}, {"method": "snapkv", "budget": 0.4},
            {"method": "kvcrush", "budget": 0.4}, {"method": "scissorhands", "budget": 0.4},
            {"method": "razor", "window": 251}]
out = {"package": vllm_kvpress.__file__}
text = essays()[1]
for s in settings:
    engine = ReferenceEngine(path, load_method_config(s), prefill_chunk=256, max_model_len=2048)
    tokens = engine.tokenizer(text).input_ids[:900]
    nll = engine.decode_nll(tokens, 768)
    rendered = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": text[:3000] + "\n\nIn one sentence, what is this text about?"}],
        add_generation_prompt=True, tokenize=False)
    prompt = engine.tokenizer(rendered, add_special_tokens=False).input_ids
    answer = engine.generate([prompt], [24])[0]
    out[json.dumps(s)] = {"nll": nll, "answer": answer}
    print(s, sum(nll) / len(nll), repr(answer), file=sys.stderr)
print(json.dumps(out))
