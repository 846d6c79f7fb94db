"""fashionrec · similar products: photo in, the most similar catalog items out.

A thin Streamlit shell over ``fashionrec.Recommender``: the index folder is loaded once per
server (``st.cache_resource``), every interaction is one ``recommend`` / ``similar_to`` call,
and the current query lives in ``st.session_state``.

    make app [INDEX=OUTDIR] [PORT=8501]
    streamlit run app/streamlit_app.py -- --index-dir OUTDIR      (or FASHIONREC_INDEX_DIR=OUTDIR)
        [--store faiss|milvus] [--milvus-uri URI]                 (where the index's vectors are searched)
"""
from __future__ import annotations

import argparse
import os
import random
import sys

import streamlit as st
from fashionrec import Recommender, StoreSettings
from fashionrec.data.images import decode_query, load_image
from fashionrec.errors import FashionRecError, ImageError
from fashionrec.serving.quality import describe_quality
from fashionrec.settings import STORES
from PIL import Image, ImageDraw, ImageOps

INDEX_ENV = "FASHIONREC_INDEX_DIR"
GRID_COLUMNS = 4
# A text attribute with more distinct values than this is not offered as a filter (ids, names...).
MAX_FILTER_CHOICES = 40
BOX_OUTLINE = (230, 40, 90)
# Every result in the same frame (the whole product, padded), so the grid lines up.
THUMBNAIL_SIZE = (360, 480)
THUMBNAIL_BACKGROUND = (246, 246, 246)
BUILD_COMMANDS = ("make app                      # builds a default index once, then serves it\n"
                  "python -m fashionrec index --dataset clothing --backbone efficientnet_lite0 --out OUTDIR\n"
                  "streamlit run app/streamlit_app.py -- --index-dir OUTDIR")


MILVUS_TOKEN_ENV = "MILVUS_TOKEN"


def app_arguments() -> tuple[str | None, str | None, str | None]:
    """(index folder, store, Milvus URI) from the arguments after ``--`` (or the environment)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--index-dir", default=None)
    parser.add_argument("--store", default=None, choices=STORES)
    parser.add_argument("--milvus-uri", default=None)
    known, _ = parser.parse_known_args(sys.argv[1:])
    return known.index_dir or os.environ.get(INDEX_ENV), known.store, known.milvus_uri


# on_release: a Recommender evicted from the cache lets go of its store (a Milvus Lite file, say).
@st.cache_resource(show_spinner="Loading the index…", on_release=Recommender.close)
def load_recommender(path: str, store: str | None = None, milvus_uri: str | None = None) -> Recommender:
    asked = None if store is None and milvus_uri is None else \
        StoreSettings(store or "milvus", milvus_uri, os.environ.get(MILVUS_TOKEN_ENV, ""))
    return Recommender.load(path, store=asked)


@st.cache_data(max_entries=4096, show_spinner=False)
def thumbnail(path: str) -> Image.Image:
    return ImageOps.pad(load_image(path, draft_size=max(THUMBNAIL_SIZE)), THUMBNAIL_SIZE, color=THUMBNAIL_BACKGROUND)


def set_query(**query) -> None:
    st.session_state["query"] = query


def more_like_this(item_id: str) -> None:
    set_query(kind="item", id=item_id)


def sidebar(recommender: Recommender) -> tuple[int, str | None, float]:
    described = recommender.describe()
    with st.sidebar:
        st.header("Search")
        k = st.slider("Results", min_value=1, max_value=24, value=8, key="k")
        choice = st.selectbox("Category", ["All categories", *described["categories"]], key="category")
        colour_weight = st.slider(
            "Colour weight", min_value=0.0, max_value=1.0, value=0.0, step=0.05, key="colour_weight",
            disabled=not recommender.has_colour or described["metric"] != "cosine",
            help="0: shape and style as the network sees them; 1: the product's colour only (its background "
                 "discounted). Between: (1 - w) x network + w x colour similarity."
                 + ("" if recommender.has_colour else " This index folder has no colour descriptors: rebuild it "
                                                      "with `python -m fashionrec index` to use it."))
        filters = attribute_filters(recommender)
        st.header("Index")
        st.markdown(f"**{described['n_items']:,}** items of *{described['dataset'] or 'a catalog'}*  \n"
                    f"model `{described['backbone']}` ({described['runtime']})"
                    + (", with its category classifier" if described["classifier"] else "") + "  \n"
                    f"index `{described['index']}` {described['search_params']} · {described['metric']}  \n"
                    f"`{described['out']}` ({described['version']})")
        if described["quality"]:
            st.markdown(f"**Quality**: {describe_quality(described['quality'])}")
        else:
            st.caption("No quality card: the index was built from an unlabelled catalog, a part of one, or with "
                       "--no-quality.")
    return k, None if choice == "All categories" else choice, colour_weight, filters


def attribute_filters(recommender: Recommender) -> list[str]:
    """Sidebar widgets for the catalog's attributes: any-of for text, a range for numbers; the filters chosen."""
    kinds = recommender.describe()["attributes"]
    if not kinds:
        return []
    st.header("Filters")
    catalog = recommender.catalog
    filters = []
    for column, kind in kinds.items():
        values = catalog[column].dropna()
        if values.empty:
            continue
        if kind == "number":
            low, high = float(values.min()), float(values.max())
            if low == high:
                continue
            chosen = st.slider(column, min_value=low, max_value=high, value=(low, high), key=f"filter-{column}")
            if chosen != (low, high):
                filters.append(f"{column}={chosen[0]:g}..{chosen[1]:g}")
            continue
        choices = sorted(values.astype(str).str.strip().unique())
        if len(choices) > MAX_FILTER_CHOICES:
            continue
        chosen = st.multiselect(column, choices, key=f"filter-{column}", placeholder="any")
        if chosen:
            filters.append(f"{column}={','.join(chosen)}")
    return filters


