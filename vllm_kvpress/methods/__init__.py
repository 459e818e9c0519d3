"""The KV-compression methods: one module per method (its settings, defaults, validation and the
hooks the engine calls), the contract they fulfil (base.py) and the table users choose from
(registry.py). docs/methods.md tells how to write one."""
