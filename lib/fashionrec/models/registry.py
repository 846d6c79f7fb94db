"""Backbones by name: the built-in ones, your own, and fine-tuned models.

* Built-in backbones: :mod:`fashionrec.models.builtin` (``python -m fashionrec backbones``).
* Your own: decorate a builder with :func:`register_backbone` in a module of yours and name
  that module (a ``.py`` file or an importable module) with ``--backbone-module`` on the
  command line, ``backbone_modules`` in a parameter file, or the environment variable
  ``FASHIONREC_BACKBONE_MODULES`` (``os.pathsep``-separated); an installed package can
  instead declare an entry point in the group ``fashionrec.backbones``. Every process that
  looks a backbone up (the CLI, papermill kernels, the app) loads them first, so a
  registered backbone is seen everywhere.
* ``<base>+head:<file>``: a fine-tuned model (:mod:`fashionrec.models.finetuned`).
* ``ensemble:<a>,<b>,...`` and ``<backbone>@<view>+<view>``: combinations of backbones and
  views (:mod:`fashionrec.models.ensemble`, docs/ensembles.md); ``<base>`` above may be one.

A builder takes the optional weights file (``Path`` or None) and returns a
:class:`~fashionrec.models.backbone.BuiltBackbone`. When it states no weights checksum, the
state dict is hashed, so the embedding cache always tells two weight sets apart.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path

from .. import config
from ..errors import FashionRecError, UnknownBackbone, did_you_mean
from .backbone import Backbone, BackboneSpec, BuiltBackbone, state_dict_sha256
from .builtin import BUILTIN_BACKBONES
from .ensemble import CombinedBackbone, combined_backbone, is_combined_name, parse_combined_name
from .finetuned import HEAD_SEPARATOR, headed_backbone, split_backbone_name

BACKBONE_MODULES_ENV = "FASHIONREC_BACKBONE_MODULES"
ENTRY_POINT_GROUP = "fashionrec.backbones"
# Characters a backbone name may hold: it becomes part of file and cache directory names.
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")

BACKBONES: dict[str, BackboneSpec] = {spec.name: spec for spec in BUILTIN_BACKBONES}
_loaded_sources: set[str] = set()


def register_backbone(name: str, *, dim: int, description: str, family: str = "custom",
                      input_size: int | None = None) -> Callable:
    """Decorator that adds a backbone to the registry under ``name``.

    ``dim`` is the embedding size the builder's model returns. Registering the same name
    again with another builder is an error (a built-in cannot be replaced by accident).
    """
    if not _NAME.match(name):
        raise FashionRecError(f"backbone name {name!r}: use letters, digits, '_', '.' and '-' only")
    if not isinstance(dim, int) or dim < 1:
        raise FashionRecError(f"backbone {name!r}: dim must be a positive integer, got {dim!r}")

    def decorator(builder: Callable[[Path | None], BuiltBackbone]):
        existing = BACKBONES.get(name)
        if existing is not None and _qualified(existing.builder) != _qualified(builder):
            raise FashionRecError(f"backbone {name!r} is already registered (by {_qualified(existing.builder)})")
        BACKBONES[name] = BackboneSpec(name, family, dim, input_size, description, builder)
        return builder

    return decorator


def _qualified(function) -> str:
    return f"{getattr(function, '__module__', '?')}.{getattr(function, '__qualname__', repr(function))}"


def load_backbone_modules(sources) -> list[str]:
    """Imports each module that registers backbones: a ``.py`` path or a dotted module name.

    Relative paths are looked up from the working directory, then from the project root.
    Each source is loaded once per process. Returns the names of the backbones they added.
    """
    before = set(BACKBONES)
    for source in [s for s in (sources or []) if str(s).strip()]:
        source = str(source).strip()
        if source in _loaded_sources:
            continue
        _import_source(source)
        _loaded_sources.add(source)
    return sorted(set(BACKBONES) - before)


def _import_source(source: str) -> None:
    looks_like_file = source.endswith(".py") or os.sep in source or "/" in source
    try:
        if looks_like_file:
            path = _existing_file(source)
            module_name = f"fashionrec_user_backbones_{path.stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
            spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            spec.loader.exec_module(module)
        else:
            importlib.import_module(source)
    except FashionRecError:
        raise
    except Exception as error:  # the user's module may raise anything while it runs
        raise FashionRecError(f"{source}: cannot load this backbone module ({type(error).__name__}: {error})") \
            from error


def _existing_file(source: str) -> Path:
    for candidate in (Path(source), config.PROJECT_ROOT / source):
        if candidate.is_file():
            return candidate.resolve()
    raise FashionRecError(f"{source}: backbone module not found (looked in {Path.cwd()} and {config.PROJECT_ROOT})")


def _load_configured_modules() -> None:
    """The modules named by the environment and the installed entry points, once per process."""
    load_backbone_modules(os.environ.get(BACKBONE_MODULES_ENV, "").split(os.pathsep))
    for point in entry_points(group=ENTRY_POINT_GROUP):
        key = f"entry point {point.name} = {point.value}"
        if key in _loaded_sources:
            continue
        try:
            point.load()
        except Exception as error:  # a broken third-party package must say which one it is
            raise FashionRecError(f"{key}: cannot load ({type(error).__name__}: {error})") from error
        _loaded_sources.add(key)


def list_backbones() -> list[str]:
    _load_configured_modules()
    return list(BACKBONES)


def backbone_spec(name: str) -> BackboneSpec:
    """The spec of a registered backbone; UnknownBackbone (with the available names) otherwise."""
    _load_configured_modules()
    spec = BACKBONES.get(name)
    if spec is None:
        raise UnknownBackbone(f"unknown backbone {name!r}{did_you_mean(name, BACKBONES)}; available: "
                              f"{', '.join(BACKBONES)}. Fine-tuned models are named <backbone>{HEAD_SEPARATOR}<file>; "
                              "add your own backbone with --backbone-module (docs/custom-backbones.md)")
    return spec


def check_backbone_name(name: str) -> None:
    """Raises UnknownBackbone unless ``name`` resolves, without building anything heavy."""
    base = split_backbone_name(name)[0]
    if is_combined_name(base):
        for member in parse_combined_name(base)[1]:
            backbone_spec(member.backbone)
        return
    backbone_spec(base)


def get_backbone(name: str, weights_file: str | Path | None = None) -> Backbone | CombinedBackbone:
    """Build the named backbone in eval mode.

    ``weights_file`` replaces the published weights with a local state_dict file (for
    the backbones that have pretrained weights); it must fit the architecture exactly.
    ``<name>+head:<file or run>`` is a fine-tuned model: the base backbone followed by its
    trained projection head; its cache key covers the head file's parameters.
    ``ensemble:...`` and ``<backbone>@<views>`` build a :class:`CombinedBackbone` of their
    members (each built once); a weights file does not apply to a combination.
    """
    if HEAD_SEPARATOR in name:
        base_name, _ = split_backbone_name(name)
        return headed_backbone(name, get_backbone(base_name, weights_file=weights_file))
    if is_combined_name(name):
        if weights_file is not None:
            raise FashionRecError(f"{name!r} combines several backbones: --weights-file applies to one backbone "
                                  "only; register the other weights as a backbone of their own and name it")
        return combined_backbone(name, get_backbone)
    spec = backbone_spec(name)
    built = spec.builder(Path(weights_file) if weights_file is not None else None)
    if not isinstance(built, BuiltBackbone):
        raise FashionRecError(f"backbone {name!r}: its builder returned {type(built).__name__}, "
                              "expected fashionrec.BuiltBackbone")
    built.model.eval()
    if built.classifier is not None:
        built.classifier.eval()
    weights_sha256 = built.weights_sha256
    if weights_sha256 is None and built.model.state_dict():
        weights_sha256 = state_dict_sha256(built.model)
    return Backbone(name=spec.name, dim=spec.dim, transform=built.transform, model=built.model,
                    classifier=built.classifier, weights_sha256=weights_sha256, description=spec.description)


def load_user_backbones(modules, backbone: str | None = None) -> None:
    """Imports the backbone ``modules`` (``--backbone-module``), then checks that ``backbone`` (if any) names one.

    Both happen before any data is read, so a typo costs nothing.
    """
    load_backbone_modules(modules)
    if backbone:
        check_backbone_name(backbone)
