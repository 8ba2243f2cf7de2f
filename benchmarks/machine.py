"""What a benchmark ran on: the CPU model (printed and stored beside every figure)."""

from __future__ import annotations

import os
import platform
import re

# The vector extensions that decide how fast a float32 or bfloat16 matrix product runs here.
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu_model() -> str:
  """The CPU's model name from /proc/cpuinfo with its family / model numbers and `ISA_FLAGS`, e.g.
  ``AMD EPYC (family 25, model 17; avx2 avx512f avx512_bf16)``: a bare name such as "AMD EPYC"
  covers both Zen 3 hosts (AVX2 only) and Zen 4 hosts (AVX-512, AVX-512 BF16), whose figures here
  differ by 1.5x or more (docs/serving.md "Session 39"). Else what `platform` knows.

  When ``XLA_FLAGS`` holds ``--xla_cpu_max_isa=<ISA>`` the string says so (``...; XLA limited to
  AVX2``): such a figure is this CPU running code for a lesser ISA, not a CPU of that kind."""
  info = {}
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "cpu family", "model", "flags") and key not in info:
          info[key] = value.strip()
        if not line.strip() and "model name" in info:
          break  # the first processor's block is enough
  except OSError:
    pass
  limit = re.search(r"--xla_cpu_max_isa=(\S+)", os.environ.get("XLA_FLAGS", ""))
  limit = f"; XLA limited to {limit.group(1)}" if limit else ""
  if "model name" not in info:
    return (platform.processor() or "unknown") + limit
  flags = set(info.get("flags", "").split())
  isa = " ".join(f for f in ISA_FLAGS if f in flags) or "no AVX2"
  return f"{info['model name']} (family {info.get('cpu family', '?')}, model {info.get('model', '?')}; {isa}{limit})"
