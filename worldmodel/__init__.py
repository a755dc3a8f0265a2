"""Self-Flow multi-modal world model: backbone, tokens and training pieces."""

from worldmodel.model import ModelConfig, ModelOutput, WorldModel
from worldmodel.sizes import MODEL_SIZES, build_model, build_model_from_config, model_config_from_json
from worldmodel.tokens import MODALITIES, TokenSequence

__all__ = [
    "MODALITIES",
    "MODEL_SIZES",
    "ModelConfig",
    "ModelOutput",
    "TokenSequence",
    "WorldModel",
    "build_model",
    "build_model_from_config",
    "model_config_from_json",
]
