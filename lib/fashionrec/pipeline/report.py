"""``results/<run>/report.md``: protocol, comparison with intervals, verdicts, figures.

The report is assembled only from the files the stages wrote into the run directory, so
it says nothing that is not on disk next to it. Timings are machine-dependent and stay in
its last section, "Timings": two runs with the same parameters write the same report above it.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from .. import config
from ..data.ledger import describe_counts
from ..evaluation.duplicates import DEFAULT_THRESHOLD, find_duplicates
from ..features.files import load_embeddings
from .stages import COLOUR_SWEEP_FIGURE, COLOUR_SWEEP_FILE, small_gallery_caveat, write_colour_sweep_files

PRIMARY_METRICS = ("precision_at_k", "hit_rate_at_1", "map_at_k", "hit_rate_at_k", "recall_at_k")


def _markdown(table: pd.DataFrame, floatfmt: str = ".3f") -> str:
    def cell(value):
        if isinstance(value, float):
            return format(value, floatfmt)
        return str(value).replace("|", "\\|")

    header = "| " + " | ".join(map(str, table.columns)) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    body = ["| " + " | ".join(cell(value) for value in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def _with_intervals(results: list[dict]) -> pd.DataFrame:
    rows = []
    for result in results:
        row = {"backbone": result["backbone"], "index": result["index"]}
        for name in PRIMARY_METRICS:
            low, high = result[f"{name}_ci"]
            row[name] = f"{result[name]:.3f} [{low:.3f}, {high:.3f}]"
        rows.append(row)
    return pd.DataFrame(rows)


def _finetune_section(out: Path, k: int) -> list[str]:
    table = _read_csv(out / "finetune.csv")
    if table is None or not len(table):
        return []
    record = json.loads((out / "finetune_metrics.json").read_text())
    lines = [f"## Fine-tuning (trained on the train split only; query -> gallery, P@{k} [95% CI])", "",
             f"Model of record: level {record['chosen_level']} (better validation P@{k}), "
             f"backbone name `{record['finetuned_backbone']}`; training rows fingerprint "
             f"`{record['train_fingerprint'][:16]}`.", "", _markdown(table.astype(object).where(table.notna(), "")), ""]
    for level in ("level1", "level2"):
        if record.get(level):
            classification = record[level]["classification"]
            lines.append(f"- {level}: category classifier ({classification['classifier']['model']} on "
                         f"{classification['classifier']['features']} features, C={classification['classifier']['C']}) "
                         f"on {classification['n']} queries: accuracy {classification['accuracy']:.3f}"
                         + (" [{:.3f}, {:.3f}]".format(*classification["accuracy_ci"])
                            if "accuracy_ci" in classification else "")
                         + f", macro F1 {classification['macro_f1']:.3f}.")
    if record.get("level2_skipped"):
        lines.append(f"- level 2 skipped: {record['level2_skipped']}")
    chosen_level = "level2" if record["chosen_level"] == 2 else "level1"
    return lines + [""] + _category_aware_lines(record[chosen_level]["category_aware"], k)


def _interval(record: dict, name: str = "precision_at_k") -> str:
    low, high = record[f"{name}_ci"]
    return f"{record[name]:.3f} [{low:.3f}, {high:.3f}]"


def _category_aware_lines(aware: dict, k: int) -> list[str]:
    """The boost chosen on validation, then that one setting against the plain ranking on the queries."""
    boost, query, gain = aware["boost"], aware["query"], aware["query_gain_over_plain"]
    lines = [f"Category-aware ranking (gallery items of the query's predicted category get a score bonus; "
             f"gallery categories {aware['gallery_categories']}). Chosen on: {aware['chosen_on']}; "
             "a non-zero bonus is kept only when its paired validation gain is significant.", ""]
    if float(boost) == 0:
        lines.append(f"- Chosen bonus: **0** (none helped significantly on validation): the plain fine-tuned "
                     f"ranking, P@{k} {_interval(query['plain'])} on the queries.")
    else:
        how = "rank within the predicted category first" if boost == "inf" else "added to the cosine score"
        lines.append(f"- Chosen bonus: **{boost}** ({how}); on the queries P@{k} {_interval(query['chosen'])} vs "
                     f"plain {_interval(query['plain'])}, paired difference {gain['diff']:+.3f} "
                     f"[{gain['low']:+.3f}, {gain['high']:+.3f}].")
    if aware["validation"]:
        validation = pd.DataFrame(aware["validation"])[["boost", "val_precision_at_k", "val_map_at_k", "chosen"]]
        lines += ["", "Every bonus on the validation part (not the queries):", "", _markdown(validation)]
    return lines + [""]


def _interval_text(value, low, high, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _signed_interval(gain: dict) -> str:
    return f"{gain['diff']:+.3f} [{gain['low']:+.3f}, {gain['high']:+.3f}]"


def _search_section(out: Path, k: int) -> list[str]:
    metrics_file = out / "search_metrics.json"
    if not metrics_file.exists():
        return []
    record = json.loads(metrics_file.read_text())
    chosen, query, slices = record["chosen"], record["query"], record["slices"]
    head = chosen["head"]
    head_text = "no head (the frozen features)" if head is None else \
        f"a {head['loss']} head ({head['hidden_dim']} hidden, {head['out_dim']}-d, {head['epochs']} epochs)"
    boost = chosen["ranking"]["boost"]
    ranking = {0: "by similarity alone", "inf": "within the predicted category first"}.get(
        boost, f"with a score bonus of {boost} for the predicted category")
    lines = [f"## Model search over `{record['searched']}` (chosen on validation; P@{k} [95% CI])", "",
             f"The train split was cut into three stratified slices: fit ({slices['fit']} images: training), stop "
             f"({slices['stop']}: early stopping) and select ({slices['select']}: every comparison below). The select "
             "slice was never trained on nor used to stop training; each select image ranked the other select images, "
             "with categories predicted by the chosen classifier for both sides. **Numbers marked 'select' are "
             "validation numbers.** Only the chosen model and the references were scored on the queries.", "",
             f"**Chosen:** `{chosen['features']}` with {head_text}, ranked {ranking}; category classifier on "
             f"`{chosen['classifier']['features']}` (C={chosen['classifier']['C']}). Select P@{k} "
             f"{_interval_text(chosen['select_precision_at_k'], *chosen['select_precision_at_k_ci'])}. "
             f"Served as `{record['served_name']}` ({record['dim']}-d, {record['bytes_per_vector']} bytes per "
             "float32 vector).", "",
             f"Query -> gallery (gallery categories predicted, not looked up): P@{k} "
             f"{_interval_text(query['precision_at_k'], *query['precision_at_k_ci'])}, category accuracy "
             f"{_interval_text(query['category_accuracy'], *query['category_accuracy_ci'])}.", ""]
    table = _read_csv(out / "search.csv")
    if table is not None:
        shown = pd.DataFrame({
            "model": table["model"],
            f"P@{k}": [_interval_text(r.precision_at_k, r.precision_at_k_low, r.precision_at_k_high)
                       for r in table.itertuples()],
            "hit@1": table["hit_rate_at_1"].map(lambda v: f"{v:.3f}"),
            f"mAP@{k}": table["map_at_k"].map(lambda v: f"{v:.3f}"),
            "category accuracy": [_interval_text(r.category_accuracy, r.category_accuracy_low,
                                                 r.category_accuracy_high) if r.category_accuracy == r.category_accuracy
                                  else "" for r in table.itertuples()]})
        lines += ["Queries (the chosen model and the references only):", "", _markdown(shown), ""]
    gains = query["precision_at_k_gains"]
    first = query["references"]["frozen"]["backbone"]
    names = {"over_frozen": f"over `{first}` frozen",
             "over_finetuned": f"over `{first}` with its fine-tuned head (`--finetune`)"}
    for key, gain in gains.items():
        verdict = "significant" if gain["significant"] else "not significant"
        lines.append(f"- Paired gain in P@{k} {names.get(key, key)}: {_signed_interval(gain)} ({verdict}).")
    lines.append("")
    candidates = _read_csv(out / "search_candidates.csv")
    if candidates is not None:
        lines += [f"Every candidate on the select slice (validation): one row per feature set and head; P@{k} by "
                  "similarity alone and with the best category bonus (`inf`: within the predicted category first). "
                  "Dimensions are those of the stored vector; seconds per image are in the Timings section. All "
                  "boosts: `search_candidates.csv`.", "", _markdown(condensed_candidates(candidates, k)), ""]
    classifier = _read_csv(out / "search_classifier.csv")
    if classifier is not None:
        shown = classifier.assign(select_accuracy=[
            _interval_text(r.select_accuracy, *_bounds(r.select_accuracy_ci)) for r in classifier.itertuples()])
        lines += ["Category classifier candidates (logistic regression trained on fit + stop, accuracy on the select "
                  "slice: validation):", "", _markdown(shown.drop(columns=["select_accuracy_ci"])), ""]
    return lines


def _bounds(value) -> list[float]:
    """An interval as stored in a table: a list, or its JSON text once read back from a CSV."""
    return json.loads(value) if isinstance(value, str) else list(value)


def condensed_candidates(candidates: pd.DataFrame, k: int) -> pd.DataFrame:
    """One row per feature set x head of a search's candidates: select P@k plain and with the best boost [95% CI]."""
    rows = []
    keys = ["features", "loss", "hidden_dim"]
    for (features, loss, hidden), group in candidates.groupby(keys, dropna=False, sort=False):
        plain = group[group["boost"] == 0]
        best = group.loc[group["select_precision_at_k"].idxmax()]
        plain_row = plain.iloc[0] if len(plain) else best
        rows.append({"features": features, "head": "none" if loss == "none" else f"{loss}, {int(hidden)}",
                     "dim": int(best["dim"]),
                     "select plain": _interval_text(plain_row["select_precision_at_k"],
                                                    *_bounds(plain_row["select_precision_at_k_ci"])),
                     "best boost": str(best["boost"]),
                     f"select P@{k}": _interval_text(best["select_precision_at_k"],
                                                     *_bounds(best["select_precision_at_k_ci"]))})
    return pd.DataFrame(rows)


