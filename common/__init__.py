"""Rules every psearch package shares, each written once.

- :mod:`common.files`: the one durable atomic file write (temporary file, fsync, rename, fsync
  of the folder).
- :mod:`common.reading`: reading a file someone else named: a regular file only, bounded in
  size, and never through a link out of the allowed folders.
- :mod:`common.config_files`: reading a YAML mapping from a file, and ``--set key=value``
  overrides.
- :mod:`common.boxes`: box overlaps in numpy (IoU, IoA) and the max-IoU pick of a query.
- :mod:`common.run_folder`: the layout of a training run folder, which ``psearch-train``
  writes and ``psearch-export`` reads.

It depends on no other psearch package (numpy and PyYAML only), so that ``models``,
``training``, ``export``, ``indexer`` and ``server`` can all use it.
"""
