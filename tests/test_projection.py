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


def test_the_sketched_map_is_one_fixed_matrix_and_keeps_cosines():
    # A CountSketch of 200K coordinates into 16K buckets, then the dense 16K x 2048 Rademacher.
    proj = Projector(200_000, 2048, run_seed=3, ckpt="ckpt_01", block_rows=4096, sketch_dim=16_384)
    assert proj.sketch_dim == 16_384 and proj.rows == 16_384
    x = torch.randn(6, 200_000)
    # The same linear map as its materialised matrix, and the same on another actor with other block sizes.
    m = proj.matrix()
    assert m.shape == (200_000, 2048) and set(m[:1000].unique().tolist()) == {-1.0, 1.0}
    assert torch.allclose(proj.project(x), x @ m / 2048 ** 0.5, atol=1e-3, rtol=1e-4)
    other = Projector(200_000, 2048, run_seed=3, ckpt="ckpt_01", block_rows=1024, sketch_dim=16_384)
    other.SKETCH_COLUMNS = 50_000  # hashed in other pieces: the same buckets, sums in another order
    assert torch.allclose(other.project(x), proj.project(x), rtol=1e-5, atol=1e-4)
    assert not torch.equal(Projector(200_000, 2048, run_seed=3, ckpt="ckpt_02", block_rows=4096,
                                     sketch_dim=16_384).project(x), proj.project(x))
    # Buckets are used evenly (each gets ~12.2 coordinates) and signs are fair.
    _, bucket, sign = proj.sketch_parts()[0]
    counts = torch.bincount(bucket, minlength=16_384).float()
    assert counts.min() > 0 and counts.max() < 40 and abs(sign.mean().item()) < 0.01
    # Cosines survive both stages: error ~ sqrt(1/d + 1/m) per pair.
    y = x + 0.7 * torch.randn(6, 200_000)
    exact = torch.nn.functional.cosine_similarity(x, y)
    projected = torch.nn.functional.cosine_similarity(proj.project(x), proj.project(y))
    assert (exact - projected).abs().max().item() < 0.06
    # Small inputs keep the plain dense map (the tiny model's adapters: nothing changes for them).
    assert Projector(4096, 1024, run_seed=3, ckpt="c", block_rows=4096, sketch_dim=16_384).sketch_dim == 0
