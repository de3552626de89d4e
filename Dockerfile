# medgcsam for GPU servers: train, evaluate and batch-predict with the `medgcsam` command.
#
#   docker build --build-arg GIT_COMMIT=$(git rev-parse HEAD) -t medgcsam:0.1.0 .
#   docker run --rm --gpus all -v /srv/studies:/data:ro -v /srv/models/bus:/model:ro -v /srv/out:/outputs \
#       medgcsam:0.1.0 predict --model /model --input /data --output /outputs/run1.csv
#
# /srv/models/bus is a downloaded MLflow model (`mlflow artifacts download -u models:/NAME@champion`) or a
# checkpoint .pt; /srv/out must be writable by uid 10001. For models:/ URIs use the compose `predict` service
# (it reaches the `mlflow` server by name). BASE_IMAGE must carry python with torch/torchvision equal to the
# pins in pyproject.toml (2.14.1 / 0.29.1): the CUDA PyTorch image by default; scripts/container_check.sh
# builds a Debian one without any image registry (docs/container.md has what it built and ran).
ARG BASE_IMAGE=pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    HF_HOME=/weights/huggingface \
    TORCH_HOME=/weights/torch \
    MPLCONFIGDIR=/tmp/matplotlib \
    MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false

# A fixed non-root uid so files written to the volumes have a predictable owner on the host.
RUN groupadd --gid 10001 medgcsam \
    && useradd --uid 10001 --gid medgcsam --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin medgcsam \
    && mkdir -p /data /weights /mlflow \
    && chown medgcsam:medgcsam /data /weights /mlflow

WORKDIR /opt/medgcsam
COPY pyproject.toml constraints.txt README.md ./
COPY medgcsam ./medgcsam
COPY pipelines ./pipelines
# Same install command as docs/container.md (non-editable here, because the source does not change);
# constraints.txt holds the exact versions the test suite ran with.
RUN python -m pip install -c constraints.txt ".[dicom,server]" \
    && python -c "import medgcsam.cli, torch; assert torch.__version__.split('+')[0] == '2.14.1', torch.__version__"

# the commit the registry tags a model trained here with (there is no checkout in the image)
ARG GIT_COMMIT=unknown
ENV MEDGCSAM_GIT_COMMIT=${GIT_COMMIT}

USER 10001:10001
WORKDIR /mlflow
VOLUME ["/data", "/weights", "/mlflow"]
ENTRYPOINT ["medgcsam"]
CMD ["--help"]
