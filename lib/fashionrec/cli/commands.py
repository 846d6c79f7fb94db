"""The commands and their one-line summaries, which ``python -m fashionrec --help`` lists without importing them."""

SUMMARIES = {
    "evaluate": "query -> gallery retrieval metrics for one backbone and index",
    "embed": "embed every image of a dataset and report what was left out",
    "index": "build a servable index folder of a catalog, or update one",
    "recommend": "catalog items most similar to a photo or to a catalog item",
    "duplicates": "exact and near-duplicate items of an index folder, grouped",
    "app": "the recommendation app in the browser (Streamlit)",
    "serve": "the recommendations over HTTP, for a shop's website (FastAPI)",
    "backbones": "list the backbones (built-in, and those your modules register)",
    "data": "find or fetch the named datasets (each independently)",
    "distil": "train one EfficientNet-Lite to reproduce a teacher model, on the train split",
    "pipeline": "run the numbered notebooks with papermill",
    "params": "list the keys of a parameter file, or check one",
}
