"""Datasets and synthetic renderers as plain torch/numpy code: no Lightning, so training, bench and the app
share them.

- :mod:`.images`: digits, generated shapes (and their captions), image folders.
- :mod:`.video`: generated moving shapes, video folders.
- :mod:`.photos`: real photographs shipped by scikit-image, scikit-learn and gradio, split by photograph into
  train, val and test.
- :mod:`.weather`: synthetic weather on the photos, paired deweathering folders.
- :mod:`.fusion_pairs`: synthetic infrared/visible pairs from the photos, paired fusion folders.
- :mod:`.audio`: eSpeak NG words, synthesised notes and chords (captions read back), sound folders.
- :mod:`.scenes`: Sort-of-CLEVR-style scenes with captions and questions by type, held-out colour-shape pairs.

The LightningDataModules that wrap them are in :mod:`moezoo.training.datamodules`.
"""
