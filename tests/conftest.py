"""Fixtures shared across test modules."""
import pytest


@pytest.fixture(scope="session")
def demo_cache_root(tmp_path_factory):
    """One `demo.cache_dir` for the whole session. Assets are cached under a key of every demo.*
    parameter, so modules asking for the same demo share one build (about a minute on 2 cores)
    and a module that changes demo.* still gets its own."""
    return tmp_path_factory.mktemp("demo_assets")
