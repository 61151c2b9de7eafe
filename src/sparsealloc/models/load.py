"""Load a causal LM from a packaged short name, a local folder, or a Hugging Face id.

Every model comes back in eval mode, with ``use_cache`` off and one attention
implementation (:data:`ATTN_IMPLEMENTATION`) for all architectures, so that results are
deterministic on CPU. :func:`save_model` writes a plain transformers folder (safetensors;
pruned weights are dense tensors holding zeros), atomically.
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..cache import hub_reachable
from ..errors import UserError
from ..io import USER_WRITE_ERRORS, apply_umask, write_error, write_json
from ..outputs import check_save_target, remove_stale_saves, replace_dir, write_marker
from .checkpoint import check_checkpoint_folder
from .experts import fused_experts
from .packaged import (
    SOURCE_FILE,
    fetch_packaged,
    load_gguf,
    packaged_names,
    read_source,
    rebuild_clean,
    resolve_packaged,
)

# "sdpa" matches "eager" to float rounding on all three packaged models, is deterministic
# on CPU (bit-identical logits run to run) and is faster on long windows.
ATTN_IMPLEMENTATION = "sdpa"

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


@dataclass
class LoadedModel:
    """A model ready for calibration / evaluation, its tokenizer and where it came from."""

    model: Any
    tokenizer: Any
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """A short label: the packaged name, folder name or hub id."""
        return str(self.source.get("name") or self.source.get("spec", "model"))


def unknown_model_message(spec: str) -> str:
    names = ", ".join(packaged_names())
    return (
        f"unknown model '{spec}': use one of {names}, a local folder, "
        "or a Hugging Face id (needs hub access)"
    )


def as_dtype(dtype: torch.dtype | str) -> torch.dtype | str:
    """A torch dtype, or ``"auto"`` (the checkpoint's own dtype)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key == "auto":
        return "auto"
    if key not in _DTYPES:
        raise UserError(f"unknown dtype '{dtype}': use auto, float32, bfloat16 or float16")
    return _DTYPES[key]


def load_model(
    spec: str, *, dtype: torch.dtype | str = torch.float32, device: str = "cpu"
) -> LoadedModel:
    """Load ``spec``: a packaged short name, a local folder / .gguf file, or a hub id.

    ``dtype="auto"`` keeps the checkpoint's dtype (recorded in ``source["dtype"]``).
    """
    spec = str(spec).strip()
    dtype = as_dtype(dtype)
    start = time.perf_counter()
    if resolve_packaged(spec) is not None:
        loaded = _load_packaged(spec, dtype)
    elif _looks_local(spec):
        loaded = _load_local(Path(spec).expanduser(), dtype)
    elif _HUB_ID.match(spec):
        loaded = _load_hub(spec, dtype)
    else:
        raise UserError(unknown_model_message(spec))
    loaded.source["spec"] = spec
    loaded.source["load_seconds"] = round(time.perf_counter() - start, 3)
    return _finish(loaded, dtype, device)


# ----------------------------------------------------------------------------- kinds


def _load_packaged(spec: str, dtype: torch.dtype) -> LoadedModel:
    entry = resolve_packaged(spec)
    assert entry is not None
    path = fetch_packaged(entry.name)
    model, tokenizer = _from_pretrained(str(path), dtype)
    info = read_source(path)
    source = {
        "name": entry.name,
        "kind": "packaged",
        "path": str(path),
        "licence": entry.licence,
        "note": info.get("note", ""),
    }
    return LoadedModel(model, tokenizer, source)


def _looks_local(spec: str) -> bool:
    """A path that exists, or one that cannot be a hub id (absolute, ./, ~, .gguf, ...)."""
    if Path(spec).expanduser().exists():
        return True
    prefixes = ("/", "./", "../", "~", ".")
    return spec.startswith(prefixes) or spec.endswith(("/", ".gguf")) or spec.count("/") > 1


def _load_local(path: Path, dtype: torch.dtype) -> LoadedModel:
    if not path.exists():
        raise UserError(f"no such folder or file: {path}")
    if path.is_file():
        if path.suffix != ".gguf":
            raise UserError(f"{path} is a file: give a model folder (with config.json) or a .gguf")
        return _load_local_gguf(path, dtype)
    if (path / "config.json").is_file():
        check_checkpoint_folder(path)
        model, tokenizer = _from_pretrained(str(path), dtype)
        source = {"name": path.name, "kind": "local", "path": str(path.resolve())}
        parent = read_source(path)
        if parent:
            source["origin"] = parent
        return LoadedModel(model, tokenizer, source)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return _load_local_gguf(ggufs[0], dtype)
    if len(ggufs) > 1:
        names = ", ".join(p.name for p in ggufs)
        raise UserError(f"{path} holds several .gguf files ({names}): give one file")
    raise UserError(f"{path} has no config.json and no .gguf file: not a model folder")


def _load_local_gguf(path: Path, dtype: torch.dtype) -> LoadedModel:
    gguf_model, tokenizer = load_gguf(path)
    model = rebuild_clean(gguf_model)
    del gguf_model
    _set_attn(model)
    if dtype != "auto":
        model = model.to(dtype)
    source = {"name": path.stem, "kind": "local", "path": str(path.resolve()), "format": "gguf"}
    return LoadedModel(model, tokenizer, source)


def _set_attn(model: Any) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    else:  # older transformers
        model.config._attn_implementation = ATTN_IMPLEMENTATION


def _load_hub(spec: str, dtype: torch.dtype) -> LoadedModel:
    try:  # already in the local Hugging Face cache: no network needed
        model, tokenizer = _from_pretrained(spec, dtype, local_files_only=True)
    except (OSError, ValueError) as cached_exc:
        if not hub_reachable():
            raise UserError(unknown_model_message(spec)) from cached_exc
        try:
            model, tokenizer = _from_pretrained(spec, dtype)
        except (OSError, ValueError) as exc:
            raise UserError(unknown_model_message(spec)) from exc
    return LoadedModel(model, tokenizer, {"name": spec, "kind": "hub", "path": spec})


def _from_pretrained(name: str, dtype: torch.dtype, **kwargs: Any) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(
            name, dtype=dtype, attn_implementation=ATTN_IMPLEMENTATION, **kwargs
        )
    except ValueError as err:  # no SDPA for this class (Gemma 2's soft-capped attention)
        if "attention implementation" not in str(err):
            raise
        model = AutoModelForCausalLM.from_pretrained(
            name, dtype=dtype, attn_implementation="eager", **kwargs
        )
    tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    return model, tokenizer


def _finish(loaded: LoadedModel, dtype: torch.dtype | str, device: str) -> LoadedModel:
    model, tokenizer = loaded.model, loaded.tokenizer
    if dtype == "auto":
        dtype = next(model.parameters()).dtype
    model.eval()
    model.requires_grad_(False)
    model.config.use_cache = False
    if device != "cpu":
        model.to(device)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    loaded.source.update(
        {
            "dtype": str(dtype).removeprefix("torch."),
            "device": device,
            "class": type(model).__name__,
            "attn_implementation": model.config._attn_implementation,
        }
    )
    return loaded


# ----------------------------------------------------------------------------- save


def save_model(
    model: Any, tokenizer: Any, out_dir: str | Path, *, source: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a transformers folder (safetensors + tokenizer) atomically.

    The folder is built next to ``out_dir`` (carrying our marker from the start) and renamed
    into place; an existing ``out_dir`` is replaced only once the new one is complete, and only
    if :func:`~sparsealloc.outputs.check_save_target` allows it (a model folder we wrote, or any
    model folder with ``overwrite``). Leftovers of an interrupted earlier save to the same place
    are removed first.
    """
    return atomic_save(out_dir, overwrite,
                       lambda folder: _save_into(model, tokenizer, folder, source))


def atomic_save(out_dir: str | Path, overwrite: bool, fill: Callable[[Path], None]) -> Path:
    """Build a model folder with ``fill(tmp)`` in a hidden folder next to ``out_dir`` (our
    marker from the start, complete at the end) and rename it into place (see save_model)."""
    out = check_save_target(out_dir, overwrite)
    for leftover in remove_stale_saves(out):
        print(f"[sparsealloc] removed the leftover of an interrupted save: {leftover}",
              file=sys.stderr)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as exc:
        raise write_error(out, exc) from None
    try:
        write_marker(tmp, complete=False)
        fill(tmp)
        write_marker(tmp, complete=True)
        for path in [tmp, *tmp.rglob("*")]:  # some writers (and mkdtemp) use owner-only modes
            apply_umask(path, directory=path.is_dir())
        replace_dir(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno in USER_WRITE_ERRORS:
            raise write_error(out, exc) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _save_into(model: Any, tokenizer: Any, folder: Path, source: dict[str, Any] | None) -> None:
    use_cache = model.config.use_cache
    model.config.use_cache = True  # the saved folder is for generation / serving
    try:
        with fused_experts(model):  # per-expert linears go back to the class's fused layout
            model.save_pretrained(folder, safe_serialization=True)
    finally:
        model.config.use_cache = use_cache
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if source is not None:
        write_json(folder / SOURCE_FILE, source)


# ----------------------------------------------------------------------------- streaming


def checkpoint_folder(spec: str) -> Path | None:
    """The safetensors folder behind ``spec`` (packaged cache, local folder, hub cache), or
    None when the weights are not in safetensors files (GGUF) or not available offline."""
    spec = str(spec).strip()
    entry = resolve_packaged(spec)
    if entry is not None:
        return fetch_packaged(entry.name)
    path = Path(spec).expanduser()
    if _looks_local(spec):
        if path.is_dir() and (path / "config.json").is_file():
            check_checkpoint_folder(path)
            return path
        return None
    if _HUB_ID.match(spec):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(spec, local_files_only=True,
                                          allow_patterns=["*.json", "*.safetensors", "*.txt",
                                                          "*.model", "*.jinja"]))
        except (OSError, ValueError):
            return None
    return None


def load_skeleton(spec: str, folder: Path, dtype: torch.dtype) -> LoadedModel:
    """The model of ``folder`` built on the meta device (no weight memory) and its tokenizer.

    Buffers (rotary tables, embedding scales) are real; parameters are filled block by block
    by :class:`~sparsealloc.models.stream.StreamedWeights`.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights():
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                     attn_implementation=ATTN_IMPLEMENTATION)
        except ValueError as err:  # no SDPA for this class
            if "attention implementation" not in str(err):
                raise
            model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                     attn_implementation="eager")
    model.tie_weights()  # from_config on meta leaves tied embeddings as two parameters
    tokenizer = AutoTokenizer.from_pretrained(folder)
    entry = resolve_packaged(spec)
    if entry is not None:
        source = {"name": entry.name, "kind": "packaged", "path": str(folder),
                  "licence": entry.licence, "note": read_source(folder).get("note", "")}
    elif _looks_local(spec):
        source = {"name": folder.name, "kind": "local", "path": str(folder.resolve())}
    else:
        source = {"name": spec, "kind": "hub", "path": spec}
    source.update({"spec": spec, "load_seconds": round(time.perf_counter() - start, 3),
                   "streamed": True})
    return _finish(LoadedModel(model, tokenizer, source), dtype, "cpu")


def load_offloaded(folder: Path, dtype: torch.dtype, device: str, cpu_bytes: int,
                   offload_dir: Path) -> Any:
    """The model of ``folder`` dispatched by accelerate (``device_map="auto"``): what does not
    fit in ``cpu_bytes`` (and the GPU, with ``device`` cuda) is offloaded to ``offload_dir``.
    Slow but complete: for zero-shot evaluation of a model that does not fit in memory."""
    from transformers import AutoModelForCausalLM

    max_memory: dict[Any, int] = {"cpu": int(cpu_bytes)}
    if device.startswith("cuda"):
        index = torch.device(device).index or 0
        max_memory[index] = torch.cuda.mem_get_info(index)[0]
    offload_dir.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, device_map="auto", max_memory=max_memory,
        offload_folder=str(offload_dir), attn_implementation=ATTN_IMPLEMENTATION)
    model.eval()
    model.requires_grad_(False)
    model.config.use_cache = False
    return model