def _distance_dimension_section(out: Path, k: int) -> list[str]:
    summary_file = out / "distance_dimension.json"
    if not summary_file.exists():
        return []
    lines = [f"## Distance and dimension (exact search, chosen on validation; P@{k} [95% CI] on the queries)", "",
             "Each variant is scored on a validation part of the train split (its images rank the rest of the "
             "train split, which also fits the PCA); the best replaces the reference (raw features, cosine) only "
             "when its paired validation gain is significant. Only the chosen setting is scored on the queries.", ""]
    for backbone, summary in json.loads(summary_file.read_text()).items():
        chosen, query = summary["chosen"], summary["query"]
        setting = f"{chosen['variant']}, {chosen['distance']}, {chosen['dim']}-d"
        reference, picked = query["reference"], query["chosen"]
        line = (f"- `{backbone}`: chosen **{setting}** ({summary['chosen_on']}); on the queries P@{k} "
                f"{picked['precision_at_k']:.3f} [{picked['precision_at_k_ci'][0]:.3f}, "
                f"{picked['precision_at_k_ci'][1]:.3f}]")
        if (chosen["variant"], chosen["distance"]) != ("raw", "cosine"):
            gain = summary["query_gain_over_reference"]
            line += (f" vs raw cosine {reference['precision_at_k']:.3f}, paired difference {gain['diff']:+.3f} "
                     f"[{gain['low']:+.3f}, {gain['high']:+.3f}]")
        lines.append(line + ".")
    table = _read_csv(out / "distance_dimension.csv")
    lines += ["", "Every variant on the validation part (not the queries):", "", _markdown(table), ""]
    return lines


