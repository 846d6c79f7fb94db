"""Backbones and the fine-tuned model file: what turns an image into a vector.

A user module adds a backbone with ``fashionrec.register_backbone`` and ``fashionrec.BuiltBackbone``.
Nothing is imported here, so that :mod:`fashionrec.models.query_model`, which a served ONNX
folder needs, comes without PyTorch.
"""
