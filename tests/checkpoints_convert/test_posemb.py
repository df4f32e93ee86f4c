"""posemb.py's resampling against torch's kernels (the ones HF and timm call) and closed forms."""
import numpy as np
import pytest

from vit_jax.checkpoints_convert import posemb

SIZES = [((4, 4), (6, 6)), ((4, 4), (6, 8)), ((7, 7), (3, 3)), ((5, 3), (2, 9)), ((24, 24), (7, 7))]


@pytest.mark.parametrize("old,new", SIZES)
@pytest.mark.parametrize("method,torch_kwargs", [
    ("bicubic", dict(mode="bicubic", align_corners=False)),  # HF interpolate_pos_encoding
    ("bicubic_antialias", dict(mode="bicubic", antialias=True)),  # timm resample_abs_pos_embed
    ("bilinear", dict(mode="bilinear", align_corners=True)),  # = scipy zoom(order=1)
])
def test_against_torch_interpolate(old, new, method, torch_kwargs):
  torch = pytest.importorskip("torch", reason="torch not installed (pip install .[test])")
  grid = np.random.default_rng(0).normal(size=old + (5,)).astype(np.float32)
  ref = torch.nn.functional.interpolate(
      torch.from_numpy(grid).permute(2, 0, 1)[None], size=new, **torch_kwargs)
  ref = ref[0].permute(1, 2, 0).numpy()
  np.testing.assert_allclose(posemb.resample_grid(grid, new, method), ref, atol=1e-5)


@pytest.mark.parametrize("method", posemb.METHODS)
def test_class_row_kept_and_linear_ramp_exact(method):
  """A ramp along rows and columns stays a ramp with upstream's corner-aligned zoom; every
  method keeps the prefix (class-token) row untouched and a constant grid constant."""
  rows, cols = np.mgrid[:4, :6].astype(np.float32)
  grid = np.stack([rows, cols, np.full_like(rows, 3.0)], -1)
  pe = np.concatenate([np.full((1, 1, 3), 7.0, np.float32), grid.reshape(1, 24, 3)], axis=1)
  out = posemb.resample_posemb(pe, num_prefix=1, old_grid=(4, 6), new_grid=(7, 11),
                               method=method)
  assert out.shape == (1, 1 + 77, 3) and out.dtype == np.float32
  np.testing.assert_array_equal(out[0, 0], [7.0, 7.0, 7.0])
  np.testing.assert_allclose(out[0, 1:, 2], 3.0, atol=1e-6)
  if method == "bilinear":
    new = out[0, 1:].reshape(7, 11, 3)
    np.testing.assert_allclose(new[:, 0, 0], np.linspace(0, 3, 7), atol=1e-6)
    np.testing.assert_allclose(new[0, :, 1], np.linspace(0, 5, 11), atol=1e-6)


def test_unknown_grid_and_method():
  with pytest.raises(ValueError, match="not a square number"):
    posemb.grid_from_tokens(24)
  with pytest.raises(ValueError, match="Unknown posemb resize method"):
    posemb.resample_grid(np.zeros((2, 2, 1)), (3, 3), "nearest")
