"""moezoo.zoo: the modules (layers/, models/), the model registry, and weights I/O.

    from moezoo.zoo import create_model, list_models
    list_models("*dit*")
    model = create_model("dit_moe_digits", pretrained=True)
"""

from .hub import save_pretrained
from .registry import (
    PretrainedCfg,
    create_model,
    get_pretrained_cfg,
    is_model,
    list_models,
    list_pretrained,
    register_model,
    split_model_name_tag,
)

__all__ = [
    "PretrainedCfg",
    "create_model",
    "get_pretrained_cfg",
    "is_model",
    "list_models",
    "list_pretrained",
    "register_model",
    "save_pretrained",
    "split_model_name_tag",
]
