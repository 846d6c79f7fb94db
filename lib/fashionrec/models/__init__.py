"""Backbones and the fine-tuned model file: what turns an image into a vector.

``register_backbone`` and ``BuiltBackbone`` are what a user module needs to add a backbone.
"""
from .backbone import Backbone, BuiltBackbone
from .registry import get_backbone, list_backbones, load_backbone_modules, register_backbone

__all__ = ["Backbone", "BuiltBackbone", "get_backbone", "list_backbones", "load_backbone_modules",
           "register_backbone"]
