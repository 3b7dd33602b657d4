import os
import tempfile

# The bench writes alpha_jit's kernel and pipeline caches: keep the test session's out of home.
os.environ.setdefault("ALPHA_JIT_CACHE_DIR", tempfile.mkdtemp(prefix="alpha_jit_cache_"))
