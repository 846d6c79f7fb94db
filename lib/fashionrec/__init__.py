"""fashionrec: a research workbench for image-based fashion recommendation.

One plain function per stage, each callable from a notebook or the command line:

    from fashionrec import prepare, evaluate_backbone
    prepared = prepare("clothing", split_seed=0)                 # load, validate, split
    record, embeddings = evaluate_backbone(prepared, "efficientnet_lite0", index="Flat", k=10)

The names below load on first use, so ``import fashionrec.config`` stays free of torch.
"""
__version__ = "0.1.0"

_PUBLIC = {
    "prepare": "workflow", "embed": "workflow", "evaluate_backbone": "workflow", "PreparedData": "workflow",
    "load_dataset": "datasets", "split_catalog": "datasets",
    "get_backbone": "backbones", "list_backbones": "backbones",
    "embed_catalog": "embed", "build_index": "index", "search": "index",
    "evaluate_embeddings": "evaluate", "load_image": "images",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'fashionrec' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
