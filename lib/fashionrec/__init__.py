"""fashionrec: a research workbench for image-based fashion recommendation.

One plain function per stage, each callable from a notebook or the command line:

    from fashionrec import prepare, evaluate_backbone, Recommender
    prepared = prepare("clothing", split_seed=0)                 # load, validate, split
    record, embeddings = evaluate_backbone(prepared, "efficientnet_lite0", index="Flat", k=10)
    recommender = Recommender.load("indexes/clothing")           # built by `python -m fashionrec index`
    recommender.recommend("photo.jpg", k=5).results

The package is layered; each layer imports only from the ones below it (``make test``
checks this with import-linter):

    cli                      the command line
    pipeline                 the notebooks' stages, report and plots, the papermill runner
    serving                  the servable index folder and the Recommender (photo in, similar products out)
    experiment               prepare -> embed -> evaluate, frozen or fine-tuned
    training                 fine-tuning: heads, last blocks, category classifier
    evaluation               the protocol of record, metrics, comparisons
    features | indexing      embedding and its cache | FAISS indexes and their measurement
    models                   backbones, runtimes, the fine-tuned model file
    data                     image decoding, catalog loaders, the split
    settings, console, config, errors

The names below load on first use, so ``import fashionrec.config`` stays free of torch.
None of them is also the name of a submodule, so each always is the function it says.
"""
__version__ = "0.1.0"

_PUBLIC = {
    "prepare": "experiment.evaluate", "embed": "experiment.evaluate", "evaluate_backbone": "experiment.evaluate",
    "PreparedData": "experiment.evaluate", "evaluate_finetuned": "experiment.finetune",
    "load_dataset": "data.catalog", "split_catalog": "data.split", "load_image": "data.images",
    "get_backbone": "models.registry", "list_backbones": "models.registry", "register_backbone": "models.registry",
    "load_backbone_modules": "models.registry",
    "BuiltBackbone": "models.backbone", "InferenceSettings": "settings",
    "embed_catalog": "features.embed", "build_index": "indexing.faiss_index", "search": "indexing.faiss_index",
    "evaluate_embeddings": "evaluation.protocol", "Recommender": "serving.recommender",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'fashionrec' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value
    return value
