"""sidfast.training.conditioning: which teachers are text-conditioned."""
from types import SimpleNamespace

from sidfast.training.conditioning import text_conditioned


def test_text_conditioned_reads_the_networks_attention_width():
    def teacher(**config):
        return SimpleNamespace(network=SimpleNamespace(config=SimpleNamespace(**config)))

    assert text_conditioned(teacher(cross_attention_dim=768))
    assert text_conditioned(teacher(joint_attention_dim=4096))
    assert not text_conditioned(teacher(cross_attention_dim=None))
    assert not text_conditioned(SimpleNamespace())  # an EDM network: no diffusers config
