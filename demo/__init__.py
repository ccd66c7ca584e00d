"""``python -m demo`` (``make demo``): the whole system on one machine, from nothing.

::

    python -m demo [--data-dir data/demo] [--port 8000] [--minutes 9]
                   [--config configs/tiny/alignps_synthetic.yaml] [--seed 0] [--no-serve]

1. **data**: a synthetic dataset in PRW's file format (the generator's default size and
   difficulty), cached under ``--data-dir`` by seed and options (``training.synthetic``);
2. **the model folder** (:func:`demo.build.model_folder`, the one step to replace to serve
   another model): a tiny model (``--config``) trained on the data within ``--minutes``
   (``schedule.max_minutes``: the trainer times its first iterations and plans as many of the
   config's iterations as fit, with its warmup and learning rate milestones moved alike), then
   exported to an ONNX model folder (checked against PyTorch). The run is cached, keyed by the
   config, the seed, the data and the budget; an interrupted run continues next time;
3. **index**: the ingest pipeline puts every test frame in a gallery of that model;
4. **service**: the API on 127.0.0.1 (its allowed root is the dataset, so that the web page
   shows the frames of the matches), and a check. Every query of the test split is searched
   through the HTTP API in the PRW protocol (the gallery is every test frame but the query's
   own), and a search counts as right when its top hit is a box of the query's identity (IoU of
   at least 0.5 with its annotated box). The first query whose top hit is right is written to
   ``--data-dir/query.jpg`` and its search is printed as a ``curl`` command, run once more here
   with exactly that file and those fields; when no query is right, the demo says so.

Each stage prints how long it took. The service then runs until Ctrl-C; ``--no-serve`` runs the
check against an in-process app instead and exits (for tests). Exit status: 0 when the system
came up (whatever the check found: it is printed), 2 on a mistake the user can fix (a busy
port), 130 when interrupted before the service started.

The demo lives beside the packages, not in them: it uses all of them (``training`` to make its
model, ``export``, ``indexer``, ``server``), which none of them may.
"""