def _timings_section(out: Path) -> list[str]:
    lines = ["## Timings", "", "Machine-dependent, so kept apart from the metrics files: "
             "`throughput.csv`, `index_timings.csv`, `finetune_timing.json`.", ""]
    cost = _read_csv(out / "search_cost.csv")
    search_timing = out / "search_timing.json"
    if cost is not None and search_timing.exists():
        measured = json.loads(search_timing.read_text())["cost_measured_on"]
        lines += [f"Embedding cost of the model search's candidates, measured in one run on {measured['n_images']} "
                  f"{measured['split']} images (runtime {measured['runtime']}, batch {measured['batch_size']}, "
                  f"{measured['workers']} decoding threads, caches bypassed; 1-minute load average "
                  f"{measured['load_average_1min'][0]} before, {measured['load_average_1min'][1]} after): a "
                  "combination costs the sum of its networks; 'chosen (serving)' includes the classifier's "
                  "features when it ranks by predicted category.", "",
                  _markdown(cost, floatfmt=".4f"), ""]
    timing_file = out / "finetune_timing.json"
    if timing_file.exists():
        timing = json.loads(timing_file.read_text())
        lines.append(f"- Fine-tuning, level 1: {timing['level1_train_seconds']:.1f} s of training.")
        if timing.get("level2"):
            level2 = timing["level2"]
            lines.append(f"- Fine-tuning, level 2: {level2['train_seconds']:.0f} s of training (stopped by "
                         f"{level2['stopped_by']}) + {level2['feature_seconds']:.0f} s caching trunk features.")
        lines.append("")
    return lines


