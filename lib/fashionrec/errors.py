"""Exceptions the workbench raises on purpose, each carrying a message a user can act on.

A query answers with one of five kinds of failure, which the HTTP service
(:mod:`fashionrec.service.app`) maps to status codes in one table:

    FashionRecError
      ImageError          the photo is not a usable image (also a decompression bomb)   422
      UnknownItem         no live catalog item has this id                              404
      BadParameter        k, a colour weight, an exclusion... out of range or malformed 400
        UnknownCategory   the index has no item of this category                        400
      IndexUnavailable    no loadable index version (missing, broken, being replaced)   503
        IndexFolderError  an index folder is missing, incomplete or inconsistent
"""
from __future__ import annotations

import difflib


class FashionRecError(Exception):
    """Base class: the CLI prints these as one line and exits non-zero."""


class ImageError(FashionRecError):
    """An image file cannot be used; ``reason`` is a short, specific explanation."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class WeightsUnavailable(FashionRecError):
    """Pretrained weights for a backbone cannot be found locally nor downloaded."""


class DatasetError(FashionRecError):
    """A dataset cannot be loaded (missing directory, bad catalog file...)."""


class IndexBuildError(FashionRecError, ValueError):
    """An index variant cannot be built on this data (e.g. too few vectors to train it)."""


class UnknownBackbone(FashionRecError, ValueError):
    """No backbone is registered under this name."""


def did_you_mean(name: str, choices) -> str:
    """`` (did you mean 'T-Shirt'?)`` for the choices closest to ``name`` (same letters in another case
    first), or "" when none is close: the tail of an error message about a misspelt name."""
    choices = [str(choice) for choice in choices]
    same_letters = [choice for choice in choices if choice.lower() == name.lower()]
    close = same_letters or difflib.get_close_matches(name, choices, n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(choice) for choice in close)}?)" if close else ""


class BadParameter(FashionRecError, ValueError):
    """A parameter of a query or an update is malformed or out of range; the message names it."""


class UnknownCategory(BadParameter):
    """A category the index holds no item of; the message lists those it has."""


class UnknownItem(FashionRecError, LookupError):
    """An id that names no live item of the index."""


class IndexUnavailable(FashionRecError):
    """No index version can answer now (missing, unreadable, or written by an incompatible version)."""


class IndexFolderError(IndexUnavailable):
    """An index folder is missing, incomplete or inconsistent; the message says how to (re)build it."""
