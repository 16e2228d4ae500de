"""Callbacks: a sample grid (and the expert-routing map behind it) saved while a diffusion model trains."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from torchvision.utils import make_grid, save_image


class SampleGrid(pl.Callback):
    """Every ``every_n_epochs`` validation epochs, sample ``num_samples`` images with the EMA weights and save
    them as one PNG grid in ``<log_dir>/samples/epoch=NNN.png``.

    Class models draw the classes in turn; text models draw the first captions of the validation set.

    Args:
        every_n_epochs: how often (in validation epochs).
        num_samples: images in the grid.
        num_inference_steps: sampling steps.
        guidance_scale: classifier-free guidance scale.
        seed: the noise seed (the same noise every time, so grids are comparable across epochs).
    """

    def __init__(self, every_n_epochs: int = 1, num_samples: int = 20, num_inference_steps: int = 20,
                 guidance_scale: float = 2.0, seed: int = 0):
        self.every_n_epochs, self.num_samples = every_n_epochs, num_samples
        self.num_inference_steps, self.guidance_scale, self.seed = num_inference_steps, guidance_scale, seed
        self.last_path: Path | None = None

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        images = self.sample(trainer, pl_module)
        folder = Path(trainer.log_dir or trainer.default_root_dir) / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        self.last_path = folder / f"epoch={trainer.current_epoch:03d}.png"
        save_image(make_grid(images, nrow=min(10, len(images)), padding=1), self.last_path)

    @torch.no_grad()
    def sample(self, trainer: pl.Trainer, pl_module) -> torch.Tensor:
        model = pl_module.sampling_model
        pipe = pl_module.pipeline()
        generator = torch.Generator().manual_seed(self.seed)
        kwargs = dict(num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale,
                      generator=generator, output_type="pt")
        was_training = model.training
        try:
            if model.config.num_classes:
                labels = [i % model.config.num_classes for i in range(self.num_samples)]
                return pipe(class_labels=labels, **kwargs).images
            captions = _validation_captions(trainer, self.num_samples)
            return pipe(prompt=captions, **kwargs).images
        finally:
            model.train(was_training)


def _validation_captions(trainer: pl.Trainer, count: int) -> list[str]:
    datamodule = trainer.datamodule
    dataset = getattr(datamodule, "val_set", None)
    if dataset is None:
        raise RuntimeError("SampleGrid on a text model needs a DataModule with a val_set of captioned images")
    captions = [dataset[i]["caption"] for i in range(min(count, len(dataset)))]
    return captions
