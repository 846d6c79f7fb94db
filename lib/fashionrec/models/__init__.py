"""Backbones and the fine-tuned model file: what turns an image into a vector.

``register_backbone`` and ``BuiltBackbone`` are what a user module needs to add a backbone.
They load on first use (as the package's own public names do), so that importing
:mod:`fashionrec.models.query_model`, which a served ONNX folder needs, does not import PyTorch.
"""
_PUBLIC = {"Backbone": "backbone", "BuiltBackbone": "backbone", "get_backbone": "registry",
           "list_backbones": "registry", "load_backbone_modules": "registry", "register_backbone": "registry"}
__all__ = sorted(_PUBLIC)


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'fashionrec.models' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value
    return value
