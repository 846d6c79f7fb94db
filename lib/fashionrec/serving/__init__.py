"""Serving: a persisted, servable index folder and the Recommender that answers queries from it.

``build`` writes index folders (atomically, see ``folder``), ``recommender`` loads them and
answers photos and ids, ``store`` is the seam to the vector index (FAISS), ``encoder`` and
``assets`` turn one query photo into a vector and a predicted category.
"""
