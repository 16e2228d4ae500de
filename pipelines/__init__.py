"""moezoo.pipelines: inference, one pipeline per task, diffusers-style (``from_pretrained`` + ``__call__``)."""

from .audio import AudioPipeline, AudioPipelineOutput, export_to_wav
from .dit_moe import DiTMoEPipeline, DiTMoEPipelineOutput, make_scheduler
from .dit_moe_video import DiTMoEVideoPipeline, DiTMoEVideoPipelineOutput
from .deweather import DeweatherPipeline, DeweatherPipelineOutput
from .fusion import FusionPipeline, FusionPipelineOutput
from .video_export import export_to_gif, export_to_video
from .visual_qa import VisualQAPipeline, VisualQAPipelineOutput

__all__ = [
    "DiTMoEPipeline", "DiTMoEPipelineOutput", "make_scheduler",
    "DiTMoEVideoPipeline", "DiTMoEVideoPipelineOutput", "export_to_gif", "export_to_video",
    "FusionPipeline", "FusionPipelineOutput", "DeweatherPipeline", "DeweatherPipelineOutput",
    "AudioPipeline", "AudioPipelineOutput", "export_to_wav",
    "VisualQAPipeline", "VisualQAPipelineOutput",
]
