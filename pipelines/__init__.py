"""moezoo.pipelines: inference, one pipeline per task, diffusers-style (``from_pretrained`` + ``__call__``)."""

from .dit_moe import DiTMoEPipeline, DiTMoEPipelineOutput, make_scheduler

__all__ = ["DiTMoEPipeline", "DiTMoEPipelineOutput", "make_scheduler"]
