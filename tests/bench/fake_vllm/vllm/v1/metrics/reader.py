"""Stand-in for vllm.v1.metrics.reader: the Counter dataclass the worker filters on."""

from dataclasses import dataclass


@dataclass
class Counter:
    name: str
    labels: dict
    value: int
