#!/usr/bin/env bash
# Wheels the device machine lacks (it has no network): diffusers and its one missing requirement, for its
# Python 3.12, into .whl/ (ignored by git). Pass the folder to the device tool's `carry`; gpu_session.sh
# installs them. Run here, on a machine with network access:  bash benchmarks/fetch_wheels.sh
# importlib_metadata stays below 9: later releases import lazy_importer on Python < 3.15, which the device
# machine does not have. Everything else diffusers requires is there (huggingface-hub >= 1.32, safetensors,
# regex, requests, Pillow, filelock, numpy, zipp).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -f .whl/diffusers-*.whl .whl/importlib_metadata-*.whl  # one version of each: two stop the install there
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "diffusers==0.42.1" "importlib_metadata==8.7.0"
ls -l .whl
