# Triton for ctscreen's gpu and gpu-ort profiles: the NGC image plus what the python models import.
# The NGC tritonserver image has the tensorrt_plan, onnxruntime and python backends but not scipy,
# which postprocess/1/ctscreen/postprocess.py needs (scipy.ndimage.label); numpy stays < 2 (with
# numpy 2 a python-backend stub built for numpy 1 sends 0-byte tensors). The tag must match the
# TensorRT image that builds the plans (helm values: triton.image.tag == triton.engines.image.tag).
#   docker build -f model_repository/triton.Dockerfile -t <registry>/ctscreen-triton:24.10 .
# Not built on the development machines (no Docker there).
ARG TRITON_TAG=24.10-py3
FROM nvcr.io/nvidia/tritonserver:${TRITON_TAG}
# exact versions, as constraints.txt pins the gateway's: numpy its own; scipy the newest the earlier range (<1.15)
# admitted (constraints.txt's 1.17.1 needs Python 3.11; the NGC image's is 3.10)
RUN python3 -m pip install --no-cache-dir "numpy==1.26.4" "scipy==1.14.1" \
 && python3 -c "import numpy, scipy.ndimage; assert numpy.__version__ < '2'"
