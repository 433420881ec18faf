import os

from hypothesis import settings

# Shared, noisy CI machines: no per-example deadline; the example count keeps the run short.
settings.register_profile("segpipe", deadline=None, max_examples=100)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "segpipe"))
