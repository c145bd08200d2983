"""Encoders, projection head and the SimCLR model wrapper."""
from model.build import SimCLRModel, build_model, export_torchvision_state_dict, unwrap_model
from model.encoder import ENCODERS, TORCHVISION_ARCHS, build_encoder
from model.head import projection_head

__all__ = [
    "ENCODERS",
    "TORCHVISION_ARCHS",
    "SimCLRModel",
    "build_encoder",
    "build_model",
    "export_torchvision_state_dict",
    "projection_head",
    "unwrap_model",
]
