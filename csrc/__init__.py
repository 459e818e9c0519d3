"""CUDA sources, installed as package data and compiled at run time by NVRTC (vllm_kvpress/cuda_decode.py)."""
