"""Test setup: 8 fake CPU devices (for the sharding tests), quiet TensorFlow, no network."""

import os

# The flags launch/run_tests.sh sets (why: its comment).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TFDS_DATA_DIR", os.path.join(os.path.dirname(os.path.dirname(__file__)), ".cache", "tfds"))
