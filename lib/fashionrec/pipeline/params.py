"""The parameter file of ``make pipeline``: one schema, its defaults, and how values are read.

Every key a parameter file may hold is a :class:`Parameter` in :data:`PARAMETERS`, with its
type, default and meaning; ``docs/parameters.md`` is generated from them
(``python -m fashionrec params --markdown``, and a test fails when the two disagree).

* An unknown key is an error naming it, with the closest known keys.
* A key the file leaves out takes the schema default, which is the command line's default
  where the CLI has the same setting (``max_per_class``: no cap; ``k``: 10; ...).
* Relative paths (``data_dir``, ``category_map``, ``backbone_modules`` files,
  ``weights_files``) are resolved against the repository root, never against the
  directory the notebooks run in.
* The pipeline hands every key to every notebook that declares it, so the literal in a
  notebook's ``parameters`` cell never leaks into a run. Those literals are the defaults
  below, except the few ``notebook_value`` demo settings (a 400-image Fashion-MNIST sample)
  that keep a notebook run by hand, and nbval, fast.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .. import config
from ..data.catalog import LOADERS, parse_columns
from ..errors import FashionRecError, did_you_mean
from ..indexing.faiss_index import METRICS, SPINE_FACTORIES
from ..indexing.milvus_store import STORE_FAISS_INDEXES, STORE_MILVUS_INDEXES
from ..settings import DEFAULT_RUNTIME, RUNTIMES
from ..training.heads import LOSSES

REQUIRED = object()   # default of a key every parameter file must set
DOCS_FILE = "docs/parameters.md"


@dataclass(frozen=True)
class Parameter:
    """One key of a parameter file.

    ``kind`` is one of ``str``, ``int``, ``float``, ``bool``, ``path``, ``list[str]``,
    ``list[int]``, ``list[float]``, ``list[path]`` and ``dict[str, path]``; ``nullable`` allows null;
    ``choices`` limits a string (or each list item) to those values; ``minimum`` bounds a
    number (or each list item). ``notebook_value`` is the demo literal of the notebooks'
    parameter cells where it differs from ``default``; ``notebooks`` says which notebooks
    declare the key ("pipeline" for keys the runner itself uses).
    """

    name: str
    kind: str
    default: object
    meaning: str
    notebooks: tuple[str, ...]
    nullable: bool = False
    choices: tuple | None = None
    minimum: float | None = None
    notebook_value: object = None

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


PIPELINE = "pipeline"
ALL_NOTEBOOKS = ("00", "01", "02", "03", "04", "05", "06", "07")

PARAMETERS: tuple[Parameter, ...] = (
    Parameter("run_name", "str", None, "Name of the run: its results go to `results/<run_name>/`. Null: the "
              "parameter file's name without `.yaml` (`--run-name` on the command line overrides both).",
              ALL_NOTEBOOKS, nullable=True, notebook_value="interactive"),
    Parameter("notebooks", "list[str]", None, "The notebooks to run, by name (`03-evaluate` or "
              "`03-evaluate.ipynb`), always in their numbered order. Null: all of them. Later notebooks read "
              "what earlier ones wrote into the run directory, so leave one out only when its files are there.",
              (PIPELINE,), nullable=True),
    Parameter("dataset", "str", REQUIRED, "The catalog: `fashion-mnist`, `clothing` (both fetched by `make data`), "
              "`folder` (one sub-folder per category) or `catalog` (a folder holding `catalog.csv` with "
              "`path,label`).", ("00", "06"), choices=tuple(LOADERS), notebook_value="fashion-mnist"),
    Parameter("data_dir", "path", None, "Where the dataset lies. Null: the dataset's usual places "
              "(`fashion-mnist`, `clothing`); required for `folder` and `catalog`.", ("00", "06"), nullable=True),
    Parameter("catalog", "path", None, "A shop's catalog table, a `.csv` or `.parquet` file (docs/catalog.md): "
              "stands for `dataset: catalog` with `data_dir` the file (leave both out, or set `dataset: catalog`). "
              "As `--catalog`.", (PIPELINE,), nullable=True),
    Parameter("columns", "str", None, "The catalog table's own column names, `path=file,label=type,id=sku`; "
              "every other column is an attribute. Null: the table has `path`, `label` (and `id`). As `--columns`.",
              ("00", "06"), nullable=True),
    Parameter("image_root", "path", None, "The folder the catalog table's image paths start from. Null: the "
              "table's own folder. As `--image-root`.", ("00", "06"), nullable=True),
    Parameter("max_per_class", "int", None, "At most this many images per category (a seeded sample, drawn after "
              "the category map and after bad files are left out). Null: no cap, as on the command line.",
              ("00", "06"), nullable=True, minimum=1, notebook_value=40),
    Parameter("split_seed", "int", config.DEFAULT_SEED, "Seed of the stratified 60/20/20 train/gallery/query split, "
              "of `max_per_class` sampling and of every bootstrap interval.", ("00", "06"), minimum=0),
    Parameter("category_map", "path", None, "YAML file of old label -> new label (null drops the category), applied "
              "before sampling and splitting. An entry that matches no label is an error. Null: labels as they are.",
              ("00", "06"), nullable=True),
    Parameter("k", "int", 10, "Results per query: every metric is @k. Checked against the gallery size by "
              "00-prepare-data, before anything is embedded.", ("00", "02", "03", "04", "05", "06", "07"),
              minimum=1),
    Parameter("backbones", "list[str]", ["efficientnet_lite0", "colorhist"], "Backbones to embed with and compare "
              "(`python -m fashionrec backbones` lists them; your own come from `backbone_modules`). One whose "
              "weights cannot be had is reported as skipped; 07-scale-out uses the first one that was available.",
              ("01", "07")),
    Parameter("backbone_modules", "list[path]", [], "Your modules that register backbones with "
              "`@register_backbone`: `.py` files or importable module names (docs/custom-backbones.md). "
              "The pipeline loads them and passes them to every notebook's kernel.", (PIPELINE,)),
    Parameter("weights_files", "dict[str, path]", {}, "Backbone name -> local weights file that replaces its "
              "published weights (e.g. a torchvision `.pth` on a machine without internet).", ("01",)),
    Parameter("runtime", "str", DEFAULT_RUNTIME, "Inference runtime: `onnx` (equal to eager within 1e-4, faster "
              "on a CPU), `eager` (reference PyTorch) or `onnx-int8` (quantised: changes embeddings).", ("01",),
              choices=RUNTIMES),
    Parameter("batch_size", "int", 32, "Images per forward pass when embedding.", ("01",), minimum=1),
    Parameter("num_workers", "int", None, "Image decoding threads when embedding (`--workers`). Null: one per "
              "CPU this process may use.", ("01",), nullable=True, minimum=0),
    Parameter("threads", "int", None, "Threads of the inference runtime and of FAISS. Null: every CPU this "
              "process may use.", ("01", "02"), nullable=True, minimum=1),
    Parameter("indexes", "list[str]", list(SPINE_FACTORIES), "FAISS factory strings to build and evaluate; "
              "`{nlist}` and `{m}` are filled from the gallery size and dimension. The first one is the primary "
              "index of the per-category tables.", ("02", "03")),
    Parameter("metric", "str", "cosine", "Distance of the retrieval of record.", ("02", "03", "04", "07"),
              choices=METRICS),
    Parameter("relevance", "list[str]", ["label"], "Catalog columns a result must share with its query to count "
              "as relevant in 03-evaluate's metrics, e.g. `[label, colour]` (attribute columns come from "
              "`catalog.csv`, dataset `catalog`; a row missing a value is never relevant). The category precision "
              "stays beside it (`category_precision_at_k`). As `evaluate --relevance`.", ("03",)),
    Parameter("colour_weights", "list[float]", [], "Colour weights w that 03-evaluate sweeps with the first "
              "backbone (Flat, cosine): (1-w) x network + w x product-colour similarity, a table and a plot of "
              "category P@k against P@k by `relevance` in the report, and the w suggested on validation (part of "
              "the train split). Empty: no sweep. As `evaluate --colour-weights` (docs/look.md).", ("03",),
              minimum=0),
    Parameter("n_grid_queries", "int", 6, "Queries shown in each recommendation grid (seeded choice, then the "
              "hardest ones; 06-recommend: catalog photos asked about when `query_images` is empty).", ("03", "04", "06"),
              minimum=1),
    Parameter("finetune_backbone", "str", "efficientnet_lite0", "Backbone that 04-finetune trains a head (and, "
              "with `finetune_level2`, its last blocks) for.", ("04",)),
    Parameter("finetune_losses", "list[str]", list(LOSSES), "Metric-learning losses compared on the validation part "
              "of the train split; the best is kept (`--loss auto`).", ("04",), choices=LOSSES),
    Parameter("finetune_level2", "bool", False, "Also train the backbone's last blocks with the head (level 2, "
              "efficientnet_lite* only); it stops by epochs and early stopping, so the same file gives the same "
              "model on any machine.", ("04",)),
    Parameter("finetune_time_budget_min", "float", None, "Level 2: an opt-in wall-clock safety net, in minutes of "
              "training (after the trunk's features are cached); a run it stops is reported as such and depends "
              "on the machine's speed. Null: none.", ("04",), nullable=True, minimum=0),
    Parameter("finetune_trainable_blocks", "int", 2, "Level 2: the last MBConv blocks trained.", ("04",), minimum=1),
    Parameter("finetune_n_views", "int", 2, "Level 2: augmented views per train image whose trunk features are "
              "cached.", ("04",), minimum=0),
    Parameter("search_backbone", "str", None, "A combination of backbones (`ensemble:a,b,c`, docs/ensembles.md) "
              "that 04-finetune searches for the model to ship: members, views, heads, category-aware ranking and "
              "classifier, every choice made on a select slice of the train split; the chosen model is saved as "
              "`results/<run>/best.pt`. Null: no search.", ("04",), nullable=True),
    Parameter("search_cost_images", "int", 64, "Query images the model search embeds with every candidate's "
              "networks, in one run and caches bypassed, to state each one's seconds per image (0: not measured).",
              ("04",), minimum=0),
    Parameter("distil_teacher", "str", None, "A model that 04-finetune distils into one EfficientNet-Lite "
              "(`distil_student`): any backbone name, a combination, or a `+head:` model file. The student (its last "
              "blocks and a head, trained on the train split to reproduce the teacher's similarities and the "
              "categories, every choice on slices of the train split) is saved as `results/<run>/student.pt`. As "
              "`python -m fashionrec distil`. Null: no distillation.", ("04",), nullable=True),
    Parameter("distil_teacher_finetune", "bool", False, "The teacher is the model `evaluate --backbone "
              "<distil_teacher> --finetune` chooses (reused from its cache when that has run on this catalog).",
              ("04",)),
    Parameter("distil_student", "str", "efficientnet_lite0", "The student network.", ("04",),
              choices=("efficientnet_lite0", "efficientnet_lite1")),
    Parameter("distil_relational_weights", "list[float]", [1.0, 10.0], "Weights of the relational term (RKD "
              "distance and angle) compared on the select slice of the train split.", ("04",), minimum=0),
    Parameter("recommend_backbone", "str", "efficientnet_lite0", "Backbone of 06-recommend's index folder; a "
              "fine-tuned `<backbone>+head:<run or file>` model too, whose category classifier then predicts each "
              "query's category.", ("06",)),
    Parameter("recommend_index", "str", "auto", "Index of 06-recommend: a FAISS factory string, or `auto` (chosen "
              "for the catalog's size, as `python -m fashionrec index --index auto`).", ("06",)),
    Parameter("query_images", "list[path]", [], "Photos 06-recommend asks about: any image files, inside the catalog "
              "or not. Empty: `n_grid_queries` catalog photos (a seeded pick), each left out of its own results.",
              ("06",)),
    Parameter("milvus_uri", "str", None, "Where 07-scale-out puts its Milvus collections: a Milvus Lite file (a "
              "path ending in `.db`, relative to the repository root) or a Milvus server or cluster, "
              "`http://host:19530` (credentials in `$MILVUS_TOKEN`). Null: Milvus Lite at "
              "`results/<run_name>/milvus.db`.", ("07",), nullable=True),
    Parameter("store_faiss_indexes", "list[str]", list(STORE_FAISS_INDEXES), "FAISS approximate indexes 07-scale-out "
              "measures against exact search (factory strings, as `indexes`).", ("07",)),
    Parameter("store_milvus_indexes", "list[str]", list(STORE_MILVUS_INDEXES), "Milvus approximate indexes "
              "07-scale-out measures: `HNSW<M>`, `HNSW<M>_SQ8`, `IVF{nlist},Flat` and `IVF{nlist},SQ8` get the FAISS "
              "store's parameters; native Milvus names take build parameters after a colon (docs/vector-stores.md).",
              ("07",)),
    Parameter("pca_dims", "list[int]", [64, 128, 256], "PCA dimensions that 05-report compares with the raw features "
              "on the validation part (those not below the feature size are left out).", ("05",), minimum=1),
)
BY_NAME = {parameter.name: parameter for parameter in PARAMETERS}
# Set by the runner for 05-report, never by a parameter file.
RUNNER_PARAMETERS = ("params_file",)


def resolve_params(raw: dict, source, run_name: str | None = None) -> dict:
    """Every schema key with its value: the file's (checked, paths made absolute) or the default.

    Raises FashionRecError naming ``source`` and the key for an unknown key, a missing
    required one, a value of the wrong type, or a path that does not exist.
    """
    source = Path(source)
    if raw.get("catalog") is not None and "dataset" not in raw:
        raw = {**raw, "dataset": "catalog"}
    unknown = [name for name in raw if name not in BY_NAME]
    if unknown:
        described = ", ".join(f"{name!r}{did_you_mean(name, BY_NAME)}" for name in unknown)
        raise FashionRecError(f"{source}: unknown parameter{'s' if len(unknown) > 1 else ''} {described}; every "
                              f"parameter is listed in {DOCS_FILE} (`python -m fashionrec params`)")
    resolved = {}
    for parameter in PARAMETERS:
        if parameter.name not in raw and parameter.required:
            raise FashionRecError(f"{source}: {parameter.name!r} is required ({parameter.meaning})")
        value = raw.get(parameter.name, parameter.default)
        resolved[parameter.name] = _checked(parameter, value, source)
    resolved["run_name"] = run_name or resolved["run_name"] or source.stem
    return _with_catalog_table(resolved, source)


def _with_catalog_table(resolved: dict, source: Path) -> dict:
    """``catalog: FILE`` becomes ``dataset: catalog`` with ``data_dir`` the file; ``columns`` is checked now."""
    if resolved["catalog"] is not None:
        if resolved["dataset"] != "catalog":
            raise FashionRecError(f"{source}: catalog names a catalog table, which is dataset 'catalog', not "
                                  f"{resolved['dataset']!r}")
        if resolved["data_dir"] is not None:
            raise FashionRecError(f"{source}: give catalog (the table) or data_dir, not both")
        resolved["data_dir"] = resolved["catalog"]
    if (resolved["columns"] or resolved["image_root"]) and resolved["dataset"] != "catalog":
        raise FashionRecError(f"{source}: columns and image_root go with a catalog table (catalog: FILE)")
    parse_columns(resolved["columns"])
    return resolved


def _checked(parameter: Parameter, value, source: Path):
    where = f"{source}: {parameter.name}"
    if value is None:
        if parameter.nullable:
            return None
        raise FashionRecError(f"{where} cannot be null ({_type_words(parameter)})")
    kind = parameter.kind
    if kind.startswith("list["):
        if not isinstance(value, list):
            raise FashionRecError(f"{where} must be a list ({_type_words(parameter)}), got {value!r}")
        item_kind = kind[len("list["):-1]
        return [_scalar(parameter, item_kind, item, where) for item in value]
    if kind.startswith("dict["):
        if not isinstance(value, dict):
            raise FashionRecError(f"{where} must be a mapping ({_type_words(parameter)}), got {value!r}")
        return {str(key): _scalar(parameter, "path", item, f"{where}.{key}") for key, item in value.items()}
    return _scalar(parameter, kind, value, where)


_PYTHON_TYPES: dict[str, Callable[[object], bool]] = {
    "str": lambda v: isinstance(v, str),
    "path": lambda v: isinstance(v, str),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
}


def _scalar(parameter: Parameter, kind: str, value, where: str):
    if not _PYTHON_TYPES[kind](value):
        raise FashionRecError(f"{where} must be {_type_words(parameter)}, got {value!r}")
    if parameter.choices is not None and value not in parameter.choices:
        raise FashionRecError(f"{where}: {value!r} is not one of {', '.join(map(str, parameter.choices))}"
                              f"{did_you_mean(str(value), parameter.choices)}")
    if parameter.minimum is not None and value < parameter.minimum:
        raise FashionRecError(f"{where} must be at least {parameter.minimum:g}, got {value!r}")
    if kind == "float":
        return float(value)
    if kind == "path":
        return _resolved_path(parameter, value, where)
    return value


def _resolved_path(parameter: Parameter, value: str, where: str) -> str:
    """An absolute path (relative ones from the repository root) that exists; module names pass as they are."""
    if parameter.name == "backbone_modules" and not (value.endswith(".py") or "/" in value or os.sep in value):
        return value   # an importable module name, found on sys.path by the kernel
    path = Path(value).expanduser()
    path = path if path.is_absolute() else config.PROJECT_ROOT / path
    if not path.exists():
        raise FashionRecError(f"{where}: {path} does not exist (relative paths start at the repository root, "
                              f"{config.PROJECT_ROOT})")
    if parameter.name == "data_dir" and not path.is_dir():
        raise FashionRecError(f"{where}: {path} is not a directory")
    return str(path)


def _type_words(parameter: Parameter) -> str:
    words = {
        "str": "a string", "int": "an integer", "float": "a number", "bool": "true or false",
        "path": "a path", "list[str]": "a list of strings", "list[int]": "a list of integers",
        "list[float]": "a list of numbers",
        "list[path]": "a list of paths or module names", "dict[str, path]": "a mapping of backbone name -> path",
    }[parameter.kind]
    return f"{words} or null" if parameter.nullable else words


def _literal(value) -> str:
    if value is REQUIRED:
        return "required"
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, list):
        return "`[" + ", ".join(str(item) for item in value) + "]`"
    if isinstance(value, dict):
        return "`{}`" if not value else f"`{value}`"
    return f"`{value}`"


def schema_markdown() -> str:
    """The text of docs/parameters.md, generated from :data:`PARAMETERS`."""
    lines = [
        "# Parameter files",
        "",
        "<!-- Generated by `python -m fashionrec params --markdown > docs/parameters.md` from",
        "     lib/fashionrec/pipeline/params.py; tests/test_params.py fails when they disagree. -->",
        "",
        "`make pipeline PARAMS=params/<name>.yaml` (or `python -m fashionrec pipeline --params <file>`) runs the",
        "numbered notebooks with the values of a YAML parameter file. `python -m fashionrec params --check <file>`",
        "checks a file without running anything.",
        "",
        "- **Every key is optional except `dataset`**; a key left out takes the default below, which is the",
        "  command line's default wherever the CLI has the same setting (e.g. `max_per_class`: no cap).",
        "- **Unknown keys are rejected** by name, with the closest known key (`max_per_clas` -> did you mean",
        "  `max_per_class`?).",
        "- **Relative paths are resolved against the repository root** (the folder holding `Makefile`), never",
        "  against `notebooks/` or the directory you run from; `~` is expanded. Paths must exist.",
        "- **Every key reaches every notebook that declares it.** The literals in the notebooks' `parameters`",
        "  cells are only used when a notebook is run by hand (or by nbval): they equal the defaults below,",
        "  except the demo values in the last column, which keep such a run small (400 Fashion-MNIST images).",
        "",
        "| key | type | default | notebooks | meaning | notebook cell (demo) |",
        "|---|---|---|---|---|---|",
    ]
    for parameter in PARAMETERS:
        demo = _literal(parameter.notebook_value) if parameter.notebook_value is not None else ""
        choices = f" One of: {', '.join(f'`{c}`' for c in parameter.choices)}." \
            if parameter.choices and parameter.name not in ("dataset", "runtime", "metric") else ""
        lines.append(f"| `{parameter.name}` | {_type_words(parameter)} | {_literal(parameter.default)} | "
                     f"{', '.join(parameter.notebooks)} | {parameter.meaning}{choices} | {demo} |")
    lines += [
        "",
        "Notebooks: 00-prepare-data, 01-embed, 02-index, 03-evaluate, 04-finetune, 05-report, 06-recommend,",
        "07-scale-out; `pipeline` keys are used by the runner itself. The runner also passes `params_file` (the",
        "file's path) to 05-report, for the report's \"reproduce with\" line.",
        "",
        "Example (`params/clothing.yaml` holds a longer one):",
        "",
        "```yaml",
        "dataset: folder",
        "data_dir: ../my-shop/photos        # relative to the repository root",
        "category_map: params/my-shop-map.yaml",
        "backbones: [efficientnet_lite0, my_backbone]",
        "backbone_modules: [my_backbones.py]",
        "max_per_class: null                # every image (the default)",
        "notebooks: [00-prepare-data, 01-embed, 02-index, 03-evaluate, 05-report]",
        "```",
        "",
    ]
    return "\n".join(lines)
