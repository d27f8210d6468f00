"""The known-truth benchmark (``ldm-smd bench-mixture``), a client of stage 2.

- :mod:`ldm_smd.bench.spec`: the ``bench:`` block of a config and the stage-2 config of each run
  (light: no Lightning, imported by the config loader);
- :mod:`ldm_smd.bench.runner`: trains every run through :mod:`ldm_smd.train`, samples, scores
  (:mod:`ldm_smd.eval.mixture_metrics`) and writes the tables and plots.

Nothing is imported here, so that loading a config does not import the training code.
"""
