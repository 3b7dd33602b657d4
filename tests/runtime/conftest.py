import os
import tempfile

import pytest

# Keep the on-disk pipeline/SPIR-V caches of the test session out of the user's home.
os.environ.setdefault("ALPHA_JIT_CACHE_DIR", tempfile.mkdtemp(prefix="alpha_jit_cache_"))


@pytest.fixture(scope="session")
def device():
    from alpha_jit.runtime.device import get_device

    return get_device()
