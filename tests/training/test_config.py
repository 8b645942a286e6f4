"""sidfast.training.config: TrainConfig's published defaults, files and dicts, validation errors naming the
option, option names as the command line spells them."""
import json

import pytest

from runs import resolved

from sidfast.training.config import TrainConfig


def test_defaults_are_the_published_recipe():
    c = resolved(TrainConfig())  # an EDM teacher: SiD's recipe
    assert (c.lr, c.betas, c.optimizer_eps, c.sid_alpha, c.sigma_init, c.tmax) == (1e-5, (0.0, 0.999), 1e-8, 1.2, 2.5, 800)
    assert (c.loss_scale_g, c.loss_scale_fake, c.ema_halflife_kimg, c.ema_rampup_ratio) == (100.0, 1.0, 500.0, 0.05)
    assert (c.p_mean, c.p_std, c.sigma_data, c.sigma_min, c.sigma_max, c.rho) == (-1.2, 1.2, 0.5, 0.002, 80.0, 7.0)
    assert c.batch == 256 and c.precision == "fp32" and c.fake_lr is None
    assert TrainConfig(precision="fp16").optimizer_eps == 1e-6
    for f in TrainConfig.fields():
        assert f.metadata["help"] and "\n" not in f.metadata["help"], f.name


def test_config_from_yaml_json_and_dict(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("lr: 2.0e-5\nbatch: 64\nbetas: [0.1, 0.99]\nema-rampup-ratio: null\nimage_shape: [1, 8, 8]\n")
    c = TrainConfig.from_file(y)
    assert (c.lr, c.batch, c.betas, c.ema_rampup_ratio, c.image_shape) == (2e-5, 64, (0.1, 0.99), None, (1, 8, 8))
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"alpha": 1.0, "precision": "bf16", "progress": False}))
    c = TrainConfig.from_file(j, base=TrainConfig(batch=32))
    assert (c.alpha, c.precision, c.progress, c.batch) == (1.0, "bf16", False, 32)
    # strings as a command line gives them are coerced
    c = TrainConfig.from_dict({"iterations": "10", "lr": "3e-4", "fake_lr": "none", "betas": ["0", "0.9"]})
    assert (c.iterations, c.lr, c.fake_lr, c.betas) == (10, 3e-4, None, (0.0, 0.9))
    assert TrainConfig.from_dict({}).to_dict() == TrainConfig().to_dict()


@pytest.mark.parametrize("values, match", [
    ({"learning_rate": 1}, "unknown option 'learning_rate'"),
    ({"lr": 0}, "option lr must be > 0"),
    ({"lr": "fast"}, "option lr must be a number"),
    ({"tmax": 1001}, "option tmax must be <= 1000"),
    ({"lr_cooldown": 1.5}, "option lr_cooldown must be <= 1"),
    ({"lr_cooldown": -0.1}, "option lr_cooldown must be >= 0"),
    ({"batch": 2.5}, "option batch must be an integer"),
    ({"alpha": float("nan")}, "option alpha must be finite"),
    ({"betas": [0.9]}, "option betas must be two numbers"),
    ({"betas": [0.0, 1.0]}, "option betas must be two numbers in"),
    ({"precision": "fp8"}, "option precision must be one of"),
    ({"sigma_min": 100.0}, "sigma_min .* must be below option sigma_max"),
    ({"image_shape": [1, 0, 8]}, "option image_shape must be positive"),
    ({"log_every": 0}, "option log_every must be >= 1"),
    ({"progress": "maybe"}, "option progress must be true or false"),
])
def test_config_errors_name_the_option(values, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_dict(values)


def test_config_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TrainConfig.from_file(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [1, 2\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        TrainConfig.from_file(bad)
    bad = tmp_path / "bad.json"
    bad.write_text("{'lr': 1}")
    with pytest.raises(ValueError, match="not valid JSON"):
        TrainConfig.from_file(bad)
    other = tmp_path / "c.toml"
    other.write_text("lr = 1")
    with pytest.raises(ValueError, match="must end in .yaml, .yml or .json"):
        TrainConfig.from_file(other)
    listing = tmp_path / "l.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping of option names"):
        TrainConfig.from_file(listing)
    unknown = tmp_path / "u.json"
    unknown.write_text('{"lrr": 1}')
    with pytest.raises(ValueError, match=r"u\.json.*unknown option 'lrr'"):
        TrainConfig.from_file(unknown)


def test_option_names_match_the_command_line():
    from sidfast.cli import build_parser

    distill_parser = build_parser()._subparsers._group_actions[0].choices["distill"]
    flags = {s for action in distill_parser._actions for s in action.option_strings}
    assert TrainConfig.option("batch_gpu") == "--batch-gpu"
    for f in TrainConfig.fields():
        assert TrainConfig.option(f.name) in flags, f.name
    with pytest.raises(ValueError, match="no field 'batchgpu'"):
        TrainConfig.option("batchgpu")
