#!/usr/bin/env bash
# Create or update the project virtualenv: bash cluster/env/install.sh VENV [EXTRAS]
#   bash cluster/env/install.sh .venv          # runtime only
#   bash cluster/env/install.sh .venv test     # with test extras (understanding's among them)
#   bash cluster/env/install.sh .venv understanding   # with lmms-eval, for `unilip eval understanding`
#   UNILIP_INSTALLER=pip bash cluster/env/install.sh .venv test   # the pip fallback
# uv (from PyPI, bootstrapped into VENV/.uv-tool when it is not on PATH) creates the venv
# and installs; pip does the same, slower, with UNILIP_INSTALLER=pip or where uv cannot be
# had. Every version comes from cluster/env/constraints.txt (for pip exported as
# PIP_CONSTRAINT so it also reaches isolated build environments). Without an NVIDIA GPU it
# installs the CPU build of torch (a local CPU wheel from PIP_FIND_LINKS, or
# UNILIP_TORCH_INDEX such as the PyTorch CPU index) and fails if any CUDA package slipped
# in; UNILIP_CUDA=1 forces the CUDA build (container images are built on machines without
# a GPU). DeepSpeed, source-only, is built against the torch installed first.
set -euo pipefail

venv=${1:?usage: install.sh VENV [EXTRAS]}
extras=${2:-}
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
constraints="$here/constraints.txt"
export PIP_CONSTRAINT="$constraints"
export PIP_DISABLE_PIP_VERSION_CHECK=1
UV_VERSION=0.13.9

have_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }
step() { printf '[install] %s (%ss)\n' "$*" "$SECONDS"; }

installer=${UNILIP_INSTALLER:-uv}
uv=""
if [ "$installer" = uv ]; then
  if command -v uv >/dev/null 2>&1; then
    uv=$(command -v uv)
  elif [ -x "$venv/.uv-tool/bin/uv" ]; then
    uv="$venv/.uv-tool/bin/uv"
  elif python3 -m pip install --quiet --target "$venv/.uv-tool" "uv==$UV_VERSION" 2>/dev/null; then
    uv="$venv/.uv-tool/bin/uv"
  else
    step "uv could not be installed: falling back to pip"
    installer=pip
  fi
fi

if [ "$installer" = uv ]; then
  # pip's own sources (a local wheel directory, the torch index) for uv too
  sources=(${PIP_FIND_LINKS:+--find-links "$PIP_FIND_LINKS"} ${UNILIP_TORCH_INDEX:+--extra-index-url "$UNILIP_TORCH_INDEX"})
  if [ ! -x "$venv/bin/python" ]; then
    step "creating $venv with uv $("$uv" --version | cut -d' ' -f2)"
    "$uv" venv --quiet --seed --allow-existing --python python3 "$venv"  # --seed: pip and setuptools, which DeepSpeed's build needs
  fi
  # --compile-bytecode: pip writes .pyc files at install, uv only when asked; where
  # PYTHONDONTWRITEBYTECODE is set (as on CI machines) nothing would write them later,
  # and every process would compile torch, transformers and Ray on import (2x slower).
  install() { "$uv" pip install --quiet --compile-bytecode --python "$venv/bin/python" --constraint "$constraints" "${sources[@]}" "$@"; }
  installed() { "$uv" pip show --quiet --python "$venv/bin/python" "$1" >/dev/null 2>&1; }
  freeze() { "$uv" pip freeze --python "$venv/bin/python"; }
  install setuptools wheel  # pinned: DeepSpeed's build runs with them
else
  if [ ! -x "$venv/bin/python" ]; then
    step "creating $venv with pip"
    python3 -m venv "$venv"
  fi
  install() { "$venv/bin/python" -m pip install --quiet ${UNILIP_TORCH_INDEX:+--extra-index-url "$UNILIP_TORCH_INDEX"} "$@"; }
  installed() { "$venv/bin/python" -m pip show "$1" >/dev/null 2>&1; }
  freeze() { "$venv/bin/python" -m pip list --format=freeze; }
  install pip setuptools wheel
fi

if [ "${UNILIP_CUDA:-0}" = 1 ] || have_gpu; then
  step "CUDA torch (NVIDIA GPU found or UNILIP_CUDA=1)"
  install torch torchvision
  ds_env=(DS_BUILD_SHM_COMM=1)
else
  step "no GPU: CPU torch"
  install torch torchvision
  ds_env=(DS_ACCELERATOR=cpu DS_BUILD_SHM_COMM=1)
fi

# deepspeed is source-only and its setup imports torch: build it against the torch above.
if ! installed deepspeed; then
  step "building deepspeed (about 1 min, once)"
  (export "${ds_env[@]}"; install --no-build-isolation deepspeed)
fi

step "installing unilip${extras:+[$extras]}"
install -e "$root${extras:+[$extras]}"

# lmms-eval (`unilip eval understanding`) declares every model's and task's dependencies,
# among them wandb, whose pin needs protobuf < 7 where Ray and MLflow run on 7: it is
# installed without them, next to what its image benchmarks import (the extra above).
if [[ ",$extras," == *,understanding,* || ",$extras," == *,test,* ]]; then
  install --no-deps lmms-eval
fi

# The torchvision import hook (a no-op where torchvision's compiled ops load).
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cp "$here/torchvision_compat.py" "$site/_unilip_torchvision_compat.py"
echo "import _unilip_torchvision_compat" > "$site/_unilip_torchvision_compat.pth"

if [ "${UNILIP_CUDA:-0}" != 1 ] && ! have_gpu; then
  cuda=$(freeze | grep -i -E '^(nvidia-|triton)' || true)
  if [ -n "$cuda" ]; then
    echo "[install] error: CUDA packages were installed on a machine without a GPU:" >&2
    echo "$cuda" >&2
    echo "[install] set UNILIP_TORCH_INDEX to an index with the CPU build of torch 2.13.0" >&2
    exit 1
  fi
fi
step "done with $installer"
