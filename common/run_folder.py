"""The training run folder: what ``psearch-train`` writes and ``psearch-export`` reads.

::

    RUN_DIR/
        model.safetensors   every parameter and persistent buffer (OIM tables included)
        config.yaml         the resolved training config (its ``model`` section builds the model;
                            its ``eval.det_thresh`` is the threshold the export recommends)
        state.pt            optimizer, scheduler, grad scaler, progress counters, RNG states
        metrics.json        the latest evaluation
        predictions.npz     its detections and embeddings (python -m training.evaluate)
        tensorboard/        scalars

An exported model folder is another thing (``export/artifact.py``): its weights are
``checkpoint.safetensors`` beside ``psearch.json``.
"""

RUN_WEIGHTS_FILE = "model.safetensors"
RUN_CONFIG_FILE = "config.yaml"
RUN_STATE_FILE = "state.pt"
RUN_METRICS_FILE = "metrics.json"
RUN_PREDICTIONS_FILE = "predictions.npz"
RUN_TENSORBOARD_DIR = "tensorboard"
