"""Distillation: relational losses, a reproducible student, its ONNX query path, a missing teacher refused."""
from __future__ import annotations

import json
import socket

import numpy as np
import pytest
import torch

from conftest import write_color_image
from fashionrec import config
from fashionrec.cli import main
from fashionrec.experiment.distil import distil_student
from fashionrec.data.prepared import prepare
from fashionrec.models.finetuned import load_model, parameters_sha256
from fashionrec.pipeline.stages import run_dir, stage_distil, stage_prepare
from fashionrec.serving.build import build_index_folder
from fashionrec.settings import InferenceSettings
from fashionrec.training.distil import DistilConfig, RelationalLoss, pkt, rkd_angle, rkd_distance
from fashionrec.training.finetune import FinetuneConfig
from fashionrec.training.heads import HeadConfig
from fashionrec.training.trunk import BackboneTuneConfig

QUIET = InferenceSettings(batch_size=16, workers=0, progress=False)
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 210)}


# --- relational losses ------------------------------------------------------------------------------------------


def _points(n=12, dim=6, seed=0) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_relational_losses_vanish_when_the_student_has_the_teachers_geometry():
    teacher = _points()
    rotation, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(1)))
    same_geometry = teacher @ rotation            # distances and angles kept, coordinates changed
    other = _points(seed=2)
    for loss in (rkd_distance, rkd_angle, pkt):
        assert float(loss(same_geometry, teacher)) == pytest.approx(0.0, abs=1e-6)
        assert float(loss(other, teacher)) > 1e-3
    # Distances are compared relative to their mean: a scaled copy has the same geometry.
    assert float(rkd_distance(3.0 * same_geometry, teacher)) == pytest.approx(0.0, abs=1e-6)


def test_relational_loss_takes_the_teacher_rows_of_the_batch_and_its_gradient_moves_the_student():
    teacher = torch.randn(20, 9, generator=torch.Generator().manual_seed(3))
    loss = RelationalLoss(teacher.numpy(), "rkd", weight=2.0)
    rows = np.array([4, 7, 1, 15, 9])
    student = torch.nn.functional.normalize(teacher[rows, :6], dim=1).clone().requires_grad_(True)
    value = loss(student, rows)
    expected = 2.0 * (rkd_distance(student, torch.nn.functional.normalize(teacher[rows], dim=1))
                      + 2.0 * rkd_angle(student, torch.nn.functional.normalize(teacher[rows], dim=1)))
    assert float(value.detach()) == pytest.approx(float(expected.detach()), rel=1e-6) and float(value.detach()) > 0
    value.backward()
    assert student.grad is not None and float(student.grad.abs().sum()) > 0
    assert float(RelationalLoss(teacher.numpy(), "pkt", weight=0.0)(student, rows).detach()) == 0.0
    with pytest.raises(ValueError, match="unknown relational loss"):
        RelationalLoss(teacher.numpy(), "mse")


def test_distil_config_refuses_what_it_cannot_train():
    with pytest.raises(ValueError, match="level must be 2"):
        DistilConfig(finetune=FinetuneConfig(level=1))
    with pytest.raises(ValueError, match="relational"):
        DistilConfig(relational=("l2",))
    with pytest.raises(ValueError, match="weights"):
        DistilConfig(weights=(-1.0,))
    assert [c["weight"] for c in DistilConfig(weights=(1.0, 4.0), trainable_blocks=(1, 2)).candidates()] == [1, 4, 1, 4]


# --- a student distilled on a small generated catalog -----------------------------------------------------------

SMALL = DistilConfig(
    finetune=FinetuneConfig(level=2, losses=("norm_softmax",),
                            head=HeadConfig(hidden_dim=16, out_dim=8, epochs=4, patience=4, batch_size=8, k=3,
                                            classifier_views=()),
                            tune=BackboneTuneConfig(trainable_blocks=1, n_views=1, epochs=2, patience=10,
                                                    batch_size=8)),
    weights=(1.0,), trainable_blocks=(1,))


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    root = tmp_path_factory.mktemp("distil") / "shop"
    for label, colour in COLOURS.items():
        for i in range(10):
            write_color_image(root / label / f"{label}-{i}.jpg", colour, size=(56, 72))
    return root


