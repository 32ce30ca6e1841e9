#!/usr/bin/env bash
# Install covshift and what it needs on a fresh machine.
#
#   bash scripts/install.sh          # the package, its dependencies and the data
#                                    # (Fashion-MNIST, the World English Bible)
#   bash scripts/install.sh --test   # the same, plus the test and lint tools and the
#                                    # optional extras the tests cover (Ray, TensorBoard,
#                                    # transformers + accelerate, pytorch-lightning)
#
# torch is pinned to the CPU build that lies on this machine's disk (2.13.0): an open
# requirement would let pip pull a several-GB CUDA build. Override with TORCH_SPEC,
# e.g. TORCH_SPEC="torch==2.5.1" on a machine with its own wheel.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
if [[ "${1:-}" == "--test" ]]; then
  extras="[test]"
fi

PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
"$PYTHON" -m pip install --quiet "$TORCH_SPEC"
# The pin as a constraint, so that no dependency (or extra: Ray, TensorBoard, the
# trainers) can replace that torch with another build.
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "$TORCH_SPEC" > "$constraints"
if [[ -n "$extras" ]] && "$PYTHON" -c 'import sys, torch; sys.exit("+cpu" not in torch.__version__)'; then
  # The test extra's timm imports torchvision, and PyPI's torchvision is built against
  # PyPI's (CUDA) torch: beside a CPU-only torch its C++ ops do not load and its import
  # fails ("operator torchvision::nms does not exist"). The matching CPU build is on
  # PyTorch's own index; installed first, it satisfies timm's requirement.
  "$PYTHON" -m pip install --quiet -c "$constraints" \
    --index-url https://download.pytorch.org/whl/cpu torchvision
fi
"$PYTHON" -m pip install --quiet -c "$constraints" -e ".${extras}"
if [[ -n "$extras" ]] && ! "$PYTHON" -c 'import torchvision' 2>/dev/null; then
  # No matching torchvision could be had (PyTorch's index unreachable): a torchvision
  # that fails at import breaks whatever imports it (transformers' vision models too),
  # so it goes, with timm; the timm test then skips and says why.
  echo "note: torchvision does not import beside torch here; removing timm and torchvision" >&2
  "$PYTHON" -m pip uninstall --quiet -y timm torchvision
fi

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
