"""Choosing an index for a catalog size, a dimension, memory and disk budgets and a recall target.

Autofaiss-style rules over a short list of candidates; each candidate's recall ceiling is
read from ``recall_ceilings.json`` beside this module, which records the measurement it
came from (``benchmarks/index_scale.py`` at a million vectors). A ceiling is a prior, not
a promise: :func:`fashionrec.indexing.measure.tune_search_params` measures the chosen index
on held-out queries. Memory means what the process holds; an ``,RDisk`` candidate also needs
a float16 copy of the vectors on disk (2 * d bytes each), which the disk budget must allow.
"""
from __future__ import annotations

import json
import math
import re
from functools import cache
from pathlib import Path

from .faiss_index import (DEFAULT_EF_SEARCH, DEFAULT_REFINE_K_FACTOR, DISK_REFINE_K_FACTOR,
                          FAST_SCAN_REFINE_K_FACTOR, nlist_for, pq_m_for, resolve_factory)

# choose_index: exhaustive search is preferred while one query scans at most this many
# floats (about 100k vectors of 1280 dimensions: a few ms per query on two cores).
EXACT_SCAN_MAX_FLOATS = 128_000_000
# Measured size of faiss's HNSW32 graph per vector: 2*32 level-0 links plus upper levels
# (expected 32/31 extra links), as int32, plus level and offset bookkeeping.
HNSW32_LINK_BYTES = 272
# Bytes per stored id in inverted lists (faiss idx_t).
IVF_ID_BYTES = 8
FAST_SCAN_BLOCK = 32


RECALL_CEILINGS_FILE = Path(__file__).with_name("recall_ceilings.json")

# Bytes of a float16 vectors file per vector (``,RDisk`` candidates).
DISK_BYTES_PER_DIMENSION = 2
# 1-bit RaBitQ codes: one bit per dimension plus two float factors.
RABITQ_FACTOR_BYTES = 8
DISK_PROJECTION_DIM = 256
DISK_RERANK_TEMPLATE = f"PCAU{DISK_PROJECTION_DIM},IVF{{nlist}},RaBitQ,RDisk"

# choose_index candidates, in order of preference: template, bytes per vector in memory as
# f(d, m), and whether it carries a d*d OPQ matrix. Measured at a million vectors, the
# disk-re-ranked compact index was faster at recall 0.95 than re-ranking 8-bit PQ from
# vectors held in memory, with 1/100 of the memory: where disk may be used, it comes first
# after HNSW (never measured at that size: its graph build takes hours on two cores).
_CHOICE_CANDIDATES = (
    ("HNSW32", lambda d, m: 4 * d + HNSW32_LINK_BYTES, False),
    (DISK_RERANK_TEMPLATE, lambda d, m: min(d, DISK_PROJECTION_DIM) / 8 + RABITQ_FACTOR_BYTES + IVF_ID_BYTES, False),
    ("IVF{nlist},PQ{m},RFlat", lambda d, m: 4 * d + m + IVF_ID_BYTES, False),
    ("IVF{nlist},PQ{m}x4fs,RFlat", lambda d, m: 4 * d + m / 2 + IVF_ID_BYTES, False),
    ("OPQ{m},IVF{nlist},PQ{m},Refine(SQ8)", lambda d, m: d + m + IVF_ID_BYTES, True),
    ("OPQ{m},IVF{nlist},PQ{m}", lambda d, m: m + IVF_ID_BYTES, True),
    ("IVF{nlist},PQ{m}x4fs", lambda d, m: m / 2 + IVF_ID_BYTES, False),
)


@cache
def recall_ceilings() -> dict[str, float]:
    """Measured recall@10 ceiling of each candidate template (``recall_ceilings.json``)."""
    table = json.loads(RECALL_CEILINGS_FILE.read_text())["ceilings"]
    return {template: float(entry["recall_at_10"]) for template, entry in table.items()}


