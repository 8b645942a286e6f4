"""sidfast.models.views: frozen views sharing a module's storage, storage comparisons."""
import pytest
import torch
from torch import nn

from sidfast.models.views import frozen_view, same_storage, shares_storage
from utils import SmallUNet, assert_float64_close as _close

F64 = torch.float64


def test_frozen_view_shares_storage_and_gives_input_gradients_only():
    torch.manual_seed(0)
    net = SmallUNet().to(F64)
    view = frozen_view(net)
    assert shares_storage(view, net)
    assert all(not p.requires_grad for p in view.parameters())
    assert all(p.requires_grad for p in net.parameters())
    assert all(isinstance(p, nn.Parameter) for p in view.parameters())
    x = torch.randn(2, 3, 8, 8, dtype=F64)
    sigma = torch.tensor([0.5, 3.0], dtype=F64)
    xr = x.clone().requires_grad_()
    (g_ref,) = torch.autograd.grad(net(xr, sigma).square().sum(), xr)
    xv = x.clone().requires_grad_()
    view(xv, sigma).square().sum().backward()
    _close(xv.grad, g_ref)  # conv backward without the weight gradient may pick another kernel
    assert all(p.grad is None for p in view.parameters()) and all(p.grad is None for p in net.parameters())
    before = view(x, sigma)
    with torch.no_grad():  # an optimizer's in-place step is seen by the view
        for p in net.parameters():
            p.mul_(0.9).add_(0.01)
    after = view(x, sigma)
    _close(after, net(x, sigma))
    assert not torch.allclose(after, before, atol=1e-4)


def test_frozen_view_shares_buffers_and_detects_replaced_storage():
    net = nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2))
    view = frozen_view(net)
    assert view[1].running_mean is net[1].running_mean
    net[0].weight.data = net[0].weight.data.clone()
    assert not shares_storage(view, net)
    w = net[0].weight
    assert same_storage([w], [w]) and not same_storage([w], [w.view(-1)]) and not same_storage([w], [])
    with pytest.raises(TypeError):
        frozen_view(lambda x: x)