@pytest.mark.integration
def test_a_student_is_reproducible_from_its_seed_and_serves_through_its_onnx_query_path(shop, tmp_path, capsys):
    prepared = prepare("folder", shop, progress=False)
    first = distil_student(prepared, "efficientnet_lite1", "efficientnet_lite0", SMALL, k=3, settings=QUIET,
                           run="student")
    record = first.record
    for key in ("precision_at_k", "precision_at_k_ci", "category_accuracy", "teacher", "student", "model_file",
                "backbone", "choices", "train_seconds", "skipped"):
        assert key in record
    assert record["backbone"] == "efficientnet_lite0+head:student" and record["student"] == "efficientnet_lite0"
    assert record["teacher"]["name"] == "efficientnet_lite1" and 0 <= record["teacher"]["precision_at_k"] <= 1
    assert record["losses"]["relational"]["kind"] == "rkd" and record["choices"]["candidates"][0]["chosen"]
    assert set(record["precision_at_k_gains"]) == {"over_own_head", "over_own_head_by_similarity", "to_teacher"}
    assert "precision_at_k" in record["references"]["head"]["with_its_category_boost"]
    assert json.loads((config.RESULTS_DIR / "student" / "distil.json").read_text())["backbone"] == record["backbone"]
    payload = load_model(record["model_file"])
    assert payload["level"] == 2 and payload["trunk_state_dict"] and payload["distillation"]["student"] == \
        "efficientnet_lite0"

    code = main(["evaluate", "--dataset", "folder", "--data-dir", str(shop), "--backbone", record["backbone"], "--k",
                 "3", "--json", "--quiet", "--workers", "0"])
    evaluated = json.loads(capsys.readouterr().out)
    assert code == 0
    gains = evaluated["distillation"]["precision_at_k_gains"]
    assert set(gains) == {"over_own_head", "to_teacher"} and gains["to_teacher"]["reference"] == "efficientnet_lite1"
    assert all(gain["low"] <= gain["diff"] <= gain["high"] for gain in gains.values())

    again = distil_student(prepared, "efficientnet_lite1", "efficientnet_lite0", SMALL, k=3, settings=QUIET,
                           retrain=True)
    assert not again.reused
    assert parameters_sha256(again.payload) == parameters_sha256(payload)
    assert again.record["precision_at_k"] == record["precision_at_k"]

    catalog = prepared.catalog[prepared.catalog["split"] != "train"].reset_index(drop=True)
    built = build_index_folder(tmp_path / "index", catalog, record["backbone"], settings=QUIET)
    check = built.manifest.query_model["check"]
    assert check["images"] > 0 and check["max_relative_difference"] <= 1e-4


# --- refusals ---------------------------------------------------------------------------------------------------


@pytest.fixture
def no_downloadable_weights(monkeypatch, tmp_path):
    """No network and empty weight locations: a torchvision backbone's weights are not on this machine."""
    def refuse(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "network disabled by the test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(config, "WEIGHTS_DIR", tmp_path / "weights")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))


def test_a_teacher_that_is_not_on_the_machine_is_refused_in_one_line(shop, no_downloadable_weights, capsys):
    code = main(["distil", "--dataset", "folder", "--data-dir", str(shop), "--teacher", "resnet50", "--json",
                 "--quiet"])
    captured = capsys.readouterr()
    assert code == 3 and "{" not in captured.out   # no result; torch's own download attempt may print a line
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "resnet50" in lines[0]
    assert not list(config.INTERIM_DIR.glob("embeddings/resnet50*"))   # refused before anything was embedded


def test_a_student_outside_the_lite_family_is_refused(shop, capsys):
    with pytest.raises(SystemExit) as refused:   # argparse's own refusal of a choice
        main(["distil", "--dataset", "folder", "--data-dir", str(shop), "--teacher", "efficientnet_lite1",
              "--student", "resnet50", "--quiet"])
    assert refused.value.code == 2
    assert "efficientnet_lite0" in capsys.readouterr().err


@pytest.mark.integration
def test_the_pipeline_stage_writes_the_student_its_tables_and_the_quality_cost_columns(shop):
    stage_prepare("distil-stage", "folder", shop, progress=False)
    result, table = stage_distil("distil-stage", "efficientnet_lite1", k=3, relational_weights=[1.0], cost_images=4,
                                 progress=False)
    out = run_dir("distil-stage")
    assert load_model(out / "student.pt")["distillation"]["teacher"]["name"] == "efficientnet_lite1"
    assert list(table["model"]) == ["efficientnet_lite0 (frozen)", "efficientnet_lite0 + head (--finetune)",
                                    "teacher: efficientnet_lite1", "student: efficientnet_lite0 distilled"]
    assert (table["ms_per_image"] > 0).all() and (table["precision_at_k_low"] <= table["precision_at_k"]).all()
    assert json.loads((out / "distil_metrics.json").read_text())["served_name"].endswith("student.pt")
    assert len(json.loads((out / "distil_metrics.json").read_text())["choices"]["candidates"]) == 1
