import pytest
import torch
from torch import nn

from unlearnkit.models import ARCHITECTURES, build_model, clone, fresh_copy, head_of, model_for


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_every_model_maps_uint8_images_to_logits(arch, shape):
    model = build_model(arch, shape, 7, mean=(0.5,) * shape[0], std=(0.25,) * shape[0], seed=0).eval()
    x = torch.randint(0, 256, (3, *shape), dtype=torch.uint8)
    assert model(x).shape == (3, 7)
    assert isinstance(head_of(model), nn.Linear)
    assert model.features(x).shape == (3, model.head.in_features)
    torch.testing.assert_close(model(x), model(x.float() / 255))


def test_resnet18_has_the_cifar_stem():
    model = build_model("resnet18", (3, 32, 32), 10, (0.5,) * 3, (0.25,) * 3)
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.kernel_size == (3, 3) and first_conv.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert 11_000_000 < sum(p.numel() for p in model.parameters()) < 11_300_000


def test_model_for_reads_the_dataset_and_seed_fixes_the_weights(data):
    a, b = model_for(data, "mlp", seed=1), model_for(data, "mlp", seed=1)
    assert a.head.out_features == data.num_classes
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    c = fresh_copy(a, seed=2)
    assert c.config == a.config and not torch.equal(c.head.weight, a.head.weight)
    d = clone(a)
    d.head.weight.data.zero_()
    assert a.head.weight.abs().sum() > 0


def test_a_model_without_a_head_gets_a_clear_error():
    with pytest.raises(TypeError, match="no final linear layer"):
        head_of(nn.Sequential(nn.Linear(3, 2)))
    headed = nn.Module()
    headed.head = nn.Linear(3, 2)  # a head, but no features(x) to feed it
    with pytest.raises(TypeError, match="fed by `.features"):
        head_of(headed)
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model("vit", (1, 28, 28), 10, (0.5,), (0.2,))
