"""The notebook's interactive recommender: upload or pick a photo, choose k and a category, see the grid.

Widgets only draw in a live Jupyter kernel; a headless run (papermill, nbval) builds them
without effect, so notebooks show their result grids through plain calls as well.
"""
from __future__ import annotations

import ipywidgets as widgets
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import display

from ..data.images import decode_query
from ..errors import FashionRecError, ImageError
from ..serving.recommender import Recommender
from . import plots

ALL_CATEGORIES = "All categories"


def catalog_picks(recommender: Recommender, n: int, seed: int = 0) -> list[str]:
    """Ids of ``n`` catalog items drawn with ``seed``, from as many categories as possible."""
    catalog = recommender.catalog
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(catalog))
    picked, seen = [], set()
    for position in order:   # one per category first, then any
        label = catalog["label"].iloc[position]
        if label not in seen:
            picked.append(position)
            seen.add(label)
        if len(picked) == n:
            break
    picked += [p for p in order if p not in picked][:n - len(picked)]
    return catalog["id"].iloc[sorted(picked)].tolist()


def recommender_widget(recommender: Recommender, k: int = 5, n_picks: int = 24, seed: int = 0) -> widgets.Widget:
    """Upload a photo or pick a catalog item; k slider; category filter; attribute filters (``colour=Red;
    price=10..50``, see :mod:`fashionrec.data.attributes`); the result grid below."""
    catalog = recommender.catalog.set_index("id")
    picks = catalog_picks(recommender, n_picks, seed)
    upload = widgets.FileUpload(accept="image/*", multiple=False, description="Upload a photo")
    pick = widgets.Dropdown(options=[("—", None)] + [(f"{catalog.at[i, 'label']} · {i}", i) for i in picks],
                            description="Catalog item")
    slider = widgets.IntSlider(value=k, min=1, max=24, description="k")
    category = widgets.Dropdown(options=[ALL_CATEGORIES, *recommender.categories], description="Category")
    attributes = ", ".join(recommender.attribute_columns) or "none in this index"
    filters = widgets.Text(description="Filters", placeholder=f"colour=Red; price=10..50 ({attributes})",
                           continuous_update=False)
    output = widgets.Output()
    state = {"query": None}

    def show(*_):
        query = state["query"]
        if query is None:
            return
        chosen = None if category.value == ALL_CATEGORIES else category.value
        where = [part.strip() for part in filters.value.split(";") if part.strip()]
        with output:
            output.clear_output(wait=True)
            try:
                if query[0] == "photo":
                    answer = recommender.recommend(query[2], k=slider.value, category=chosen, filters=where)
                    row = (decode_query(query[2]), query[1], answer, None)
                else:
                    item = recommender.item(query[1])
                    answer = recommender.similar_to(query[1], k=slider.value, category=chosen, filters=where)
                    row = (item.path, f"{item.label} · {item.id}", answer, item.label)
            except ImageError as error:
                print(f"{query[1]}: {error.reason}; try another photo")
                return
            except FashionRecError as error:
                print(error)
                return
            figure = plots.recommendations([row])
            display(figure)
            plt.close(figure)
            timing = answer.timing_ms
            print(f"{timing['total']:.1f} ms" + (f"; predicted category {answer.predicted_category}"
                                                  if answer.predicted_category else ""))
            for warning in answer.warnings:
                print(f"warning: {warning}")

    def uploaded(change):
        files = change["new"]
        if files:
            state["query"] = ("photo", files[0]["name"], bytes(files[0]["content"]))
            show()

    def picked(change):
        if change["new"] is not None:
            state["query"] = ("item", change["new"])
            show()

    upload.observe(uploaded, names="value")
    pick.observe(picked, names="value")
    slider.observe(show, names="value")
    category.observe(show, names="value")
    filters.observe(show, names="value")
    return widgets.VBox([widgets.HBox([upload, pick]), widgets.HBox([slider, category]), filters, output])