LEDGER_LINES_SHOWN = 20


def duplicates_section(out: Path, backbones: dict, threshold: float = DEFAULT_THRESHOLD,
                       shown: int = 10) -> list[str]:
    """Exact (same content digest) and near (cosine >= threshold) duplicates among the run's images, with
    the groups that span the query and gallery splits: each such query is an easy hit (leakage)."""
    backbone = next((name for name, entry in backbones.items() if entry["status"] == "ok"), None)
    if backbone is None or not (out / "embeddings").is_dir():
        return []
    try:
        vectors, metadata, _ = load_embeddings(out / "embeddings", backbone)
    except (OSError, ValueError):
        return []
    groups = find_duplicates(vectors, metadata["digest"], threshold)
    split, ids, paths = metadata["split"].tolist(), metadata["id"].astype(str).tolist(), metadata["path"].tolist()
    spanning = [group for group in groups.exact + groups.near
                if {"query", "gallery"} <= {split[row] for row in group}]
    lines = [f"## Duplicates (exact: same file content; near: `{backbone}` cosine >= {threshold:g})", "",
             f"- {len(groups.exact)} groups of exact duplicates, {len(groups.near)} groups of near duplicates among "
             f"{len(metadata)} images; {len(spanning)} groups have members in both the query and the gallery split, "
             "so those queries find a copy of themselves (`python -m fashionrec evaluate --json` reports "
             "`near_duplicate_queries` and `precision_at_k_without_near_duplicates`).", ""]
    for kind, kind_groups in (("exact", groups.exact), ("near", groups.near)):
        for group in kind_groups[:shown]:
            lines.append(f"- {kind}: " + ", ".join(f"`{ids[row]}` ({split[row]}, `{Path(paths[row]).name}`)"
                                                   for row in group))
        if len(kind_groups) > shown:
            lines.append(f"- ... and {len(kind_groups) - shown} more {kind} groups")
    return lines + [""]


def _ledger_section(skipped: list[dict]) -> list[str]:
    if not skipped:
        return ["Files left out: none.", ""]
    shown = pd.DataFrame(skipped[:LEDGER_LINES_SHOWN])[["path", "stage", "reason"]]
    more = f" (the first {LEDGER_LINES_SHOWN}; all of them are in `skipped.json`)" \
        if len(skipped) > LEDGER_LINES_SHOWN else ""
    return [f"Files left out{more}:", "", _markdown(shown), ""]


def verdict_lines(winners: pd.DataFrame, value_format: str = ".3f") -> list[str]:
    """One line per metric and verdict, naming every index that gave it, instead of one per index.

    Indexes share a line when they agree on the best backbone, on significance and on its
    value written with ``value_format``.
    """
    lines = []
    shown = winners["value"].map(lambda value: format(value, value_format))
    metric_order = {metric: position for position, metric in enumerate(dict.fromkeys(winners["metric"]))}
    ordered = winners.assign(shown=shown, order=winners["metric"].map(metric_order)).sort_values("order", kind="stable")
    for (metric, best, significant, value), group in ordered.groupby(
            ["metric", "best", "significant_over_all_others", "shown"], sort=False):
        verdict = "significantly better than all others" if significant else \
            "not significantly better than every other backbone"
        indexes = ", ".join(f"`{index}`" for index in group["index"])
        lines.append(f"- {metric}: **{best}** ({value}), {verdict} — {indexes}")
    return lines


