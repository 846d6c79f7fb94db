"""``recommend``: the catalog items most similar to a photo (any image file) or to a catalog item.

    python -m fashionrec recommend --index-dir OUTDIR --image PATH [--image PATH ...] --k 5 [--category C] [--json]
    python -m fashionrec recommend --index-dir OUTDIR --id ID --k 5 [--json]        # "more like this"
        [--filter colour=Red --filter price=10..50]   (only items whose attributes pass every filter)
        [--box x,y,w,h]          (search for the product inside this box of the photo, in pixels)
        [--milvus-uri URI]       (a folder built with --store milvus: where its collection lives now)

A filter is ``column=value``, ``column=a,b`` (any of them; text compares case-insensitively)
or, for a numeric column, ``column=low..high`` (inclusive; ``..high`` and ``low..`` too).
Filters apply inside the search: k results come back while k items pass them.

With ``--json``, one object: ``{"results": [{"id", "path", "label", "score", "attributes":
{column: value}, "label_probability"}, ...], "timing_ms": {"decode", "preprocess", "embed",
"search", "total"}}`` (plus ``predicted_category`` when the index carries a category classifier,
and ``warnings``, e.g. for a photo under 32 pixels on a side); ``label_probability`` is null for
a label the catalog gave, the classifier's probability for a predicted one. With several
queries ``{"queries": [{"image" or "id", "results", "timing_ms"}, ...]}``. Every image is
checked before the index is loaded: a file that is not a usable image ends the command with its
name and the reason.
"""
from __future__ import annotations

import argparse
import sys

from ..data.attributes import parse_filter
from ..data.images import check_box, probe_image
from ..errors import FashionRecError, ImageError
from ..ranking.rank import check_colour_weight
from ..serving.folder import current_version
from ..serving.quality import describe_quality
from ..serving.recommender import Recommendation, Recommender
from ..settings import InferenceSettings
from .commands import SUMMARIES
from .common import add_store_arguments, print_json, serving_store


def add_parser(commands) -> None:
    parser = commands.add_parser("recommend", help=SUMMARIES["recommend"],
                                 description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index-dir", required=True, help="an index folder (python -m fashionrec index ... --out)")
    query = parser.add_mutually_exclusive_group(required=True)
    query.add_argument("--image", action="append", metavar="PATH", help="a photo (repeatable)")
    query.add_argument("--id", action="append", metavar="ID", help="a catalog item: more like this (repeatable)")
    parser.add_argument("--k", type=int, default=10, help="number of results (default %(default)s)")
    parser.add_argument("--category", default=None, help="only items of this category")
    parser.add_argument("--filter", action="append", default=[], metavar="COLUMN=VALUE",
                        help="only items whose attribute passes: colour=Red, colour=Red,Blue (any), price=10..50 "
                             "(numeric range); repeatable, all must hold")
    parser.add_argument("--box", default=None, metavar="X,Y,W,H",
                        help="with --image: search for what lies in this box of the photo (pixels from the top-left)")
    parser.add_argument("--exclude-id", action="append", default=[], metavar="ID",
                        help="never return this item (repeatable), e.g. the query photo's own catalog id")
    parser.add_argument("--colour-weight", type=float, default=0.0,
                        help="w in [0, 1]: rank by (1-w) x network similarity + w x product-colour similarity "
                             "(default 0: the network alone; needs an index folder built with colour descriptors)")
    parser.add_argument("--threads", type=int, default=None, help="threads of the query model (default: all CPUs)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    add_store_arguments(parser, default=None, what="where the index's vectors are searched")
    parser.set_defaults(handler=run)


def run(args) -> int:
    if args.k < 1:
        raise FashionRecError(f"--k must be at least 1, got {args.k}")
    args.colour_weight = check_colour_weight(args.colour_weight)
    args.filters = [parse_filter(text) for text in args.filter]
    if args.box is not None and not args.image:
        raise FashionRecError("--box crops a photo: it goes with --image")
    check_box(args.box)
    for path in args.image or []:
        try:
            probe_image(path)
        except ImageError as error:
            raise FashionRecError(f"--image {error.path}: {error.reason}") from None
    store = serving_store(args)
    current_version(args.index_dir)
    # A command answers a few photos and exits: Pillow's resize beats loading the compiled one.
    settings = InferenceSettings(threads=args.threads, progress=False, compiled_resize=False)
    with Recommender.load(args.index_dir, settings, store=store) as recommender:
        recommender.check_colour_weight(args.colour_weight)   # an old folder: one line, before any query
        recommender.attribute_mask(args.filters)              # an unknown column or value: one line, before any query
        if not args.json and recommender.manifest.quality:
            print(f"index quality: {describe_quality(recommender.manifest.quality)}")
        queries, failed = _answer(recommender, args)
        quality = recommender.manifest.quality
    if args.json:
        answers = queries[0] if len(queries) == 1 and "error" not in queries[0] else {"queries": queries}
        print_json({**answers, "quality": quality})
    return 2 if failed else 0


def _answer(recommender: Recommender, args) -> tuple[list[dict], int]:
    """Every query's answer (or its error) and how many failed."""
    queries, failed = [], 0
    for value in args.image or args.id:
        try:
            if args.image:
                answer = recommender.recommend(value, k=args.k, category=args.category, exclude_ids=args.exclude_id,
                                               colour_weight=args.colour_weight, filters=args.filters, box=args.box)
            else:
                answer = recommender.similar_to(value, k=args.k, category=args.category, exclude_ids=args.exclude_id,
                                                colour_weight=args.colour_weight, filters=args.filters)
        except ImageError as error:   # passed the header check, failed to decode
            print(f"error: --image {error.path}: {error.reason}", file=sys.stderr)
            queries.append({"image": value, "error": error.reason})
            failed += 1
            continue
        queries.append({("image" if args.image else "id"): value, **answer.to_dict()})
        if not args.json:
            _print(value, answer)
    return queries, failed


def _print(query: str, answer: Recommendation) -> None:
    timing = answer.timing_ms
    print(f"{query}  ({timing['total']:.1f} ms: " + ", ".join(f"{stage} {timing[stage]:.1f}" for stage in timing
                                                               if stage != "total") + ")")
    for warning in answer.warnings:
        print(f"  warning: {warning}")
    if answer.predicted_category is not None:
        print(f"  predicted category: {answer.predicted_category} ({answer.category_probability:.2f})")
    for rank, item in enumerate(answer.results, 1):
        label = item.label if item.label_probability is None else f"{item.label} (predicted {item.label_probability:.2f})"
        attributes = "  " + " ".join(f"{column}={value}" for column, value in item.attributes.items()) \
            if item.attributes else ""
        print(f"  {rank:>3}. {item.score:7.4f}  {label:<14} {item.id}  {item.path}{attributes}")
