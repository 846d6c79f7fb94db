"""The files that pass between layers: typed, versioned, written and read in one place each."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from fashionrec.data.catalog import load_folder
from fashionrec.errors import FashionRecError, IndexFolderError, WeightsUnavailable
from fashionrec.evaluation.protocol import RECORD_SCHEMA_VERSION, EvaluationRecord, evaluate_embeddings
from fashionrec.models.finetuned import FORMAT as MODEL_FORMAT, MODEL_SCHEMA_VERSION, ModelFile, load_model, save_model
from fashionrec.serving.folder import current_version
from fashionrec.serving.manifest import BUILD_INFO, BUILD_SCHEMA_VERSION, BuildManifest
from fashionrec.serving.recommender import Recommender
from fashionrec.settings import InferenceSettings

QUIET = InferenceSettings(batch_size=16, workers=0, progress=False)


@pytest.fixture
def folder(color_folder, tmp_path):
    catalog = load_folder(color_folder, progress=False).catalog
    Recommender.build(tmp_path / "index", catalog, "colorhist", settings=QUIET).close()
    return tmp_path / "index"


def _build_json(folder):
    return current_version(folder) / BUILD_INFO


def test_build_json_round_trips_through_its_dataclass(folder):
    written = json.loads(_build_json(folder).read_text())
    assert written["schema_version"] == BUILD_SCHEMA_VERSION
    manifest = BuildManifest.read(current_version(folder))
    assert manifest.to_dict() == written
    assert BuildManifest.from_dict(manifest.to_dict(), "here") == manifest
    with Recommender.load(folder, QUIET) as recommender:
        assert recommender.manifest == manifest and recommender.info == written


def test_a_folder_written_before_schema_versions_loads_and_saves_at_the_current_one(folder, color_folder):
    """Today's folders have no schema_version: they read as version 1 and keep serving."""
    path = _build_json(folder)
    old = json.loads(path.read_text())
    del old["schema_version"]
    path.write_text(json.dumps(old, indent=1))
    with Recommender.load(folder, QUIET) as recommender:
        assert recommender.manifest.schema_version == 1
        first = recommender.recommend(next(color_folder.glob("red/*.jpg")), k=3)
        assert [item.label for item in first.results] == ["red"] * 3
        recommender.remove([recommender.ids[0]])
        recommender.save()
    assert json.loads(_build_json(folder).read_text())["schema_version"] == BUILD_SCHEMA_VERSION


def test_a_newer_or_broken_build_json_is_refused_in_one_line(folder):
    path = _build_json(folder)
    newer = {**json.loads(path.read_text()), "schema_version": BUILD_SCHEMA_VERSION + 1}
    path.write_text(json.dumps(newer))
    with pytest.raises(IndexFolderError) as refused:
        Recommender.load(folder, QUIET)
    message = str(refused.value)
    assert "\n" not in message and f"schema version {BUILD_SCHEMA_VERSION + 1}" in message
    assert f"up to {BUILD_SCHEMA_VERSION}" in message and str(path) in message
    del newer["runtime"]
    newer["schema_version"] = BUILD_SCHEMA_VERSION
    path.write_text(json.dumps(newer))
    with pytest.raises(IndexFolderError, match="lacks runtime"):
        Recommender.load(folder, QUIET)


