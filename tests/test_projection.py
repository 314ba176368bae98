"""The Rademacher projection on its own (no model): fast unit tier."""
import torch

from scoder_ray.influence.features import Projector


def test_signs_are_fair_and_independent_of_block_size_and_dtype():
    a = Projector(3000, 1000, run_seed=7, ckpt="ckpt_01", block_rows=1024).matrix()
    b = Projector(3000, 1000, run_seed=7, ckpt="ckpt_01", block_rows=2048, dtype=torch.bfloat16).matrix()
    assert a.shape == (3000, 1000) and torch.equal(a, b)  # dim not a multiple of 8: the tail is cut per chunk
    assert set(a.unique().tolist()) == {-1.0, 1.0}
    # 3M fair signs: the share of +1 has standard deviation 0.0003; 0.003 is 10 sigma.
    assert abs((a > 0).float().mean().item() - 0.5) < 0.003
    # Neighbouring signs (one byte gives 8) are uncorrelated: columns 0..7 against 1..8.
    corr = (a[:, :8] * a[:, 1:9]).mean(0)
    assert corr.abs().max().item() < 0.1  # standard deviation 1/sqrt(3000) = 0.018
    other = Projector(3000, 1000, run_seed=7, ckpt="ckpt_02", block_rows=1024).matrix()
    assert (a == other).float().mean().item() < 0.55  # another checkpoint, an independent matrix


def test_projection_preserves_inner_products():
    proj = Projector(4096, 8192, run_seed=0, ckpt="c", block_rows=4096)
    x = torch.randn(16, 4096)
    y = x + 0.5 * torch.randn(16, 4096)  # cosine ~0.9 with x
    px, py = proj.project(x), proj.project(y)
    exact = torch.nn.functional.cosine_similarity(x, y)
    projected = torch.nn.functional.cosine_similarity(px, py)
    assert (exact - projected).abs().max().item() < 0.03  # JL: error ~ 1/sqrt(d) = 0.011 per pair
    assert ((px.norm(dim=1) / x.norm(dim=1)) - 1).abs().max().item() < 0.05
