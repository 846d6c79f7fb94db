"""Catalogs: safe image decoding, the named loaders, the seeded split. Imports nothing above it."""