def colour_sweep_text(record: dict) -> str:
    """The sweep as a markdown table (values with 95% intervals) and the validation suggestion."""
    protocol, suggested = record["protocol"], record["suggested"]
    k, relevance = protocol["k"], ",".join(protocol["relevance"])
    table = pd.DataFrame([{
        "w": f"{row['colour_weight']:g}",
        f"P@{k} ({relevance}) [95% CI]": _interval_text(row["precision_at_k"], *row["precision_at_k_ci"]),
        f"category P@{k} [95% CI]": _interval_text(row["category_precision_at_k"],
                                                   *row["category_precision_at_k_ci"]),
        f"change vs w={record['rows'][0]['colour_weight']:g}: P@{k} / category P@{k} (paired 95% CI)":
            f"{_signed_interval(row['precision_at_k_change'])} / {_signed_interval(row['category_precision_at_k_change'])}",
        f"validation P@{k} ({relevance})": f"{row['validation_precision_at_k']:.3f}",
        f"validation category P@{k}": f"{row['validation_category_precision_at_k']:.3f}",
    } for row in record["rows"]])
    return "\n".join([_markdown(table), "",
                       f"Suggested on validation: w = {suggested['colour_weight']:g} ({suggested['rule']}; "
                       f"{suggested['chosen_on']}). Pick the point that suits your shop."])


def _colour_sweep_section(out: Path) -> list[str]:
    path = out / COLOUR_SWEEP_FILE
    if not path.exists():
        return []
    record = json.loads(path.read_text())
    protocol = record["protocol"]
    k = protocol["k"]
    return [f"## Colour weight: category P@{k} against P@{k} by {', '.join(protocol['relevance'])}", "",
            f"`{protocol['backbone']}` fused with the product colour (`{protocol['colour_backbone']}`): "
            f"{protocol['fusion']}; `{protocol['dataset']}`, split seed {protocol['split_seed']}, "
            f"{protocol['n_queries']} queries -> {protocol['n_gallery']} gallery, index `{protocol['index']}`, "
            f"k={k}. A query's result counts for the first column only when every named column matches "
            "(a missing value never matches); the second is the category alone.", "",
            colour_sweep_text(record), "", f"![colour sweep](figures/{COLOUR_SWEEP_FIGURE})", ""]


def write_colour_sweep(run_name: str, record: dict) -> Path:
    """Writes the sweep (JSON, figure) into ``results/<run>/`` and its section into the run's report.md.

    A run with the pipeline's files gets its whole report rewritten; a run directory holding only
    sweeps gets a report of its own.
    """
    out = config.RESULTS_DIR / run_name
    out.mkdir(parents=True, exist_ok=True)
    write_colour_sweep_files(out, record)
    if (out / "metrics.json").exists():
        return write_report(run_name)
    protocol = record["protocol"]
    lines = [f"# Run `{run_name}`: {protocol['dataset']}, colour-weight sweep at k={protocol['k']}", "",
             *_colour_sweep_section(out)]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def _read_csv(path: Path) -> pd.DataFrame | None:
    return pd.read_csv(path) if path.exists() else None


