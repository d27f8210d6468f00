"""The benchmark (``ldm-smd bench``, alias ``bench-mixture``), a client of stage 2.

- :mod:`ldm_smd.bench.spec`: the ``bench:`` block of a config and the stage-2 config of each run
  (light: no Lightning; it registers the block with the config loader);
- :mod:`ldm_smd.bench.scorers`: the scorer protocol, the mixture and the image scorer;
- :mod:`ldm_smd.bench.runner`: the plan and the folder; :mod:`ldm_smd.bench.runs` trains a run
  through :mod:`ldm_smd.train`, samples and scores it; :mod:`ldm_smd.bench.first_stage`,
  :mod:`ldm_smd.bench.outputs` (tables, plots) and :mod:`ldm_smd.bench.earlier` (what a folder
  already holds: ``--resume``, ``--overwrite``).

Nothing is imported here, so that loading a config does not import the training code.
"""
