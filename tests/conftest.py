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


@pytest.fixture(scope="session")
def shared_data_dir():
    """../shared/data beside the checkout, or a skip where it is absent (users' clones)."""
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.normpath(os.path.join(here, "..", "..", "shared", "data"))
    if not os.path.isdir(path):
        pytest.skip(f"{path} is absent (only the project's machines have ../shared)")
    return path
