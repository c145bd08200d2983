"""Encoders, the objectives' heads and the model wrapper."""
from model.build import PretrainModel, build_model, export_torchvision_state_dict, unwrap_model
from model.encoder import ENCODERS, TORCHVISION_ARCHS, InputGeometry, build_encoder, check_arch, input_geometry
from model.head import PAWSHead, SwAVHead, projection_head

__all__ = [
    "ENCODERS",
    "InputGeometry",
    "PAWSHead",
    "PretrainModel",
    "SwAVHead",
    "TORCHVISION_ARCHS",
    "build_encoder",
    "check_arch",
    "build_model",
    "export_torchvision_state_dict",
    "input_geometry",
    "projection_head",
    "unwrap_model",
]
