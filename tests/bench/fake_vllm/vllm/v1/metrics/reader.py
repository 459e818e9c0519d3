"""Stand-in for vllm.v1.metrics.reader: the Counter and Gauge dataclasses the worker filters on."""

from dataclasses import dataclass


@dataclass
class Counter:
    name: str
    labels: dict
    value: int


@dataclass
class Gauge:
    name: str
    labels: dict
    value: float
