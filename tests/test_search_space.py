import pytest
import torch

from rarn.space.ops import OPS, PRIMITIVES, build_op, channel_shuffle


def test_primitives_follow_registry():
    assert PRIMITIVES == tuple(OPS)
    assert PRIMITIVES[0] == "none" and len(PRIMITIVES) == 8


@pytest.mark.parametrize("name", PRIMITIVES)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [8, 7])
def test_op_shape_and_grad(name, stride, size):
    torch.manual_seed(0)
    op = build_op(name, 4, stride, affine=True)
    x = torch.randn(2, 4, size, size, requires_grad=True)
    y = op(x)
    out = (size + stride - 1) // stride
    assert y.shape == (2, 4, out, out)
    y.square().sum().backward()
    if name != "none":
        assert x.grad is not None and torch.isfinite(x.grad).all()


def test_unknown_op():
    with pytest.raises(KeyError, match="known: none"):
        build_op("conv_9x9", 4, 1)


def test_channel_shuffle_is_a_permutation():
    x = torch.arange(8.0).view(1, 8, 1, 1)
    y = channel_shuffle(x, 4)
    assert sorted(y.flatten().tolist()) == list(range(8))
    assert y.flatten().tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
