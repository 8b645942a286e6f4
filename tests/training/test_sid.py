"""sidfast.training.sid: the SiD phases' choice of noise source (kernel or torch) per route and option."""
import pytest
import torch

from sidfast.training.config import TrainConfig


def test_noise_option_picks_the_kernel_on_the_triton_route_only(monkeypatch):
    from sidfast.ops import backend
    from sidfast.training.sid import noise_source

    x = torch.zeros(2, 3)
    for triton_route in (True, False):
        monkeypatch.setattr(backend, "use_triton", lambda t, on=triton_route: on)
        assert noise_source("auto", x) == ("kernel" if triton_route else "torch")
        assert noise_source("kernel", x) == "kernel" and noise_source("torch", x) == "torch"
    assert TrainConfig().noise == "auto"
    with pytest.raises(ValueError, match="option noise must be one of auto, kernel, torch, got 'philox'"):
        TrainConfig(noise="philox").validate()
