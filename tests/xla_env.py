"""XLA_FLAGS for a test's subprocess: the parent's flags (launch/run_tests.sh sets them) with the
fake CPU device count replaced, so that a subprocess compiles as the test process does."""

import os

DEVICE_COUNT = "--xla_force_host_platform_device_count"


def xla_flags(devices: int) -> str:
  kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_COUNT + "=")]
  return " ".join([*kept, f"{DEVICE_COUNT}={devices}"])
