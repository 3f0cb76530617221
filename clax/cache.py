"""The user-level caches of ``clax run``: JAX's persistent compilation cache, and the shared cache of
pretrained frozen backbones.

Compilation cache: compiled steps are kept on disk and reused by the
next process that compiles the same program (same shapes, same code, same JAX and device), so a rerun,
a resumed run or the main job run again skips most of its compilation.

The cache lives in the user cache directory, ``$XDG_CACHE_HOME/clax/xla`` (``~/.cache/clax/xla`` when
``XDG_CACHE_HOME`` is unset), or in ``$CLAX_XLA_CACHE`` when that is set. :func:`clax.runner.run` turns it
on unless the config says ``cache.xla=false`` (``clax run --set cache.xla=false``); it is safe to
delete the folder at any time. A cache directory already configured for JAX (``JAX_COMPILATION_CACHE_DIR``,
``jax.config.update("jax_compilation_cache_dir", ...)``, as the test suite does) is left as it is, and
``cache.xla=false`` then does not turn it off: clax only declines to set up its own.

Only compilations that take at least ``jax_persistent_cache_min_compile_time_secs`` are stored; clax
lowers JAX's default of 1 s to :data:`MIN_COMPILE_S`, 0 (where the user has not changed it): most of
clax's programs compile in well under a second on a CPU (a run of the main job compiles 3-70 of them,
most under 0.1 s) and together make up most of a short run's time; reading one back takes milliseconds.

Pretraining cache: a frozen backbone pretrained offline (CLR's and Soft-TF's glyph or CIFAR-10
pretraining, :mod:`clax.pretrain`) is kept in ``$XDG_CACHE_HOME/clax/pretrain`` (``$CLAX_PRETRAIN_CACHE``
when set) besides the run's own ``<workdir>/pretrain``, so a run in a fresh workdir copies it from there
instead of pretraining again (the main job's CLR run spends about 28 s of a 2-core CPU pretraining). It
holds the same checksummed Flax msgpack files as the workdir's cache, keyed by the backbone and every
pretraining setting and, on the CPU, by the cores the process may use (``-cpuN``,
:func:`clax.pretrain.cpu_threads_tag`); ``cache.pretrain=false`` turns it off. Like ``cache.xla`` it never
changes a result.
"""
from __future__ import annotations

import os
from typing import Optional

#: the compile time (seconds) from which a compilation is stored, where JAX's setting is at its default
MIN_COMPILE_S = 0.0
_JAX_DEFAULT_MIN_COMPILE_S = 1.0


def usable_cores() -> list[int]:
    """The cores this process may run on (its affinity, which XLA's CPU runtime sizes its thread pools
    by), or ``range(os.cpu_count())`` where the platform does not say."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def _user_dir(env: str, name: str) -> str:
    """``$env`` where set, else ``$XDG_CACHE_HOME/clax/<name>``, else ``~/.cache/clax/<name>``."""
    if os.environ.get(env):
        return os.path.abspath(os.path.expanduser(os.environ[env]))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(os.path.abspath(base), "clax", name)


def cache_dir() -> str:
    """Where clax keeps compiled programs: ``$CLAX_XLA_CACHE``, else ``$XDG_CACHE_HOME/clax/xla``, else
    ``~/.cache/clax/xla``."""
    return _user_dir("CLAX_XLA_CACHE", "xla")


def enable(path: Optional[str] = None) -> Optional[str]:
    """Turns on JAX's persistent compilation cache in ``path`` (default :func:`cache_dir`) and returns
    the directory in use; a directory already configured for JAX is kept and returned instead. Returns
    None, and changes nothing, when the folder cannot be made or written (the run goes on uncached).
    Takes effect for compilations after the call (call it before the first one, as the runner does)."""
    import jax

    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    path = path or cache_dir()
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return None
    if not os.access(path, os.W_OK | os.X_OK):
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    if jax.config.jax_persistent_cache_min_compile_time_secs == _JAX_DEFAULT_MIN_COMPILE_S:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_S)
    return path


def from_config(cfg: dict) -> Optional[str]:
    """:func:`enable` unless ``cfg``'s ``cache.xla`` is false (a config without a ``cache`` section, one
    written by an older clax, counts as true). Returns the directory in use, or None."""
    if not cfg.get("cache", {}).get("xla", True):
        return None
    return enable()


def pretrain_cache_dir() -> str:
    """Where clax shares pretrained frozen backbones between runs: ``$CLAX_PRETRAIN_CACHE``, else
    ``$XDG_CACHE_HOME/clax/pretrain``, else ``~/.cache/clax/pretrain``."""
    return _user_dir("CLAX_PRETRAIN_CACHE", "pretrain")


_SHARED_PRETRAIN: Optional[str] = None


def pretrain_from_config(cfg: dict) -> Optional[str]:
    """Sets the shared pretraining cache of the runs that follow in this process from ``cfg``'s
    ``cache.pretrain`` (a config without it, written by an older clax, counts as true) and returns the
    directory, or None where it is off or cannot be made or written (the runs then pretrain as before)."""
    global _SHARED_PRETRAIN
    _SHARED_PRETRAIN = None
    if not cfg.get("cache", {}).get("pretrain", True):
        return None
    path = pretrain_cache_dir()
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return None
    if os.access(path, os.W_OK):
        _SHARED_PRETRAIN = path
    return _SHARED_PRETRAIN


def shared_pretrain_dir() -> Optional[str]:
    """The shared pretraining cache set by :func:`pretrain_from_config`, or None (off)."""
    return _SHARED_PRETRAIN
