"""Embedding catalogs with a backbone, and the crash-safe, content-addressed cache."""
