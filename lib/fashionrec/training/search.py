"""An honest search over fine-tuned models: every choice made on a slice of the train split.

The train rows are cut into three stratified, seeded slices (:func:`selection_slices`):

* **fit** (about 72%): heads and classifiers are trained here;
* **stop** (about 13%): a head's early stopping (its epoch) is chosen here, nothing else;
* **select** (15%): candidates are compared here, and only here. No training and no early
  stopping ever sees it, so its numbers are not flattered by either.

A candidate is a feature set (a backbone name: members and views), a projection head (loss
and hidden width, or none: the frozen features themselves) and a ranking (a score bonus
for gallery items of the query's predicted category: 0 = plain similarity, ``inf`` = rank
within the predicted category first). The category classifier (features and C) is chosen
first, on select-slice accuracy; each candidate is then scored by P@k on the select slice,
where every select image ranks the other select images with categories *predicted* for
both sides, as a shop without labels would rank. Heads are searched in two stages: every
feature set x loss at the first hidden width, then the other widths for the best of those.
The best candidate (ties: the one listed first, i.e. the cheaper) is refitted on all train
rows (:func:`refit_chosen`). The query split is never an input here.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from .. import config
from ..data.split import validation_split
from ..ranking import metrics
from ..models.classifier import CategoryClassifier, l2_normalize
from ..models.projection import ProjectionHead, project
from ..ranking.rank import HARD_BOOST
from .classify import train_classifier
from .heads import LOSSES, HeadConfig, torch_threads, train_head, validation_uses_fit_rows
from .parallel import run_jobs, worker_processes

NO_HEAD = "none"
DEFAULT_BOOSTS = (0.0, 0.1, 0.2, math.inf)


@dataclass(frozen=True)
class SearchConfig:
    """What the search compares, and how the train split is sliced.

    ``head`` holds the settings every head shares (epochs, patience, learning rate, output
    size, seed, k); ``head.val_fraction`` is the size of the early-stopping slice (of the rows
    left after the selection slice). ``frozen_candidates`` adds the feature sets without a head.
    """

    losses: tuple[str, ...] = LOSSES
    hidden_dims: tuple[int, ...] = (512, 1024)    # the first in stage 1, the others for the stage-1 winner
    boosts: tuple[float, ...] = DEFAULT_BOOSTS
    classifier_c: tuple[float, ...] = (1.0, 10.0, 100.0)
    select_fraction: float = 0.15
    frozen_candidates: bool = True
    head: HeadConfig = field(default_factory=HeadConfig)
    train_threads: int | None = 1

    def __post_init__(self):
        unknown = set(self.losses) - set(LOSSES)
        if not self.losses or unknown:
            raise ValueError(f"losses must be among {', '.join(LOSSES)}, got {list(self.losses)}")
        if not self.hidden_dims or any(h < 0 for h in self.hidden_dims):
            raise ValueError(f"hidden_dims are widths >= 0 (0: a linear head), got {list(self.hidden_dims)}")
        if not 0 < self.select_fraction < 1:
            raise ValueError(f"select_fraction must be within (0, 1), got {self.select_fraction}")


@dataclass
class Slices:
    """Three disjoint masks over the train rows (see the module docstring)."""

    fit: np.ndarray
    stop: np.ndarray
    select: np.ndarray
    not_validated: list[dict]

    def sizes(self) -> dict:
        return {"fit": int(self.fit.sum()), "stop": int(self.stop.sum()), "select": int(self.select.sum())}


def selection_slices(labels, select_fraction: float = 0.15, stop_fraction: float = 0.15,
                     seed: int = config.DEFAULT_SEED) -> Slices:
    """Stratified, seeded fit / stop / select slices of the train rows.

    The select slice is ``select_fraction`` of each category (drawn with purpose
    ``"select"``); the stop slice is ``stop_fraction`` of each category's remaining rows. A
    category with too few rows for a slice gives it none and is listed in ``not_validated``.
    """
    labels = np.asarray(labels).astype(str)
    select, not_selected = validation_split(labels, select_fraction, seed, purpose="select")
    rest = np.flatnonzero(~select)
    stop_in_rest, not_stopped = validation_split(labels[rest], stop_fraction, seed)
    stop = np.zeros(len(labels), dtype=bool)
    stop[rest[stop_in_rest]] = True
    not_validated = [{**entry, "slice": "select"} for entry in not_selected] + \
                    [{**entry, "slice": "stop"} for entry in not_stopped]
    return Slices(~select & ~stop, stop, select, not_validated)


def selection_precision(vectors: np.ndarray, labels, predicted, slices: Slices, boost: float = 0.0,
                        k: int = 10) -> np.ndarray:
    """Per-query P@k of the select rows, each ranking the other select rows by cosine + ``boost``.

    ``predicted`` are the categories a classifier gives every train row; the bonus goes to
    rows of the query's predicted category (``inf``: those first). As for early stopping
    (:func:`fashionrec.training.heads.validation_uses_fit_rows`), a catalog whose select
    images mostly have no other select image of their category ranks the fit rows too.
    """
    labels = np.asarray(labels).astype(str)
    predicted = np.asarray(predicted).astype(str)
    queries = np.flatnonzero(slices.select)
    pool = queries if not validation_uses_fit_rows(labels[queries]) else \
        np.concatenate([queries, np.flatnonzero(slices.fit)])
    if len(queries) == 0 or len(pool) < 2:
        return np.zeros(0)
    x = torch.from_numpy(l2_normalize(vectors[pool]))
    scores = x[:len(queries)] @ x.T
    if boost:
        same = torch.from_numpy(predicted[pool][None, :] == predicted[queries][:, None])
        scores = scores + (HARD_BOOST if math.isinf(boost) else float(boost)) * same.float()
    scores[torch.arange(len(queries)), torch.arange(len(queries))] = -math.inf
    top = torch.topk(scores, min(k, len(pool) - 1), dim=1).indices.numpy()
    return (labels[pool][top] == labels[queries][:, None]).mean(axis=1)


def _interval(values: np.ndarray, seed: int) -> list[float]:
    return [round(bound, 6) for bound in metrics.bootstrap_ci(values, seed=seed)]


# --------------------------------------------------------------------------------------------
# The classifier
# --------------------------------------------------------------------------------------------


def choose_classifier(features: dict[str, np.ndarray], labels, slices: Slices, cs=(1.0, 10.0, 100.0),
                      seed: int = config.DEFAULT_SEED, progress: bool = True,
                      processes: int | None = 1) -> tuple[dict, pd.DataFrame, np.ndarray]:
    """Features and C of the category classifier, by accuracy on the select slice.

    Each candidate trains on the fit and stop rows (``features``: name -> train-row features,
    listed cheapest first; ties keep the first). Returns the choice, the table of every
    candidate (select accuracy with its 95% bootstrap interval) and the chosen classifier's
    predictions for every train row (what the candidates' rankings are scored with).
    ``processes``: candidates trained side by side (:func:`~fashionrec.training.parallel.run_jobs`;
    None: one per CPU), with the same results.
    """
    labels = np.asarray(labels).astype(str)
    jobs = [functools.partial(_fit_classifier, vectors, labels, slices.select, name, c, seed)
            for name, vectors in features.items() for c in cs]
    rows, best = [], None
    for row, classifier in run_jobs(jobs, processes, progress, desc="search: category classifier"):
        rows.append(row)
        if best is None or row["select_accuracy"] > best[0]:
            best = (row["select_accuracy"], row["features"], row["c"], classifier)
    _, name, c, classifier = best
    return {"features": name, "c": c}, pd.DataFrame(rows), classifier.predict(features[name])


def _fit_classifier(vectors: np.ndarray, labels: np.ndarray, select: np.ndarray, name: str, c: float,
                    seed: int) -> tuple[dict, CategoryClassifier]:
    """One classifier candidate, trained off the select slice and scored on it."""
    started, cpu_started = time.perf_counter(), time.process_time()
    classifier = train_classifier(vectors[~select], labels[~select], name, c, seed)
    correct = classifier.predict(vectors[select]) == labels[select]
    accuracy = float(correct.mean()) if correct.size else float("nan")
    return {"features": name, "dim": int(vectors.shape[1]), "c": c, "select_accuracy": accuracy,
            "select_accuracy_ci": _interval(correct, seed),
            "seconds": round(time.perf_counter() - started, 2),
            "cpu_seconds": round(time.process_time() - cpu_started, 2)}, classifier


# --------------------------------------------------------------------------------------------
# The candidates
# --------------------------------------------------------------------------------------------


@dataclass
class SearchOutcome:
    """What the search chose, every candidate it compared, and the slices it compared them on."""

    slices: Slices
    classifier: dict                   # {"features": name, "c": C}
    classifier_table: pd.DataFrame
    candidates: pd.DataFrame           # one row per feature set x head x boost, select-slice P@k [95% CI]
    chosen: dict                       # the best row: features, loss, hidden_dim, boost, epochs, ...
    predicted: np.ndarray              # the chosen classifier's categories of the train rows (trained off select)
    seconds: float
    processes: int = 1                 # worker processes that trained the candidates side by side


def _head_config(cfg: SearchConfig, hidden_dim: int) -> HeadConfig:
    return dataclasses.replace(cfg.head, hidden_dim=hidden_dim)


def _score_candidate(name: str, vectors: np.ndarray, labels: np.ndarray, categories: list[str], predicted: np.ndarray,
                     slices: Slices, loss: str, hidden: int, cfg: SearchConfig, stage: int) -> list[dict]:
    """Trains one head (on fit, stopped on stop) and scores it with every boost on the select slice (a row each).

    ``train_cpu_seconds``: CPU time of this process meanwhile, which, unlike the wall time, does not
    grow when other processes share the cores.
    """
    started, cpu_started = time.perf_counter(), time.process_time()
    trained = None
    if loss != NO_HEAD:
        with torch_threads(cfg.train_threads):
            trained = train_head(vectors[slices.fit], labels[slices.fit], categories, loss, _head_config(cfg, hidden),
                                 vectors[slices.stop], labels[slices.stop], progress=False)
    scored = project(trained.head, vectors) if trained else vectors
    rows = []
    for boost in cfg.boosts:
        precision = selection_precision(scored, labels, predicted, slices, boost, cfg.head.k)
        rows.append({"features": name, "dim_in": int(vectors.shape[1]), "loss": loss,
                     "hidden_dim": hidden if trained else None, "dim": int(scored.shape[1]), "boost": boost,
                     "stage": stage, "epochs": trained.best_epoch if trained else 0,
                     "stop_precision_at_k": trained.best_val_precision if trained else None,
                     "select_precision_at_k": float(precision.mean()) if precision.size else float("nan"),
                     "select_precision_at_k_ci": _interval(precision, cfg.head.seed),
                     "train_seconds": round(time.perf_counter() - started, 2),
                     "train_cpu_seconds": round(time.process_time() - cpu_started, 2)})
    return rows


def search_models(features: dict[str, np.ndarray], classifier_features: dict[str, np.ndarray], labels,
                  cfg: SearchConfig = SearchConfig(), progress: bool = True,
                  processes: int | None = None) -> SearchOutcome:
    """Compares every candidate on the select slice and returns the best (see the module docstring).

    ``features``: name -> train-row features of each retrieval feature set (cheapest first);
    ``classifier_features``: the same for the classifier's candidates. Seeded throughout
    (``cfg.head.seed``): the same inputs give the same choice. ``processes``: candidates
    trained side by side, each on ``cfg.train_threads`` threads (None: one process per CPU;
    :mod:`fashionrec.training.parallel`); the choice and every number are the same for any count.
    """
    started = time.perf_counter()
    labels = np.asarray(labels).astype(str)
    seed = cfg.head.seed
    slices = selection_slices(labels, cfg.select_fraction, cfg.head.val_fraction, seed)
    if not slices.select.any():
        raise ValueError("no category has enough train images for a selection slice (3 or more per category)")
    classifier, classifier_table, predicted = choose_classifier(classifier_features, labels, slices,
                                                                cfg.classifier_c, seed, progress, processes)
    categories = sorted(set(labels))
    first_stage = [(NO_HEAD, 0)] if cfg.frozen_candidates else []
    first_stage += [(loss, cfg.hidden_dims[0]) for loss in cfg.losses]
    candidate = functools.partial(_score_candidate, labels=labels, categories=categories, predicted=predicted,
                                  slices=slices, cfg=cfg)
    jobs = [functools.partial(candidate, name, vectors, loss=loss, hidden=hidden, stage=1)
            for name, vectors in features.items() for loss, hidden in first_stage]
    # The widest heads start first: a long job started last would leave the other cores idle.
    costs = [vectors.shape[1] * (loss != NO_HEAD) for vectors in features.values() for loss, _ in first_stage]
    rows: list[dict] = [row for rows_of_one in run_jobs(jobs, processes, progress, "search: feature sets x heads",
                                                        costs)
                        for row in rows_of_one]
    best = max(rows, key=lambda row: -math.inf if math.isnan(row["select_precision_at_k"]) else
               row["select_precision_at_k"])
    widths = []
    if best["loss"] != NO_HEAD:
        widths = [functools.partial(candidate, best["features"], features[best["features"]], loss=best["loss"],
                                    hidden=hidden, stage=2) for hidden in cfg.hidden_dims[1:]]
        rows += [row for rows_of_one in run_jobs(widths, processes, progress, "search: widths of the best head")
                 for row in rows_of_one]
    candidates = pd.DataFrame(rows)
    best = candidates["select_precision_at_k"].to_numpy()
    chosen = candidates.iloc[int(np.nanargmax(best))].to_dict()
    workers = worker_processes(len(jobs), processes)
    seconds = time.perf_counter() - started
    if progress:
        print(f"[search] {len(classifier_table)} classifiers and {len(jobs) + len(widths)} heads compared in "
              f"{seconds:.1f} s on "
              f"{workers} worker process(es) of {cfg.train_threads or 'all'} thread(s) each", file=sys.stderr)
    return SearchOutcome(slices, classifier, classifier_table, candidates, chosen, predicted, seconds, workers)


# --------------------------------------------------------------------------------------------
# The final model
# --------------------------------------------------------------------------------------------


@dataclass
class FinalModel:
    """The chosen candidate refitted on every train row: its head (None: frozen features) and classifier."""

    head: ProjectionHead | None
    head_config: HeadConfig | None
    classifier: CategoryClassifier
    seconds: float


def refit_chosen(vectors: np.ndarray, classifier_vectors: np.ndarray, labels, outcome: SearchOutcome,
                 cfg: SearchConfig = SearchConfig(), progress: bool = True) -> FinalModel:
    """Retrains the chosen head on all train rows for the epoch count early stopping chose, and the classifier.

    ``vectors`` are the chosen feature set's train-row features, ``classifier_vectors`` the
    chosen classifier features'. Same seed as in the search.
    """
    started = time.perf_counter()
    labels = np.asarray(labels).astype(str)
    chosen = outcome.chosen
    head, head_cfg = None, None
    if chosen["loss"] != NO_HEAD:
        head_cfg = _head_config(cfg, int(chosen["hidden_dim"]))
        with torch_threads(cfg.train_threads):
            head = train_head(vectors, labels, sorted(set(labels)), chosen["loss"], head_cfg,
                              epochs=max(1, int(chosen["epochs"])), progress=progress,
                              desc=f"refit: {chosen['loss']} head on all train rows").head
    classifier = train_classifier(classifier_vectors, labels, outcome.classifier["features"],
                                  float(outcome.classifier["c"]), cfg.head.seed)
    return FinalModel(head, head_cfg, classifier, time.perf_counter() - started)
