#!/usr/bin/env bash
# Create or update the project virtualenv: bash cluster/env/install.sh VENV [EXTRAS]
#   bash cluster/env/install.sh .venv          # runtime only
#   bash cluster/env/install.sh .venv test     # with test extras
# Every version comes from cluster/env/constraints.txt (exported as PIP_CONSTRAINT so
# it also reaches isolated build environments). Without an NVIDIA GPU it installs the
# CPU build of torch and fails if any CUDA package slipped in; UNILIP_CUDA=1 forces the CUDA
# build (container images are built on machines without a GPU).
set -euo pipefail

venv=${1:?usage: install.sh VENV [EXTRAS]}
extras=${2:-}
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
export PIP_CONSTRAINT="$here/constraints.txt"
export PIP_DISABLE_PIP_VERSION_CHECK=1

have_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }
step() { printf '[install] %s\n' "$*"; }

if [ ! -x "$venv/bin/python" ]; then
  step "creating $venv"
  python3 -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --quiet)
"${pip[@]}" pip setuptools wheel

if [ "${UNILIP_CUDA:-0}" = 1 ] || have_gpu; then
  step "CUDA torch (NVIDIA GPU found or UNILIP_CUDA=1)"
  "${pip[@]}" torch torchvision
  ds_env=(DS_BUILD_SHM_COMM=1)
else
  # torch==2.13.0 from the constraints; a local CPU wheel (find-links, or
  # UNILIP_TORCH_INDEX such as the PyTorch CPU index) wins over the CUDA build.
  step "no GPU: CPU torch"
  "${pip[@]}" ${UNILIP_TORCH_INDEX:+--extra-index-url "$UNILIP_TORCH_INDEX"} torch torchvision
  ds_env=(DS_ACCELERATOR=cpu DS_BUILD_SHM_COMM=1)
fi

# deepspeed is source-only and its setup imports torch: build it against the torch above.
if ! "$venv/bin/python" -m pip show deepspeed >/dev/null 2>&1; then
  step "building deepspeed (about 2 min, once)"
  env "${ds_env[@]}" "${pip[@]}" --no-build-isolation deepspeed
fi

step "installing unilip${extras:+[$extras]}"
"${pip[@]}" -e "$root${extras:+[$extras]}"

# The torchvision import hook (a no-op where torchvision's compiled ops load).
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cp "$here/torchvision_compat.py" "$site/_unilip_torchvision_compat.py"
echo "import _unilip_torchvision_compat" > "$site/_unilip_torchvision_compat.pth"

if [ "${UNILIP_CUDA:-0}" != 1 ] && ! have_gpu; then
  cuda=$("$venv/bin/python" -m pip list --format=freeze | grep -i -E '^(nvidia-|triton)' || true)
  if [ -n "$cuda" ]; then
    echo "[install] error: CUDA packages were installed on a machine without a GPU:" >&2
    echo "$cuda" >&2
    echo "[install] set UNILIP_TORCH_INDEX to an index with the CPU build of torch 2.13.0" >&2
    exit 1
  fi
fi
step "done"
