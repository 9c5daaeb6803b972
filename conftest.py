"""Fixtures for real RabbitMQ, MongoDB and Redis are shared by every test in the repository."""

import os
import tempfile

# numba's on-disk cache (librosa's kernels, the analyzer's) is written by every process that compiles; the
# processes of a test run (and of earlier runs) must not share one inside the installed packages, where a
# concurrent writer can leave an index pointing at another signature's code. One fresh cache per run,
# inherited by the services the tests start.
os.environ.setdefault("NUMBA_CACHE_DIR", tempfile.mkdtemp(prefix="stemflow-numba-"))

pytest_plugins = ["stemflow_dev.fixtures"]
