"""Owns the plugin's exception types, so callers can tell a bad setting from a missing feature."""


class InputError(ValueError):
    """A command's input (a path, a name, a setting, a flag combination) is missing or not allowed.

    The `vllm-kvpress` commands print its message as argparse prints a usage error (one line,
    exit status 2), and so does `vllm serve` for our flags; the message names the input and what
    is allowed."""


class KVCompressionConfigError(InputError):
    """A `--kv-compression` setting is invalid or incompatible with another vLLM setting.

    The message names every offending setting, its value and what is allowed.
    """

    def __init__(self, reasons: list[str] | str):
        self.reasons = [reasons] if isinstance(reasons, str) else list(reasons)
        if len(self.reasons) == 1:
            super().__init__(f"kv-compression: {self.reasons[0]}")
        else:
            listed = "\n".join(f"  - {r}" for r in self.reasons)
            super().__init__(f"kv-compression: {len(self.reasons)} problems:\n{listed}")


class MethodNotImplementedError(NotImplementedError):
    """The selected method is registered (a known paper) but not implemented yet."""


class VLLMVersionError(RuntimeError):
    """The installed vLLM is not the release whose private APIs the plugin patches."""
