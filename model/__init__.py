"""Encoders, the objectives' heads and the model wrapper."""
from model.build import PretrainModel, build_model, export_torchvision_state_dict, unwrap_model
from model.encoder import ENCODERS, TORCHVISION_ARCHS, build_encoder, check_arch
from model.head import PAWSHead, SwAVHead, projection_head

__all__ = [
    "ENCODERS",
    "PAWSHead",
    "PretrainModel",
    "SwAVHead",
    "TORCHVISION_ARCHS",
    "build_encoder",
    "check_arch",
    "build_model",
    "export_torchvision_state_dict",
    "projection_head",
    "unwrap_model",
]
