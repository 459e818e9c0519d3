"""Packaging for vllm-kvpress.

`triton_kernels/` and `configs/` live at the top of the repository (README.md, "Layout") but install as
`vllm_kvpress.triton_kernels` and `vllm_kvpress.configs`: a top-level `triton_kernels` would shadow
the PyPI package of that name, which vLLM itself imports. `csrc/` installs as `vllm_kvpress.csrc`:
its CUDA sources are package data that NVRTC compiles at run time (vllm_kvpress/cuda_decode.py), so
installing needs no CUDA toolkit.
"""

import os

from setuptools import find_packages, setup

packages = find_packages(include=["vllm_kvpress", "vllm_kvpress.*"])
packages += ["vllm_kvpress.triton_kernels", "vllm_kvpress.configs", "vllm_kvpress.csrc"]

setup(
    name="vllm-kvpress",
    version="0.1.0",
    description="Compressed and mixed-precision KV-cache pages for vLLM, with dequant-fused Triton kernels",
    long_description=open("README.md").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=packages,
    package_dir={
        "vllm_kvpress.triton_kernels": "triton_kernels",
        "vllm_kvpress.configs": "configs",
        "vllm_kvpress.csrc": "csrc",
    },
    package_data={
        "vllm_kvpress.configs": ["*.yaml", "razor/*.json"],
        "vllm_kvpress.csrc": ["*.cu"],
        "vllm_kvpress.bench": ["model_configs/*/config.json"],
    },
    install_requires=["vllm==0.26.0", "pyyaml"],
    extras_require={
        "ray": ["ray[default]"],
        "models": ["gguf>=0.10", "accelerate"],
        "plots": ["matplotlib"],
        "test": ["pytest", "hypothesis", "gguf>=0.10", "accelerate", "matplotlib", "ray[default]", "ruff==0.17.6"],
    },
    entry_points={
        "vllm.general_plugins": ["kvpress = vllm_kvpress.plugin:register"],
        "console_scripts": ["vllm-kvpress = vllm_kvpress.cli:main"],
    },
)
