"""Exceptions the workbench raises on purpose, each carrying a message a user can act on."""


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


class IndexFolderError(FashionRecError):
    """An index folder is missing, incomplete or inconsistent; the message says how to (re)build it."""
