"""LightningDataModules over the datasets of :mod:`moezoo.training.datasets`: seeded train/validation splits,
shuffled training loaders, and the batch format each task's LightningModule reads.

- :mod:`.images`: ``DigitsDataModule``, ``ShapesDataModule``, ``ImageFolderDataModule`` (DiffusionModule).
- :mod:`.video`: ``MovingShapesDataModule``, ``VideoFolderDataModule`` (DiffusionModule on video models).
- :mod:`.weather`: ``SyntheticWeatherDataModule``, ``PairedFolderDataModule`` (RestorationModule).
- :mod:`.fusion_pairs`: ``SyntheticFusionDataModule``, ``PairedFolderDataModule`` (FusionModule).
- :mod:`.audio`: ``SpeechDataModule``, ``MusicDataModule``, ``MixedAudioDataModule``, ``AudioFolderDataModule``
  (the audio tokenizer, vocoder and LM).
- :mod:`.scenes`: ``ScenesQADataModule``, ``ImageTextFolderDataModule`` (question answering on pictures).
- :mod:`.base`: the loaders they share.
"""
