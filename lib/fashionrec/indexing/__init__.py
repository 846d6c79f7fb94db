"""FAISS indexes (build, search, save), choosing one, and measuring them apart from the index code."""
