"""fashionrec: a research workbench for image-based fashion recommendation.

One plain function per stage, each callable from a notebook or the command line:

    from fashionrec import prepare, evaluate_backbone, Recommender
    prepared = prepare("clothing", split_seed=0)                 # load, validate, split
    record, embeddings = evaluate_backbone(prepared, "efficientnet_lite0", index="Flat", k=10)
    recommender = Recommender.load("indexes/clothing")           # built by `python -m fashionrec index`
    recommender.recommend("photo.jpg", k=5).results

The package is two towers on one base: the research side (experiment, training, evaluation,
pipeline) may use the product (serving, the HTTP service and the commands that serve), never the reverse; each
layer imports only from the ones below it (``make test`` checks both with import-linter):

    cli                      the command line
    service | pipeline       the HTTP service | the notebooks' stages, report and plots, the papermill runner
    experiment               prepare -> embed -> evaluate, frozen, fine-tuned or an index folder as served
    training                 fine-tuning: heads, last blocks, category classifier
    evaluation               the protocol of record, metrics, comparisons
    serving                  the servable index folder and the Recommender (photo in, similar products out)
    ranking                  one store interface (FAISS, Milvus), the ranking policies both towers run and
                             the metrics that measure a ranking
    features | indexing      embedding (in-process or on Ray) and its cache | FAISS indexes, the Milvus
                             client and their measurement
    models                   backbones, runtimes, the fine-tuned model file
    data                     image decoding, catalog loaders, the split, the prepared catalog
    settings | console | config | errors | provenance

The names below load on first use, so ``import fashionrec.config`` stays free of torch.
None of them is also the name of a submodule, so each always is the function it says.
"""
__version__ = "0.1.0"

_PUBLIC = {
    "prepare": "data.prepared", "embed": "experiment.evaluate", "evaluate_backbone": "experiment.evaluate",
    "PreparedData": "data.prepared", "evaluate_finetuned": "experiment.finetune",
    "load_dataset": "data.catalog", "split_catalog": "data.split", "load_image": "data.images",
    "get_backbone": "models.registry", "list_backbones": "models.registry", "register_backbone": "models.registry",
    "load_backbone_modules": "models.registry",
    "BuiltBackbone": "models.backbone", "InferenceSettings": "settings",
    "embed_catalog": "features.embed", "build_index": "indexing.faiss_index", "search": "indexing.faiss_index",
    "evaluate_embeddings": "evaluation.protocol", "Recommender": "serving.recommender",
    "gallery_store": "ranking.rank", "StoreSettings": "settings",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'fashionrec' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value
    return value
