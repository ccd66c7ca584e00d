#!/usr/bin/env bash
# Entrypoint of psearch's images (docker/Dockerfile.gpu, docker/Dockerfile.cpu).
#
#   serve [ARGS...]   the default: prepare the model, then run the search API
#                     (psearch-serve ARGS...; settings from the PSEARCH_* variables)
#   index [ARGS...]   prepare the model, then add images to the gallery:
#                     psearch-index add --model <the prepared model> --gallery $PSEARCH_GALLERY_DIR
#                         --backend $PSEARCH_BACKEND --device $PSEARCH_DEVICE
#                         [--min-score $PSEARCH_MIN_DETECTION_SCORE]
#                         --max-pixels $PSEARCH_MAX_IMAGE_PIXELS
#                         --max-bytes $PSEARCH_MAX_IMAGE_BYTES ARGS...
#                     e.g. index /images --recursive --job bulk (run again to resume)
#   anything else     runs as given: psearch-index stats /galleries/main, python -m export ..., bash
#
# Preparing the model (docker/prepare_model.py) checks $PSEARCH_MODEL_DIR and, with
# PSEARCH_BACKEND=tensorrt, builds the TensorRT engine of the GPU found (minutes, once per GPU
# architecture, TensorRT version and model) into $ENGINE_CACHE_DIR: the models volume is
# read-only, so PSEARCH_MODEL_DIR then names a mirror of the model folder there, which holds
# the engine. The service starts on a ready engine instead of building it on its first load.
set -euo pipefail

# prepare_model.py lies beside this script (/opt/psearch in the images, docker/ in the repository).
here=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")

prepare_model() {
    local prepared
    prepared=$(python "$here/prepare_model.py" \
        --model-dir "${PSEARCH_MODEL_DIR:?set PSEARCH_MODEL_DIR to an exported model folder}" \
        --backend "${PSEARCH_BACKEND:-auto}" \
        --device "${PSEARCH_DEVICE:-cpu}" \
        --cache-dir "${ENGINE_CACHE_DIR:-/var/cache/psearch/engines}")
    export PSEARCH_MODEL_DIR="$prepared"
}

if [[ $# -eq 0 ]]; then
    set -- serve
fi

case "$1" in
    serve)
        shift
        prepare_model
        exec psearch-serve "$@"
        ;;
    index)
        shift
        prepare_model
        # The service's detection floor and image limits (their defaults are the service's;
        # without PSEARCH_MIN_DETECTION_SCORE both take the model folder's threshold): bulk
        # indexing stores the persons an upload of the same image would.
        exec psearch-index add \
            --model "$PSEARCH_MODEL_DIR" \
            --gallery "${PSEARCH_GALLERY_DIR:?set PSEARCH_GALLERY_DIR to the gallery folder}" \
            --backend "${PSEARCH_BACKEND:-auto}" \
            --device "${PSEARCH_DEVICE:-cpu}" \
            ${PSEARCH_MIN_DETECTION_SCORE:+--min-score "$PSEARCH_MIN_DETECTION_SCORE"} \
            --max-pixels "${PSEARCH_MAX_IMAGE_PIXELS:-40000000}" \
            --max-bytes "${PSEARCH_MAX_IMAGE_BYTES:-67108864}" \
            "$@"
        ;;
    *)
        exec "$@"
        ;;
esac
