"""sidfast.training.networks: the run's networks built from the teacher (frozen teacher, trainable copies, the
EMA a frozen copy of the generator), and the EMA copy of a LoRA generator sharing its frozen base."""
import torch

from nets import tiny_teacher
from runs import quiet
from sidfast.training.networks import build_networks, ema_copy


def _storages(net):
    return {p.data_ptr() for p in net.parameters()}


def test_build_networks_copies_the_teacher_into_trainable_networks_and_freezes_the_ema():
    teacher = tiny_teacher()
    nets = build_networks(quiet(), teacher, None, None, torch.device("cpu"))
    assert not any(p.requires_grad for p in nets.teacher.parameters())
    for net in (nets.generator, nets.fake):
        assert all(p.requires_grad for p in net.parameters())
        assert not _storages(net) & _storages(nets.teacher)  # copies, not views of the teacher
        for a, b in zip(net.state_dict().values(), nets.teacher.state_dict().values()):
            assert torch.equal(a, b)  # starting from the teacher's weights
    assert not _storages(nets.generator) & _storages(nets.fake)
    assert not any(p.requires_grad for p in nets.generator_ema.parameters()) and not nets.generator_ema.training
    assert nets.image_shape == (1, 4, 4) and nets.num_classes == 0
    assert nets.trainable(nets.generator) == list(nets.generator.parameters())


def test_ema_copy_of_a_lora_generator_shares_the_base_and_copies_the_factors():
    nets = build_networks(quiet(generator="lora", lora_rank=2), tiny_teacher(), None, None, torch.device("cpu"))
    ema = ema_copy(nets.generator)
    trainable = {p.data_ptr() for p in nets.generator.parameters() if p.requires_grad}
    frozen = {p.data_ptr() for p in nets.generator.parameters() if not p.requires_grad}
    assert trainable and frozen
    assert frozen <= _storages(ema) and not trainable & _storages(ema)
