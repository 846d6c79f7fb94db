"""Training jobs side by side on every core: the same results as one after another."""
from __future__ import annotations

import functools
import os

import numpy as np
import pandas as pd
import pytest
import torch

from fashionrec.training.heads import HeadConfig
from fashionrec.training.parallel import can_fork, run_jobs, worker_processes
from fashionrec.training.search import SearchConfig, search_models

needs_fork = pytest.mark.skipif(not can_fork(), reason="worker processes are forked")


def _seeded_job(seed: int) -> tuple[int, int, np.ndarray]:
    torch.manual_seed(seed)
    layer = torch.nn.Linear(6, 3)
    return seed, os.getpid(), layer(torch.ones(2, 6)).detach().numpy()


def _failing_job():
    raise ValueError("job 2 cannot run")


@needs_fork
def test_results_come_back_in_the_jobs_order_from_other_processes():
    jobs = [functools.partial(_seeded_job, seed) for seed in range(7)]
    parallel = run_jobs(jobs, processes=2, costs=[1, 5, 2, 7, 3, 1, 0])
    sequential = run_jobs(jobs, processes=1)
    assert [seed for seed, _, _ in parallel] == list(range(7))
    assert all(pid != os.getpid() for _, pid, _ in parallel)
    assert all(pid == os.getpid() for _, pid, _ in sequential)
    for (_, _, a), (_, _, b) in zip(parallel, sequential):
        assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="job 2 cannot run"):
        run_jobs([jobs[0], _failing_job], processes=2)


def test_workers_are_never_more_than_the_jobs():
    assert worker_processes(1, None) == 1 and worker_processes(10, 3) == 3 and worker_processes(0, 4) == 1


def _clustered(rng, labels: np.ndarray, dim: int, spread: float) -> np.ndarray:
    centres = {label: rng.normal(size=dim) for label in sorted(set(labels))}
    return np.stack([centres[label] + spread * rng.normal(size=dim) for label in labels]).astype(np.float32)


@needs_fork
def test_a_parallel_search_chooses_and_scores_exactly_as_a_sequential_one():
    rng = np.random.default_rng(0)
    labels = np.repeat(["shirt", "dress", "shoe", "bag"], 45)
    features = {"small": _clustered(rng, labels, 12, 2.0), "wide": _clustered(rng, labels, 40, 1.5),
                "noisy": _clustered(rng, labels, 24, 4.0)}
    cfg = SearchConfig(losses=("norm_softmax", "supcon"), hidden_dims=(16, 32), classifier_c=(0.1, 1.0),
                       frozen_candidates=False,
                       head=HeadConfig(hidden_dim=16, out_dim=8, epochs=6, patience=3, batch_size=32, k=5))
    one = search_models(features, features, labels, cfg, progress=False, processes=1)
    two = search_models(features, features, labels, cfg, progress=False, processes=2)
    assert (one.processes, two.processes) == (1, 2)
    timing = ["train_seconds", "train_cpu_seconds"]
    pd.testing.assert_frame_equal(one.candidates.drop(columns=timing), two.candidates.drop(columns=timing))
    pd.testing.assert_frame_equal(one.classifier_table.drop(columns=["seconds", "cpu_seconds"]),
                                  two.classifier_table.drop(columns=["seconds", "cpu_seconds"]))
    pd.testing.assert_series_equal(pd.Series(one.chosen).drop(timing), pd.Series(two.chosen).drop(timing))
    assert one.classifier == two.classifier and np.array_equal(one.predicted, two.predicted)
    # A head won, so its second width was trained too (stage 2), after the 3 x 2 heads of stage 1.
    assert len(one.candidates) == (3 * 2 + 1) * len(cfg.boosts) and set(one.candidates["stage"]) == {1, 2}