def choose_index(n: int, d: int, memory_budget_bytes: float, recall_target: float = 0.95,
                 disk_budget_bytes: float = math.inf) -> dict:
    """Pick an index for ``n`` vectors of dimension ``d`` (autofaiss-style rules).

    1. Flat (exact) when a query scans at most ``EXACT_SCAN_MAX_FLOATS`` floats and the raw
       vectors fit the budget: small galleries need no approximation.
    2. Otherwise the first candidate (HNSW32; uncentred PCA to 256 dimensions (none for
       d <= 256), IVF, 1-bit RaBitQ codes in memory re-ranked exactly from float16 vectors on disk; IVF-PQ with exact
       re-ranking; IVF-PQ fast-scan with exact re-ranking; OPQ IVF-PQ re-ranked from SQ8; OPQ
       IVF-PQ; IVF-PQ fast-scan) whose estimated memory fits ``memory_budget_bytes``, whose
       float16 vectors file (if any) fits ``disk_budget_bytes`` (0: no disk), and whose recall
       ceiling reaches the target.
    3. If none that fits can reach the target, the fitting one with the highest ceiling
       (Flat, when it fits, is exact however slow); the rationale says the target is at risk.
    4. If nothing fits, ValueError with the smallest footprint on offer.

    Search parameters grow with the target (efSearch 64/128/256, nprobe x1/x2/x4 the
    default, re-rank factor x1/x2/x4 its default, for targets below 0.9 / below 0.97 / above).
    Estimated size = per-vector bytes * n + centroids (nlist*d floats, or nlist*256 behind the
    projection) + projection (d*256 floats) + OPQ matrix (d*d floats) + PQ codebooks (256*d or
    16*d floats) + fast-scan block padding: the serialised size of what stays in memory.
    IVF-PQ searched with metric "l2" also precomputes nlist*m*256 floats in RAM.
    Returns factory (resolved), params, rationale, estimated_bytes_per_vector,
    estimated_total_bytes, estimated_disk_bytes, recall_ceiling. The params are a starting point: once the index is
    built, :func:`tune_search_params` finds the cheapest setting that meets the target.
    """
    if n < 1 or d < 1:
        raise ValueError(f"need n >= 1 and d >= 1, got n={n}, d={d}")
    nlist, m = nlist_for(n), pq_m_for(d)
    tier = 0 if recall_target < 0.9 else 1 if recall_target < 0.97 else 2
    nprobe = min(nlist, max(16, int(math.sqrt(nlist))) * 2 ** tier)

    def option(template, per_vector, ceiling, has_opq):
        projected = re.match(r"PCAU(\d+),", template)
        if projected and int(projected.group(1)) >= d:  # nothing to reduce: the same index without the projection
            template, projected = template[projected.end():], None
        inner_d = int(projected.group(1)) if projected else d
        fixed = (nlist * inner_d * 4 if "IVF" in template else 0) + (d * d * 4 if has_opq else 0)
        if projected:
            fixed += d * inner_d * 4
        if "x4fs" in template:
            # 16 centroids per sub-quantizer; lists are stored in blocks of 32 codes, so about
            # half a block per list is padding
            fixed += 16 * d * 4 + FAST_SCAN_BLOCK / 2 * nlist * m / 2
        elif "PQ" in template:
            fixed += 256 * d * 4
        params = []
        if "IVF" in template:
            params.append(f"nprobe={nprobe}")
        if template.startswith("HNSW"):
            params.append(f"efSearch={DEFAULT_EF_SEARCH * 2 ** tier}")
        if "RDisk" in template:
            params.append(f"k_factor_rf={DISK_REFINE_K_FACTOR * 2 ** tier}")
        elif "RFlat" in template or "Refine" in template:
            k_factor = FAST_SCAN_REFINE_K_FACTOR if "fs" in template else DEFAULT_REFINE_K_FACTOR
            params.append(f"k_factor_rf={k_factor * 2 ** tier}")
        total = per_vector * n + fixed
        return {
            "factory": resolve_factory(template, n, d),
            "params": ",".join(params),
            "rationale": "",
            "estimated_bytes_per_vector": total / n,
            "estimated_total_bytes": total,
            "estimated_disk_bytes": DISK_BYTES_PER_DIMENSION * d * n if "RDisk" in template else 0,
            "recall_ceiling": ceiling,
        }

    flat = option("Flat", 4 * d, 1.0, False)
    if flat["estimated_total_bytes"] <= memory_budget_bytes and n * d <= EXACT_SCAN_MAX_FLOATS:
        flat["rationale"] = (f"exact search: {n} x {d} floats fit the budget and one query scans "
                             f"at most {EXACT_SCAN_MAX_FLOATS:.3g} floats")
        return flat

    ceilings = recall_ceilings()
    candidates = [option(t, bytes_fn(d, m), ceilings[t], o) for t, bytes_fn, o in _CHOICE_CANDIDATES]
    candidates.append(flat)

    def fits(candidate):
        return (candidate["estimated_total_bytes"] <= memory_budget_bytes
                and candidate["estimated_disk_bytes"] <= disk_budget_bytes)

    fitting = [c for c in candidates if fits(c)]
    if not fitting:
        smallest = min(c["estimated_total_bytes"] for c in candidates)
        raise ValueError(f"no index for {n} x {d} fits {memory_budget_bytes:.4g} bytes; "
                         f"the smallest candidate needs about {smallest:.4g}")
    skipped = []
    for candidate in candidates:
        size = f"~{candidate['estimated_bytes_per_vector']:.0f} B/vector"
        if candidate["estimated_disk_bytes"] > disk_budget_bytes:
            skipped.append(f"{candidate['factory']} needs {candidate['estimated_disk_bytes']:.3g} bytes of disk")
        elif not fits(candidate):
            skipped.append(f"{candidate['factory']} ({size}) exceeds the budget")
        elif candidate["recall_ceiling"] < recall_target:
            skipped.append(f"{candidate['factory']} caps recall near {candidate['recall_ceiling']}")
        else:
            on_disk = (f" in memory (+ {candidate['estimated_disk_bytes'] / 2**30:.1f} GiB of float16 vectors on disk)"
                       if candidate["estimated_disk_bytes"] else "")
            candidate["rationale"] = "; ".join(skipped + [
                f"{candidate['factory']} fits {memory_budget_bytes / 2**20:.0f} MiB at {size}{on_disk} "
                f"and its recall ceiling {candidate['recall_ceiling']} reaches {recall_target}"])
            return candidate
    best = max(fitting, key=lambda c: c["recall_ceiling"])
    best["rationale"] = "; ".join(skipped + [
        f"nothing that fits is expected to reach recall {recall_target}: taking the highest "
        f"ceiling ({best['recall_ceiling']}), target at risk"])
    return best


