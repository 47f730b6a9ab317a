"""The project's library: plain Python under the ZenML steps (see docs/layout.md)."""

import os

# OpenMP threads that wait at a barrier spin (busy-wait) by default. With two training processes on the same cores
# (a schedule overlapping a manual run, two sweep pods on one node) each spinning thread holds a core the other
# process needs: two concurrent default runs on 2 cores took 5.6x one run's time instead of about 2x. PASSIVE
# waiters sleep; alone it costs nothing measurable (docs/performance.md). libgomp reads this once, when torch loads,
# so it is set here, before any project module imports torch; a value the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
