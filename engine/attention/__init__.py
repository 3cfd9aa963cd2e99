"""Attention backends behind one interface: `torch` (CPU reference over the paged cache), `flashinfer` (CUDA); for
multi-head latent attention (DeepSeek) their latent-only counterparts (engine/attention/mla.py)."""

from __future__ import annotations

import importlib

import torch

from .base import AttentionBackend, AttentionMetadata, kv_cache_shape
from .torch_mla import TorchMLAAttention
from .torch_paged import TorchPagedAttention

__all__ = [
    "AttentionBackend",
    "AttentionMetadata",
    "TorchMLAAttention",
    "TorchPagedAttention",
    "kv_cache_shape",
    "select_backend_class",
]

# (torch reference, flashinfer module, flashinfer class) for dense attention and for MLA's latent pool
_FAMILIES = {
    False: (TorchPagedAttention, "flashinfer_backend", "FlashInferAttention"),
    True: (TorchMLAAttention, "flashinfer_mla", "FlashInferMLAAttention"),
}


def select_backend_class(name: str, device: torch.device, latent: bool = False) -> type[AttentionBackend]:
    """`auto` takes flashinfer on CUDA when it is installed, the torch reference otherwise. `latent`: the model
    attends over one MLA latent per token (DeepSeek), so the latent-only backends of that family."""
    if name not in ("auto", "torch", "flashinfer"):
        raise ValueError(f"unknown attention backend {name!r}; choose auto, torch or flashinfer")
    reference, module_name, class_name = _FAMILIES[latent]
    if name == "torch" or (name == "auto" and device.type != "cuda"):
        return reference
    if device.type != "cuda":  # checked before importing: flashinfer is imported only on CUDA
        raise ValueError("attention backend 'flashinfer' needs a CUDA device")
    try:
        module = importlib.import_module(f"{__name__}.{module_name}")
    except ImportError as e:
        if name == "auto":
            return reference
        raise ValueError(f"attention backend 'flashinfer' is not available: {e}") from e
    return getattr(module, class_name)
