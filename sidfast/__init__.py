"""sidfast: fast Score identity Distillation (SiD) for PyTorch."""
from sidfast import _moved
from sidfast import predictions, reference, schedules
from sidfast.loss import (FakeScoreLoss, SiDGeneratorLoss, fake_score_loss, sid_generator_loss,
    sid_generator_loss_eps, sida_discriminator_loss, sida_generator_loss)
from sidfast.schedules import EDMSchedule, FlowSchedule, VPSchedule

__version__ = "0.1.0"
_moved.install()  # import sidfast.train etc. keep working after the move to packages
__all__ = ["predictions", "reference", "schedules", "sid_generator_loss", "sid_generator_loss_eps",
           "fake_score_loss", "sida_generator_loss", "sida_discriminator_loss", "SiDGeneratorLoss",
           "FakeScoreLoss", "EDMSchedule", "VPSchedule", "FlowSchedule"]
