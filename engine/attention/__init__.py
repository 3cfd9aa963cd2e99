"""Attention backends behind one interface: `torch` (CPU reference over the paged cache), `flashinfer` (CUDA)."""

from __future__ import annotations

import importlib

import torch

from .base import AttentionBackend, AttentionMetadata, kv_cache_shape
from .torch_paged import TorchPagedAttention

__all__ = ["AttentionBackend", "AttentionMetadata", "TorchPagedAttention", "kv_cache_shape", "select_backend_class"]


def select_backend_class(name: str, device: torch.device) -> type[AttentionBackend]:
    """`auto` takes flashinfer on CUDA when it is installed, the torch reference otherwise."""
    if name not in ("auto", "torch", "flashinfer"):
        raise ValueError(f"unknown attention backend {name!r}; choose auto, torch or flashinfer")
    if name == "torch" or (name == "auto" and device.type != "cuda"):
        return TorchPagedAttention
    if device.type != "cuda":  # checked before importing: flashinfer is imported only on CUDA
        raise ValueError("attention backend 'flashinfer' needs a CUDA device")
    try:
        module = importlib.import_module(f"{__name__}.flashinfer_backend")
    except ImportError as e:
        if name == "auto":
            return TorchPagedAttention
        raise ValueError(f"attention backend 'flashinfer' is not available: {e}") from e
    return module.FlashInferAttention
