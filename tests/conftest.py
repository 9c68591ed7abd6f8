import os

from hypothesis import settings

# UCX over plain TCP, as on any machine without RDMA: CI tests the UCX transport for real.
os.environ.setdefault("UCX_TLS", "tcp")
os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")

# CI replays the same examples every run; a developer's run explores new ones.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")
