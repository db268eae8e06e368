import pytest
import torch

from rrt_ray.convert.svd import relative_error, truncated_svd


def test_error_falls_as_rank_grows_and_vanishes_at_full_rank():
    m = torch.randn(96, 64) @ torch.diag(torch.logspace(0, -2, 64))
    errors = [relative_error(m, *truncated_svd(m, r)) for r in (2, 8, 32, 64)]
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 1e-5


def test_randomized_path_is_near_the_optimal_error():
    """Low ranks use a randomized SVD; on a decaying spectrum it must match the full SVD closely."""
    m = torch.randn(300, 200) @ torch.diag(torch.logspace(0, -3, 200)) @ torch.linalg.qr(torch.randn(200, 200))[0]
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    rank = 16  # below FULL_SVD_FRACTION * 200: randomized
    optimal = relative_error(m, u[:, :rank] * s[:rank], vh[:rank])
    assert relative_error(m, *truncated_svd(m, rank)) < optimal * 1.01


def test_rank_outside_the_matrix_is_rejected():
    with pytest.raises(ValueError, match="outside 1..8 for a 8x16 matrix"):
        truncated_svd(torch.randn(8, 16), 9)
