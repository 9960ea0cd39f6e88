import warnings

import pytest
import torch

from unlearnkit.evaluate import accuracy
from unlearnkit.train import Recipe, batches, cache_dir, fit, flip_crop, load_checkpoint, save_checkpoint

RECIPE = Recipe(epochs=3, batch_size=128, lr=0.05)


def test_training_learns_and_is_reproducible_on_cpu(data, small_split):
    a, seconds = fit(data, small_split.train, RECIPE, seed=0, cache=False, progress=False)
    b, _ = fit(data, small_split.train, RECIPE, seed=0, cache=False, progress=False)
    assert seconds > 0
    assert accuracy(a, data, small_split.test) > 0.7
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_cache_returns_the_same_model_and_its_recorded_seconds(data, small_split):
    a, seconds_a = fit(data, small_split.train, RECIPE, seed=0, progress=False)
    files = list(cache_dir().glob("*.pt"))
    assert len(files) == 1
    b, seconds_b = fit(data, small_split.train, RECIPE, seed=0, progress=False)
    assert seconds_a == seconds_b
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    fit(data, small_split.retain, RECIPE, seed=0, progress=False)  # other indices: another entry
    fit(data, small_split.train, RECIPE.with_(epochs=2), seed=0, progress=False)  # other recipe: another entry
    assert len(list(cache_dir().glob("*.pt"))) == 3


def test_a_corrupted_cache_file_is_rebuilt_not_trusted(data, small_split):
    a, _ = fit(data, small_split.train, RECIPE, seed=0, progress=False)
    (path,) = cache_dir().glob("*.pt")
    path.write_bytes(b"this is not a checkpoint")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        b, _ = fit(data, small_split.train, RECIPE, seed=0, progress=False)
    assert any("unreadable cached model" in str(w.message) for w in caught)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert load_checkpoint(path)["state_dict"].keys() == a.state_dict().keys()


def test_checkpoints_refuse_pickled_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"payload": print}, path)  # a function, not weights
    with pytest.raises(Exception, match="[Ww]eights only"):
        load_checkpoint(path)
    save_checkpoint(tmp_path / "ok.pt", {"w": torch.ones(2), "seconds": 1.5})
    assert load_checkpoint(tmp_path / "ok.pt")["seconds"] == 1.5
    assert not list(tmp_path.glob("*.tmp"))


def test_batches_cover_every_index_once_and_drop_a_lone_last_sample():
    idx = torch.arange(10)
    got = torch.cat(list(batches(idx, 3, torch.Generator().manual_seed(0))))
    assert len(got) == 9 and got.unique().numel() == 9  # 3+3+3, the lone tenth dropped
    assert len(torch.cat(list(batches(torch.arange(9), 4, shuffle=False)))) == 8
    assert len(torch.cat(list(batches(torch.arange(10), 4, shuffle=False)))) == 10


def test_a_batch_wide_crop_shifts_every_image_by_one_offset():
    x = torch.randint(1, 256, (8, 3, 32, 32), dtype=torch.uint8)  # no zero pixel: padding shows
    y = flip_crop(x, torch.Generator().manual_seed(0), per_sample=False)
    assert y.shape == x.shape and y.dtype == x.dtype
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    fits = []
    for i in range(len(x)):
        fits.append({(dy, dx) for dy in range(9) for dx in range(9) for image in (padded[i], padded[i].flip(-1))
                     if torch.equal(image[:, dy:dy + 32, dx:dx + 32], y[i])})
        assert fits[-1], f"image {i} is not a flipped or unflipped crop of its padded input"
    assert set.intersection(*fits), f"no one offset fits every image: {fits}"


def test_divergence_is_reported_with_the_step_size(data, small_split):
    with pytest.raises(FloatingPointError, match="lr=1e\\+06"):
        fit(data, small_split.train, Recipe(epochs=1, lr=1e6, schedule="constant"), cache=False, progress=False)


def test_fit_whitens_a_fast_nets_stem_from_its_own_training_images_only():
    from unlearnkit.data import ImageDataset
    from unlearnkit.models import model_for, whiten_stem

    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=generator)
    data = ImageDataset("tiny", images, torch.randint(0, 2, (64,), generator=generator), 48, ("a", "b"),
                        (0.5,) * 3, (0.25,) * 3)
    retain = torch.arange(0, 40)
    recipe = Recipe(epochs=1, batch_size=16, lr=0.01)
    model, _ = fit(data, retain, recipe, arch="fastnet", seed=0, widths=(8, 8, 8), progress=False)
    stem = model.backbone[1]
    assert not stem.weight.requires_grad
    # the whitening of the retain images alone: the eight held-back training images do not shape it
    expected = whiten_stem(model_for(data, "fastnet", seed=0, widths=(8, 8, 8)), images[retain]).backbone[1]
    torch.testing.assert_close(stem.weight, expected.weight)
    others = whiten_stem(model_for(data, "fastnet", seed=0, widths=(8, 8, 8)), images[:48]).backbone[1]
    assert not torch.allclose(stem.weight, others.weight)
    # frozen, so training left it exactly where the whitening put it, and a cached copy is frozen too
    cached, _ = fit(data, retain, recipe, arch="fastnet", seed=0, widths=(8, 8, 8), progress=False)
    assert not cached.backbone[1].weight.requires_grad
    torch.testing.assert_close(cached.backbone[1].weight, stem.weight)
