"""Shared test configuration: hypothesis profiles (a deterministic one for CI), float64, and
JAX's persistent compilation cache for the session."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev", max_examples=60, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# ---- JAX: one compilation per distinct program, for the whole session ----------------------------
#
# Eager JAX re-traces and re-compiles at every call (`lax.while_loop`s, `custom_linear_solve`):
# the same XLA program is compiled again and again, in one test (a loop over inputs) and across
# tests (the same small problem). JAX's persistent compilation cache, keyed by the compiled module
# itself (HLO, compile options, jax/XLA versions, host-callback pointers included), hands back
# the executable XLA built the first time: the same code runs, only the compile is skipped (about
# 3x faster per eager call on CPU). Nothing is cached across sessions: the directory is fresh and
# removed at exit. It is inherited by subprocesses (tests/test_sharding.py, the docs), which is
# harmless: their programs differ or are the same programs. "Compiling ..." log lines (what
# tests/test_scipy_adversarial.py counts) are emitted at lowering, before the cache is looked up,
# so recompilations are still seen. Set JAX_COMPILATION_CACHE_DIR yourself to override, or
# IDF_TEST_JAX_CACHE=0 to run without it.

def _jax_compilation_cache() -> None:
    if (os.environ.get("IDF_TEST_JAX_CACHE", "1") == "0"
            or "JAX_COMPILATION_CACHE_DIR" in os.environ):
        return
    path = tempfile.mkdtemp(prefix="idf-test-jax-cache-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    options = {
        "JAX_COMPILATION_CACHE_DIR": path,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",  # small programs are the point
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }
    os.environ.update(options)
    if "jax" in sys.modules:  # imported already (by a plugin): its config read the env before
        jax = sys.modules["jax"]
        for key, value in options.items():
            name = key.lower()
            jax.config.update(name, float(value) if "SECS" in key else
                              int(value) if "BYTES" in key else value)


_jax_compilation_cache()
