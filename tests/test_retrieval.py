"""Retrieval recall@1/5/10, image to text and text to image, against a brute-force ranking."""
import pytest
import torch

import evaluate


def test_retrieval_metrics_against_brute_force():
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(30, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(img + 0.8 * torch.randn(30, 8, generator=g), dim=-1)
    got = evaluate.retrieval_metrics(img, txt)
    sims = (img @ txt.T).tolist()
    for k in (1, 5, 10):
        i2t = sum(sorted(range(30), key=lambda j: -sims[i][j]).index(i) < k for i in range(30)) / 30
        t2i = sum(sorted(range(30), key=lambda j: -sims[j][i]).index(i) < k for i in range(30)) / 30
        assert got[f'i2t_R@{k}'] == pytest.approx(100 * i2t) and got[f't2i_R@{k}'] == pytest.approx(100 * t2i)
