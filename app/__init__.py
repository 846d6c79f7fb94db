"""The recommendation app (Streamlit); a package so that import-linter holds it to the product's contract."""
