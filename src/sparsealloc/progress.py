"""Progress bars (tqdm on stderr); silent when disabled or when stderr is not wanted."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress_enabled(requested: bool = True) -> bool:
    return requested and os.environ.get("SPARSEALLOC_NO_PROGRESS", "") not in ("1", "true")


def progress_bar(items: Iterable[T], desc: str, enable: bool = True, **kw) -> Iterator[T]:
    """Wrap ``items`` in a tqdm bar unless disabled."""
    if not progress_enabled(enable):
        yield from items
        return
    yield from tqdm(items, desc=desc, leave=False, dynamic_ncols=True, **kw)


def set_quiet(quiet: bool) -> None:
    """Silence our bars and those of transformers / huggingface_hub / datasets."""
    if not quiet:
        return
    os.environ["SPARSEALLOC_NO_PROGRESS"] = "1"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
