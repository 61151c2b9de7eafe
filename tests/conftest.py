import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("SPARSEALLOC_NO_PROGRESS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]


def shared_wikitext() -> Path | None:
    """The WikiText-2 copy beside the checkout (../shared/data), or $SPARSEALLOC_DATA."""
    for d in (os.environ.get("SPARSEALLOC_DATA"), ROOT.parent / "shared" / "data"):
        if d and (Path(d) / "wikitext-2-raw" / "wiki.test.raw").is_file():
            return Path(d)
    return None


@pytest.fixture
def wikitext_dir() -> Path:
    d = shared_wikitext()
    if d is None:
        pytest.skip("no WikiText-2 copy in ../shared/data or $SPARSEALLOC_DATA")
    return d


@pytest.fixture(autouse=True)
def _private_result_cache(tmp_path_factory, monkeypatch):
    """Derived results (absorption coefficients, spectra: ``Session.cache_dir``) go to a per-test
    folder, not the user's cache; downloaded models and data still come from $SPARSEALLOC_CACHE."""
    import sparsealloc.session

    root = tmp_path_factory.mktemp("result-cache")
    monkeypatch.setattr(sparsealloc.session, "cache_root", lambda: root)
