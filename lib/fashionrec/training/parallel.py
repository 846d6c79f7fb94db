"""Independent training jobs on every core: one worker process per core, one thread each.

The heads, classifiers and students a search compares are small: one of them cannot keep two
cores busy (their matrices are too small for intra-op threads to pay, see
:class:`~fashionrec.training.heads.torch_threads`), but several train side by side perfectly.
:func:`run_jobs` runs a list of jobs (callables without arguments: closures, partials, bound
methods) in forked worker processes and returns their results in the jobs' order. A job reads
its inputs from the memory it was forked with (nothing is copied to start it); only its result
travels back, pickled.

A job computes the same result in a worker as in the calling process: every job here is seeded
(its own ``torch.manual_seed``), and each worker runs torch and the BLAS/OpenMP pools on one
thread, as the search's sequential path does (``train_threads=1``), so the parallel and the
sequential run agree exactly (tested). Where ``fork`` is not available (Windows, macOS
interpreters that refuse it) or one process is asked for, the jobs run one after another here.
"""
from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from threadpoolctl import threadpool_limits

from ..console import progress_bar
from ..settings import available_threads

Result = TypeVar("Result")

# The jobs of the run in progress, inherited by the workers forked for it.
_jobs: Sequence[Callable[[], object]] = ()


def worker_processes(jobs: int, processes: int | None = None) -> int:
    """How many workers ``jobs`` jobs get: ``processes`` (None: one per CPU), never more than the jobs."""
    wanted = available_threads() if processes is None else processes
    return max(1, min(wanted, jobs))


def can_fork() -> bool:
    return "fork" in multiprocessing.get_all_start_methods()


def run_jobs(jobs: Sequence[Callable[[], Result]], processes: int | None = None, progress: bool = False,
             desc: str = "jobs", costs: Sequence[float] | None = None) -> list[Result]:
    """``[job() for job in jobs]``, computed by ``processes`` worker processes (None: one per CPU).

    Results come back in the jobs' order whatever order they finish in; an exception in a job
    is raised here. ``costs`` (one per job, any unit): the workers take the costliest jobs
    first, so that no long job is left running alone at the end. ``progress`` shows a bar
    that advances as jobs finish.
    """
    global _jobs
    workers = worker_processes(len(jobs), processes)
    bar = progress_bar(total=len(jobs), desc=desc, unit="job", progress=progress)
    if workers == 1 or not can_fork():
        results = []
        for job in jobs:
            results.append(job())
            bar.update(1)
        bar.close()
        return results
    results: list = [None] * len(jobs)
    _jobs = jobs
    try:
        with multiprocessing.get_context("fork").Pool(workers, initializer=_one_thread) as pool:
            order = sorted(range(len(jobs)), key=lambda i: -costs[i]) if costs is not None else range(len(jobs))
            for position, result in pool.imap_unordered(_run_job, order):
                results[position] = result
                bar.update(1)
    finally:
        _jobs = ()
        bar.close()
    return results


def _one_thread() -> None:
    """A worker computes on one thread: the workers together already fill every core."""
    torch.set_num_threads(1)
    threadpool_limits(1)


def _run_job(position: int) -> tuple[int, object]:
    return position, _jobs[position]()
