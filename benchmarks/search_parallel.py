"""Model search wall time: candidates trained one after another against side by side on every core.

    python benchmarks/search_parallel.py [--dataset clothing] [--data-dir DIR]
        [--backbone ensemble:efficientnet_lite0,efficientnet_lite1,efficientnet_lite2] [--rounds 2] [--json]

Runs the search of ``evaluate --backbone ensemble:... --finetune`` (fashionrec.experiment.search.
search_finetuned: classifier and head candidates on the select slice, the chosen one refitted on
every train row, then scored on query -> gallery) with 1 worker process and with one per CPU, in
alternating order (1, c, c, 1, ...), retraining every time (the cached model is ignored; the
embeddings are computed once, before timing, and reused). Reports each wall time, the speedup,
and whether both chose the same model with the same P@10. The 1-minute load average is recorded:
on a machine shared with other jobs, more processes also win a larger share of it, so the
speedup of a loaded run overstates what an idle machine gives.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from fashionrec.data.prepared import prepare
from fashionrec.experiment.search import search_finetuned
from fashionrec.settings import InferenceSettings, available_threads
from fashionrec.training.heads import HeadConfig
from fashionrec.training.search import SearchConfig


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="clothing")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--backbone", default="ensemble:efficientnet_lite0,efficientnet_lite1,efficientnet_lite2")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2, help="runs of each, in alternating order")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    cores = available_threads()
    settings = InferenceSettings(progress=not args.json)
    prepared = prepare(args.dataset, args.data_dir, progress=not args.json)
    # Embeddings first (cached, through a one-epoch search of one head), so that the timed runs measure the search.
    warm = SearchConfig(losses=("norm_softmax",), hidden_dims=(8,), classifier_c=(1.0,),
                        head=HeadConfig(hidden_dim=8, epochs=1, k=args.k, seed=prepared.split_seed))
    search_finetuned(prepared, args.backbone, warm, k=args.k, settings=settings, reference=False)
    load_before = [round(value, 2) for value in os.getloadavg()]
    seconds = {1: [], cores: []}
    outcomes = {}
    for round_number in range(args.rounds):
        for processes in (1, cores) if round_number % 2 == 0 else (cores, 1):
            started = time.perf_counter()
            result = search_finetuned(prepared, args.backbone, k=args.k, settings=settings, retrain=True,
                                      reference=False, processes=processes)
            seconds[processes].append(time.perf_counter() - started)
            finetune = result.record["finetune"]
            outcomes.setdefault(processes, []).append({"chosen": finetune["chosen"],
                                                       "precision_at_k": result.record["precision_at_k"],
                                                       "candidates": finetune["candidates_compared"]})
    runs = [outcome for outcome_list in outcomes.values() for outcome in outcome_list]
    one, every = sum(seconds[1]) / len(seconds[1]), sum(seconds[cores]) / len(seconds[cores])
    record = {
        "dataset": args.dataset, "backbone": args.backbone, "k": args.k, "cpus": cores, "rounds": args.rounds,
        "candidates_compared": runs[0]["candidates"],
        "seconds_one_process": [round(value, 1) for value in seconds[1]],
        "seconds_every_core": [round(value, 1) for value in seconds[cores]],
        "speedup": round(one / every, 2),
        "same_choice_and_precision": all(run == runs[0] for run in runs),
        "precision_at_k": runs[0]["precision_at_k"],
        "chosen": runs[0]["chosen"],
        "load_average_before": load_before,
        "load_average_after": [round(value, 2) for value in os.getloadavg()],
    }
    if args.json:
        json.dump(record, sys.stdout, default=str)
        sys.stdout.write("\n")
    else:
        print(f"{args.dataset} | {args.backbone} | {record['candidates_compared']} candidate rows | {cores} CPUs")
        print(f"one process: {record['seconds_one_process']} s; {cores} processes: {record['seconds_every_core']} s; "
              f"speedup {record['speedup']:.2f}x")
        print(f"same choice and P@{args.k} in every run: {record['same_choice_and_precision']} "
              f"(P@{args.k} {record['precision_at_k']})")
        print(f"machine load (1, 5, 15 min averages) before: {record['load_average_before']}, "
              f"after: {record['load_average_after']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
