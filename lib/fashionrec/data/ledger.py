"""The skipped-file ledger: every file a run leaves out, listed once, with its stage and reason.

An entry is a plain dict ``{"path", "stage", "reason"}`` (JSON-ready); ``path`` is relative to
the dataset root. The same list is what ``skipped.json``, ``embed --json``, ``evaluate --json``
(``skipped`` beside ``n_skipped``) and the run report show, so their counts agree: the images a
run uses plus its ledger are all the files it looked at, apart from the images that
``max_per_class`` did not sample (counted as ``n_not_sampled``, not listed).
"""
from __future__ import annotations

from collections import Counter

# The stages in the order a file meets them, and what leaving a file out at each one means.
STAGES = {
    "catalog": "a row of the catalog file names no image file",
    "label": "no usable label: missing, not a category, no row in the label file, outside a category "
             "sub-folder, or dropped by the category map",
    "duplicate": "its id was already taken by an earlier file (the first one is kept)",
    "file": "missing, a dangling link, not a regular file, or unreadable",
    "header": "refused from its header: not an image, an unsupported format, a corrupt header, a decompression bomb",
    "decode": "the header is fine but the pixels do not decode in full (truncated or corrupt data)",
    "split": "its category has too few usable images to fill train, gallery and query",
    "embed": "failed while embedding although it passed the checks (e.g. the file changed since)",
}


def skipped_entry(path, stage: str, reason: str) -> dict:
    """One ledger entry; ``stage`` must be one of :data:`STAGES`."""
    if stage not in STAGES:
        raise ValueError(f"unknown ledger stage {stage!r}; stages: {', '.join(STAGES)}")
    return {"path": str(path), "stage": stage, "reason": reason}


def count_by_stage(skipped: list[dict]) -> dict[str, int]:
    """Entries per stage, in stage order (stages with none left out)."""
    counts = Counter(entry["stage"] for entry in skipped)
    return {stage: counts[stage] for stage in STAGES if counts[stage]}


def describe_counts(skipped: list[dict]) -> str:
    """``"2 files left out (header 1, decode 1)"``: the one-line summary a report and the CLI print."""
    counts = count_by_stage(skipped)
    detail = f" ({', '.join(f'{stage} {n}' for stage, n in counts.items())})" if counts else ""
    return f"{len(skipped)} file{'' if len(skipped) == 1 else 's'} left out{detail}"