def write_report(run_name: str, params_file: str | None = None) -> Path:
    out = config.RESULTS_DIR / run_name
    summary = json.loads((out / "metrics.json").read_text())
    protocol, results = summary["protocol"], summary["results"]
    k = protocol["k"]
    lines = [f"# Run `{run_name}`: {protocol['dataset']}, query -> gallery retrieval at k={k}", ""]
    if params_file:
        lines += [f"Reproduce with `make pipeline PARAMS={params_file}`.", ""]
    counts = _read_csv(out / "split_counts.csv")
    fingerprints = sorted({result["dataset_fingerprint"] for result in results})
    skipped = json.loads((out / "skipped.json").read_text())
    not_sampled = (f"; {protocol['n_not_sampled']} images not sampled (max per category "
                   f"{protocol['max_per_class']})" if protocol.get("n_not_sampled") else "")
    lines += [
        "## Protocol", "",
        f"- Dataset: `{protocol['dataset']}` from `{protocol['data_dir']}`; {protocol['n_images']} images used, "
        f"{describe_counts(skipped)}, every one in `skipped.json` with its stage and reason{not_sampled}; "
        f"max per category: {protocol['max_per_class']}; category map: {protocol['category_map']}.",
        f"- Fingerprint of the evaluated images (id, label, split, content digest): `{', '.join(f[:16] for f in fingerprints)}`.",
        f"- Split: stratified per category, train/gallery/query = 60/20/20 %, seed {protocol['split_seed']}. "
        "Each query ranks the gallery; a result is relevant when its category equals the query's.",
        f"- Metrics at k={k}, distance `{protocol['metric']}`; 95% intervals: percentile bootstrap over queries "
        f"({results[0]['bootstrap']['n_boot']} resamples, seed {results[0]['bootstrap']['seed']})." if results else "",
        "- hit_rate = at least one relevant result in the top k (the metric-learning 'Recall@k'); "
        "recall = share of all relevant gallery images found in the top k; map = mean AP@k normalised by min(k, #relevant).",
        f"- Indexes: {', '.join(f'`{name}`' for name in protocol['indexes'])}.",
        "- Software: " + ", ".join(f"{name} {version}" for name, version in summary["versions"].items()) + ".",
        "",
    ]
    if counts is not None:
        lines += ["Images per category and split:", "", _markdown(counts), ""]
    lines += _ledger_section(skipped)
    lines += ["## Backbones", ""]
    backbones = json.loads((out / "backbones.json").read_text())
    for name, entry in backbones.items():
        if entry["status"] == "ok":
            sha = entry["weights_sha256"]
            failed = entry.get("skipped", [])
            embedded = f"all {entry['n']} images embedded" if not failed else \
                f"{entry['n']} images embedded, {len(failed)} failed at embedding (" + \
                "; ".join(f"`{item['path']}`: {item['reason']}" for item in failed) + ")"
            lines.append(f"- `{name}`: {entry['dim']}-d, {embedded}; weights sha256 "
                         f"{sha[:16] + '…' if sha else 'none (no learnt weights)'}")
        else:
            lines.append(f"- `{name}`: **skipped** — {entry['reason']}")
    lines += ["", *duplicates_section(out, backbones)]
    lines += [f"## Results (P@{k}, hit@1, mAP@{k}, hit@{k}, recall@{k}; value [95% CI])", "",
              _markdown(_with_intervals(results)), ""]
    for variant, reason in summary.get("indexes_not_built", {}).items():
        lines.append(f"- not evaluated: `{variant}`: {reason}")
    if summary.get("indexes_not_built"):
        lines.append("")

    comparisons = _read_csv(out / "paired_comparisons.csv")
    winners = _read_csv(out / "winners.csv")
    if winners is not None and len(winners):
        lines += ["## Verdicts", "", "Best backbone per metric; 'significant' means its paired 95% interval "
                  "against every other backbone excludes zero. Indexes with the same verdict share a line.", ""]
        lines += verdict_lines(winners) + [""]
    if comparisons is not None and len(comparisons):
        lines += ["Paired differences (a - b, same queries):", "", _markdown(comparisons), ""]

    per_category = _read_csv(out / "per_category.csv")
    if per_category is not None and len(per_category):
        primary_index = protocol["indexes"][0]
        table = per_category[per_category["index"] == primary_index]
        pivot = table.pivot(index="category", columns="backbone", values="precision_at_k")
        support = table.groupby("category")["support"].first()
        pivot.insert(0, "queries", support)
        lines += [f"## Per category (P@{k}, index `{primary_index}`)", "",
                  _markdown(pivot.reset_index()), ""]

    table = _read_csv(out / "index_variants.csv")
    if table is not None and len(table):
        caveat = small_gallery_caveat(table)
        lines += ["## Index variants (recall against exact search)", ""]
        lines += [f"**{caveat}**", ""] if caveat else []
        lines += [_markdown(table), ""]
    lines += _distance_dimension_section(out, k)
    lines += _finetune_section(out, k)
    lines += _search_section(out, k)
    lines += _colour_sweep_section(out)
    figures = sorted((out / "figures").glob("*.png")) if (out / "figures").exists() else []
    if figures:
        lines += ["## Figures", ""] + [f"- [{figure.stem}](figures/{figure.name})" for figure in figures] + [""]
    lines += _timings_section(out)
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
