"""The privacy check (paper C.8): image metrics, iDLG's label rule, the attack, the script."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from experiments import idlg


def test_psnr_and_ssim_on_known_cases():
    x = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert idlg.psnr(x, x) == float("inf")
    assert idlg.ssim(x, x) == pytest.approx(1.0)
    assert idlg.psnr(x, (x + 0.1).clamp(0, 1)) == pytest.approx(20.0, abs=0.6)  # mse ~ 0.01
    noisy = (x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    assert idlg.ssim(x, noisy) < idlg.ssim(x, (x + 0.05).clamp(0, 1)) < 1.0
    assert abs(idlg.ssim(x, torch.rand(3, 16, 16))) < 0.2  # unrelated images


@pytest.mark.parametrize("label", [0, 3])
def test_the_label_is_read_from_the_last_layer_gradient(label):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    grads = idlg.gradient(model, torch.rand(1, 1, 4, 4), torch.tensor([label]))
    assert idlg.infer_label([g.detach() for g in grads]) == label


def test_the_attack_recovers_an_image_from_a_plain_gradient():
    """On a softmax regression the gradient determines the input: the attack must find it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
    image = torch.rand(1, 1, 4, 4)
    target = [g.detach() for g in idlg.gradient(model, image, torch.tensor([2]))]
    recon, label, distance = idlg.reconstruct(model, target, (1, 4, 4), 400, seed=0)
    assert label == 2
    assert distance < 1e-6
    assert idlg.psnr(recon.clamp(0, 1), image[0]) > 35


def test_the_script_writes_its_table_and_picture(tiny_npz, tmp_path):
    out = tmp_path / "idlg"
    code = idlg.main(
        [
            "--data",
            f"npz:{tiny_npz}",
            "--num-clients",
            "2",
            "--iterations",
            "5",
            "--set",
            "data.classes_per_client=2",
            "--out",
            str(out),
        ]  # fmt: skip
    )
    assert code == 0
    report = json.loads((out / "idlg.json").read_text())
    targets = [r["target"] for r in report["results"]]
    assert targets == ["single-image gradient", "client delta after local training"]
    for r in report["results"]:
        assert r["psnr_db"] > 0 and -1 <= r["ssim"] <= 1
    assert (out / "idlg.png").stat().st_size > 1000
    assert "PSNR" in (out / "idlg.md").read_text()
