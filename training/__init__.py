"""moezoo.training: Lightning training for the zoo's models, split by role.

- :mod:`.datasets`: datasets and synthetic renderers as plain torch/numpy code, no Lightning (also used by
  bench/ and the app).
- :mod:`.datamodules`: the LightningDataModules over them.
- :mod:`.diffusion`, :mod:`.restoration`, :mod:`.fusion`, :mod:`.audio_lm`: the LightningModules, one per task;
  :mod:`.audio_codec`: the audio tokenizer's and vocoder's.
- :mod:`.common`: what every LightningModule uses (EMA, loss and expert-load logging, parameter groups, the
  warm-up/cosine schedule, the export at fit end).
- :mod:`.runs`: one resumable folder per run (RunLogger, RunCheckpoint); :mod:`.callbacks`: ProgressLog,
  SampleGrid; :mod:`.checkpoints`: weights-only checkpoint reading.
- :mod:`.cli`: ``moezoo-train`` and ``moezoo-export``; ``configs/``: the shipped YAML configs.
- :mod:`.fusion_metrics`: the fusion literature's image-quality metrics (numpy); :mod:`.audio_metrics`: pitch,
  chord and silence measures and the word judge of bench/audio_quality.py (no Lightning).
"""
