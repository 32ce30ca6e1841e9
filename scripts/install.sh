#!/usr/bin/env bash
# Install covshift and what it needs on a fresh machine.
#
#   bash scripts/install.sh          # the package, its dependencies and the data
#                                    # (Fashion-MNIST, the World English Bible)
#   bash scripts/install.sh --test   # the same, plus the test and lint tools and the
#                                    # optional extras the tests cover (Ray, TensorBoard,
#                                    # transformers + accelerate, pytorch-lightning, timm)
#
# torch is pinned, so that an open requirement never lets pip pull another build:
# - by default the CPU build of 2.13.0 that lies on this machine's disk;
# - with --test, torch 2.14.1 and its torchvision 0.29.1 (PyPI's builds, on this
#   machine's disk too; they run on the CPU). The test extra's timm imports torchvision,
#   and a torchvision loads only beside the torch build it was compiled for: PyPI's
#   torchvision wheels are built against PyPI's torch, and beside the CPU-only 2.13.0
#   their C++ ops fail to load ("operator torchvision::nms does not exist").
# Override with TORCH_SPEC (and TORCHVISION_SPEC), e.g. TORCH_SPEC="torch==2.5.1".
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
default_torch="torch==2.13.0"
torchvision=""
if [[ "${1:-}" == "--test" ]]; then
  extras="[test]"
  default_torch="torch==2.14.1"
  torchvision="${TORCHVISION_SPEC:-torchvision==0.29.1}"
fi

PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-$default_torch}"
"$PYTHON" -m pip install --quiet "$TORCH_SPEC" ${torchvision:+"$torchvision"}
# The pins as constraints, so that no dependency (or extra: Ray, TensorBoard, the
# trainers, timm) can replace that torch (or torchvision) with another build.
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "$TORCH_SPEC" > "$constraints"
if [[ -n "$torchvision" ]]; then
  echo "$torchvision" >> "$constraints"
fi
"$PYTHON" -m pip install --quiet -c "$constraints" -e ".${extras}"

# The data, from Debian's packages: Fashion-MNIST (the default dataset) from
# dataset-fashion-mnist, and the World English Bible (public domain; the language
# model's text, dataset world-english-bible) from sword-text-web.
missing=()
[[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]] ||
  missing+=(dataset-fashion-mnist)
[[ -f /usr/share/sword/modules/texts/ztext/engWEB2015eb/ot.bzz ]] ||
  missing+=(sword-text-web)
if (( ${#missing[@]} )); then
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
    echo "installing the data (Debian packages ${missing[*]})"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "note: data missing; as root run: apt-get install -y ${missing[*]}" >&2
    echo "      (or point --data-dir / COVSHIFT_DATA_DIR at a folder with the IDX files)" >&2
  fi
fi
echo "covshift installed: $("$PYTHON" -c 'import covshift; print(covshift.__version__)')"