def crop_inputs(data: bytes) -> tuple[int, int, int, int] | None:
    """Numeric x, y, width, height of the product in an uploaded photo, with a preview; None: the whole photo."""
    try:
        picture = decode_query(data)
    except ImageError:
        return None   # run_query says why the photo cannot be used
    width, height = picture.size
    with st.expander("Crop to the product", icon=":material/crop:"):
        left, right = st.columns(2)
        x = left.number_input("x (from the left)", 0, width - 1, 0, key="box-x")
        y = right.number_input("y (from the top)", 0, height - 1, 0, key="box-y")
        box_width = left.number_input("width", 1, width, width, key="box-w")
        box_height = right.number_input("height", 1, height, height, key="box-h")
        box = (int(x), int(y), int(box_width), int(box_height))
        if box == (0, 0, width, height):
            return None
        preview = picture.copy()
        ImageDraw.Draw(preview).rectangle([x, y, min(x + box_width, width) - 1, min(y + box_height, height) - 1],
                                          outline=BOX_OUTLINE, width=max(2, min(width, height) // 100))
        preview.thumbnail((640, 640))
        st.image(preview, caption=f"searching inside {box_width}x{box_height} at ({x}, {y})", width="stretch")
        return box


def query_inputs(recommender: Recommender) -> None:
    """Upload / camera / catalog pick; each new input becomes the query."""
    upload = st.file_uploader("Upload a photo", key="upload",
                              help="JPEG, PNG, WebP, … A photo of one product works best.")
    if upload is not None and st.session_state.get("upload_seen") != upload.file_id:
        st.session_state["upload_seen"] = upload.file_id
        set_query(kind="photo", name=upload.name, data=upload.getvalue())
    if st.toggle("Use the camera", key="use_camera"):
        shot = st.camera_input("Take a photo", key="camera")
        if shot is not None and st.session_state.get("camera_seen") != shot.file_id:
            st.session_state["camera_seen"] = shot.file_id
            set_query(kind="photo", name="camera photo", data=shot.getvalue())
    if st.button("Random catalog item", key="random", icon=":material/casino:", width="stretch"):
        set_query(kind="item", id=random.choice(recommender.ids))
    item_id = st.text_input("…or a catalog id", key="typed_id", placeholder="an id from the catalog")
    if item_id and st.session_state.get("typed_seen") != item_id:
        st.session_state["typed_seen"] = item_id
        set_query(kind="item", id=item_id.strip())


def run_query(recommender: Recommender, query: dict, k: int, category: str | None, colour_weight: float = 0.0,
              filters=(), box=None):
    """(answer, the query's picture, its caption); an unusable query is shown as an error and gives None."""
    try:
        if query["kind"] == "photo":
            answer = recommender.recommend(query["data"], k=k, category=category, colour_weight=colour_weight,
                                           filters=list(filters), box=box)
            picture = decode_query(query["data"])
            if box is not None:
                picture = picture.crop((box[0], box[1], box[0] + box[2], box[1] + box[3]))
            picture.thumbnail((640, 640))
            return answer, picture, query["name"]
        item = recommender.item(query["id"])
        return recommender.similar_to(query["id"], k=k, category=category, colour_weight=colour_weight,
                                      filters=list(filters)), \
            thumbnail(item.path), \
            f"{item.label} · {item.id}"
    except ImageError as error:
        st.error(f"**{query.get('name', 'upload')}** cannot be used: {error.reason}. Try another photo (JPEG, PNG, "
                 "WebP…).", icon=":material/error:")
    except FashionRecError as error:
        st.error(str(error), icon=":material/error:")
    return None, None, None


def show_results(answer, category: str | None) -> None:
    if not answer.results:
        st.info("No item matches" + (f" in {category}." if category else "."))
        return
    for start in range(0, len(answer.results), GRID_COLUMNS):
        columns = st.columns(GRID_COLUMNS)
        for column, (rank, item) in zip(columns, enumerate(answer.results[start:start + GRID_COLUMNS], start + 1)):
            with column:
                try:
                    picture = thumbnail(item.path)
                except ImageError as error:   # the file changed or went away since it was indexed
                    st.warning(f"{item.id}: {error.reason}")
                    picture = Image.new("RGB", THUMBNAIL_SIZE, THUMBNAIL_BACKGROUND)
                st.image(picture, caption=result_caption(rank, item), width="stretch")
                st.button("More like this", key=f"more-{rank}-{item.id}", on_click=more_like_this, args=(item.id,),
                          width="stretch")


def result_caption(rank: int, item) -> str:
    """``3. Shirt · 0.912 · colour Red · price 25``; a predicted category says so, with its probability."""
    label = item.label if item.label_probability is None else f"{item.label} (predicted, {item.label_probability:.0%})"
    attributes = " · ".join(f"{column} {value:g}" if isinstance(value, float) else f"{column} {value}"
                            for column, value in item.attributes.items() if value is not None)
    return f"{rank}. {label} · {item.score:.3f}" + (f" · {attributes}" if attributes else "")


def timing_line(timing: dict) -> str:
    stages = " · ".join(f"{stage} {ms:.1f}" for stage, ms in timing.items() if stage != "total" and ms > 0)
    return f"Answered in {timing['total']:.1f} ms ({stages} ms)"


def main() -> None:
    st.set_page_config(page_title="fashionrec · similar products", page_icon="👗", layout="wide")
    st.title("Find similar products")
    path, store, milvus_uri = app_arguments()
    if not path:
        st.error("No index folder given.", icon=":material/folder_off:")
        st.code(BUILD_COMMANDS, language="bash")
        st.stop()
    try:
        recommender = load_recommender(path, store, milvus_uri)
    except (FashionRecError, ValueError) as error:
        st.error(f"The index cannot be loaded: {error}", icon=":material/folder_off:")
        st.code(BUILD_COMMANDS, language="bash")
        st.stop()
    try:   # a version saved meanwhile (`index --update`, another app) answers from this query on
        recommender.refresh()
    except FashionRecError as error:
        st.warning(f"A newer index version cannot be loaded ({error}); answering from {recommender.version}.",
                   icon=":material/warning:")
    k, category, colour_weight, filters = sidebar(recommender)
    left, right = st.columns([1, 3], gap="large")
    with left:
        query_inputs(recommender)
        query = st.session_state.get("query")
        answer = None
        if query is not None:
            box = crop_inputs(query["data"]) if query["kind"] == "photo" else None
            answer, picture, caption = run_query(recommender, query, k, category, colour_weight, filters, box)
            if answer is not None:
                st.image(picture, caption=f"Query: {caption}", width="stretch")
                for warning in answer.warnings:
                    st.warning(warning, icon=":material/warning:")
                if answer.predicted_category is not None:
                    st.success(f"Looks like **{answer.predicted_category}** ({answer.category_probability:.0%})")
                st.caption(timing_line(answer.timing_ms) + f" · index version {answer.index_version}")
    with right:
        if answer is not None:
            st.subheader(f"{len(answer.results)} most similar" + (f" in {category}" if category else "")
                         + (f" with {' and '.join(filters)}" if filters else ""))
            st.caption(f"Score: {recommender.describe()['metric']} similarity of the embeddings, higher is closer"
                       + (f"; {1 - colour_weight:.2f} x that + {colour_weight:.2f} x product-colour similarity."
                          if colour_weight > 0 else "."))
            show_results(answer, category)
        elif query is None:
            st.info("Upload a photo, take one, or pick a catalog item to see the most similar products.")


main()