def test_model_files_carry_their_schema_version_and_refuse_a_newer_one(tmp_path):
    model = ModelFile("efficientnet_lite0", in_dim=2, out_dim=2, state_dict={"w": torch.ones(2)}, metrics={"p": 0.5})
    save_model(model, tmp_path / "head.pt")
    written = torch.load(tmp_path / "head.pt", weights_only=True)
    assert written["schema_version"] == MODEL_SCHEMA_VERSION and written["format"] == MODEL_FORMAT
    assert written["ranking"] is None and written["classifier"] is None   # every key, set or not
    loaded = load_model(tmp_path / "head.pt")
    assert (loaded.backbone, loaded.in_dim, loaded.metrics, loaded.level) == ("efficientnet_lite0", 2, {"p": 0.5}, 1)
    assert torch.equal(loaded.state_dict["w"], torch.ones(2))
    assert loaded["backbone"] == loaded.get("backbone") == "efficientnet_lite0" and loaded.get("ranking", 0) == 0

    # A file as the current main writes it (a plain dict, version 2) and one from before versions (no field).
    today = {"format": MODEL_FORMAT, "backbone": "efficientnet_lite0", "level": 2, "loss": "supcon",
             "head_config": {"hidden_dim": 8}, "in_dim": 4, "out_dim": 2, "state_dict": {"w": torch.ones(2)},
             "trunk_state_dict": {"b": torch.zeros(1)}, "metrics": {}, "torch": "2.5.1", "a_later_key": [1, 2]}
    torch.save({**today, "schema_version": 2}, tmp_path / "today.pt")
    torch.save(today, tmp_path / "unversioned.pt")
    assert load_model(tmp_path / "unversioned.pt").schema_version == 1
    kept = load_model(tmp_path / "today.pt")
    assert (kept.schema_version, kept.level, kept.loss, kept.torch) == (2, 2, "supcon", "2.5.1")
    assert kept.extra == {"a_later_key": [1, 2]} and kept["a_later_key"] == [1, 2]
    save_model(kept, tmp_path / "again.pt")   # every key of the file survives a rewrite
    again = torch.load(tmp_path / "again.pt", weights_only=True)
    assert set(today) <= set(again) and again["a_later_key"] == [1, 2] and again["schema_version"] == MODEL_SCHEMA_VERSION

    torch.save({**today, "schema_version": MODEL_SCHEMA_VERSION + 1}, tmp_path / "newer.pt")
    with pytest.raises(WeightsUnavailable) as refused:
        load_model(tmp_path / "newer.pt")
    assert "\n" not in str(refused.value)
    assert f"schema version {MODEL_SCHEMA_VERSION + 1}" in str(refused.value)
    assert f"up to {MODEL_SCHEMA_VERSION}" in str(refused.value)


def test_an_evaluation_record_round_trips_through_its_dataclass_and_refuses_a_newer_one(tmp_path):
    rng = np.random.default_rng(0)
    metadata = pd.DataFrame({"id": [f"i{n}" for n in range(12)], "label": list("ab") * 6,
                             "split": ["gallery"] * 8 + ["query"] * 4})
    evaluation = evaluate_embeddings(rng.normal(size=(12, 4)).astype(np.float32), metadata, k=3)
    record = evaluation.to_record()
    assert record["schema_version"] == RECORD_SCHEMA_VERSION
    assert {"precision_at_k", "precision_at_k_ci", "map_at_k", "per_category", "bootstrap", "k"} <= set(record)
    skipped = [{"path": "x.jpg", "stage": "decode", "reason": "not an image"}]
    full = evaluation.record(measured={"backbone": "b", "k": 99}, skipped=skipped, versions={"numpy": "1"}).to_dict()
    assert full["k"] == 3 and full["backbone"] == "b"   # the protocol's own values win
    assert (full["n_skipped"], full["n_skipped_by_stage"], full["skipped"]) == (1, {"decode": 1}, skipped)
    path = tmp_path / "record.json"
    path.write_text(json.dumps(full))
    read = EvaluationRecord.read(path)
    assert read.to_dict() == full and read.means["precision_at_k"] == record["precision_at_k"]
    assert read.measured["backbone"] == "b" and read.intervals["map_at_k"] == record["map_at_k_ci"]
    unversioned = dict(record)
    del unversioned["schema_version"]
    assert EvaluationRecord.from_dict(unversioned, "old").schema_version == 1
    path.write_text(json.dumps({**full, "schema_version": RECORD_SCHEMA_VERSION + 1}))
    with pytest.raises(FashionRecError) as refused:
        EvaluationRecord.read(path)
    message = str(refused.value)
    assert "\n" not in message and str(path) in message
    assert f"schema version {RECORD_SCHEMA_VERSION + 1}" in message and f"up to {RECORD_SCHEMA_VERSION}" in message
