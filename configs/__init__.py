"""Method presets: one YAML of defaults per available method (installed as vllm_kvpress.configs)."""
