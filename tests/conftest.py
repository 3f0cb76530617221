"""Test set-up: a persistent XLA compilation cache shared by every test of the session, so that
tests that build the same step compile it once."""
import os
import tempfile

import jax
import pytest

_cache = os.environ.get("CLAX_TEST_XLA_CACHE") or os.path.join(tempfile.gettempdir(), "clax-test-xla-cache")
jax.config.update("jax_compilation_cache_dir", _cache)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
# The shared pretraining cache (clax.cache, cache.pretrain) of the session's runs: a fresh folder, never
# the user's ~/.cache, so that no earlier session's weights answer a test.
os.environ["CLAX_PRETRAIN_CACHE"] = tempfile.mkdtemp(prefix="clax-test-pretrain-")


@pytest.fixture(autouse=True)
def _no_shared_pretraining_cache_left_set():
    """A run (clax.runner.run) sets the shared pretraining cache for what follows in its process; a test
    that calls clax.pretrain directly starts without it, whatever ran before."""
    from clax import cache

    cache._SHARED_PRETRAIN = None
    yield


@pytest.fixture(scope="session")
def shared_data_dir():
    """../shared/data beside the checkout, or a skip where it is absent (users' clones)."""
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.normpath(os.path.join(here, "..", "..", "shared", "data"))
    if not os.path.isdir(path):
        pytest.skip(f"{path} is absent (only the project's machines have ../shared)")
    return path
