"""sidfast.models.text and the text-conditioned teachers: prompts, TextConditioner, SD/SDXL UNets, SD3/FLUX transformers."""
import json
import shutil

import pytest
import torch

from sidfast import predictions
from sidfast.models.io import CheckpointError
from sidfast.models.loading import load_teacher
from sidfast.models.denoiser import (DiffusersDenoiser, FlowDenoiser, latent_image_ids, pack_latents,
    unpack_latents)
from sidfast.schedules import VPSchedule
from sidfast.models.text import TextConditioner, draw_prompts, read_prompts

from nets import (clip_encoder, clip_tokenizer, cond_unet, conditioner, flux_transformer, sd3_transformer, t5_encoder,
                  t5_tokenizer, tiny_vae)
from utils import float64_network_tolerance, run_main

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

F64 = torch.float64


# ---------- tiny components ----------



# ---------- prompts ----------

def test_read_prompts_skips_blank_lines_and_strips(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a red cat\n\n  a dog  \n\t\nlast without newline", encoding="utf-8")
    assert read_prompts(f) == ["a red cat", "a dog", "last without newline"]


def test_read_prompts_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_prompts(tmp_path / "none.txt")
    with pytest.raises(FileNotFoundError, match="directory"):
        read_prompts(tmp_path)
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="no prompt"):
        read_prompts(tmp_path / "empty.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="UTF-8"):
        read_prompts(tmp_path / "bin.txt")


def test_draw_prompts_is_seeded_and_uniform_over_the_list():
    prompts = ["a", "b", "c"]
    first = draw_prompts(prompts, 300, torch.Generator().manual_seed(0))
    assert first == draw_prompts(prompts, 300, torch.Generator().manual_seed(0))
    assert set(first) == set(prompts)
    with pytest.raises(ValueError, match="no prompts"):
        draw_prompts([], 2)


# ---------- TextConditioner ----------

@pytest.mark.parametrize("kind,shapes", [
    ("sd", {"encoder_hidden_states": (3, 8, 8)}),
    ("sdxl", {"encoder_hidden_states": (3, 8, 16), "text_embeds": (3, 8), "time_ids": (3, 6)}),
    ("sd3", {"encoder_hidden_states": (3, 8 + 6, 16), "pooled_projections": (3, 16)}),
    ("flux", {"encoder_hidden_states": (3, 6, 16), "pooled_projections": (3, 8)}),
])
def test_conditioner_shapes_dtype_and_null(kind, shapes):
    cond = conditioner(kind, dtype=torch.float32)
    out = cond.condition(["a cat", "a dog", "a cat"])
    flat = dict(out, **out.pop("added_cond_kwargs", {}))
    flat.pop("added_cond_kwargs", None)
    assert {k: tuple(v.shape) for k, v in flat.items()} == shapes
    assert all(v.dtype == torch.float32 for v in flat.values())
    torch.testing.assert_close(flat["encoder_hidden_states"][0], flat["encoder_hidden_states"][2], rtol=0, atol=0)
    assert not torch.equal(flat["encoder_hidden_states"][0], flat["encoder_hidden_states"][1])
    null = cond.null_condition(3)
    null = dict(null, **null.pop("added_cond_kwargs", {}))
    assert {k: tuple(v.shape) for k, v in null.items()} == shapes
    assert not torch.equal(null["encoder_hidden_states"], flat["encoder_hidden_states"])


def test_conditioner_sd_is_clip_last_layer_and_caches_by_prompt():
    cond = conditioner("sd", cache_size=2)
    tok, enc = cond.tokenizers[0], cond.encoders[0]
    ids = tok(["a cat"], padding="max_length", max_length=8, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = enc(ids).last_hidden_state
    first = cond.condition(["a cat", "a cat"])["encoder_hidden_states"]
    assert cond.encoded == 1  # a prompt repeated within a batch is encoded once
    torch.testing.assert_close(first[1], ref[0], rtol=0, atol=0)
    cond.condition(["a cat", "a dog"])
    assert cond.encoded == 2  # "a cat" came from the cache
    cond.condition(["an owl"])  # evicts "a cat" (least recently used of two)
    cond.condition(["a dog", "a cat"])
    assert cond.encoded == 4
    again = cond.condition(["a cat"])["encoder_hidden_states"]
    torch.testing.assert_close(again[0], ref[0], rtol=0, atol=0)
    uncached = conditioner("sd", cache_size=0)
    uncached.condition(["a cat"])
    uncached.condition(["a cat"])
    assert uncached.encoded == 2


def test_conditioner_sdxl_recipe_and_zero_null():
    cond = conditioner("sdxl", zero_null=True)
    out = cond.condition(["a cat"])
    with torch.no_grad():
        ids = cond.tokenizers[0](["a cat"], padding="max_length", max_length=8, return_tensors="pt").input_ids
        hidden_l = cond.encoders[0](ids, output_hidden_states=True).hidden_states[-2]
        out_g = cond.encoders[1](ids, output_hidden_states=True)
    # the same encoders on the same tokens: the conditioner's recipe, bit for bit
    torch.testing.assert_close(out["encoder_hidden_states"], torch.cat([hidden_l, out_g.hidden_states[-2]], -1),
                               rtol=0, atol=0)
    torch.testing.assert_close(out["added_cond_kwargs"]["text_embeds"], out_g.text_embeds, rtol=0, atol=0)
    assert out["added_cond_kwargs"]["time_ids"].tolist() == [[64, 48, 0, 0, 64, 48]]
    null = cond.null_condition(2)
    assert not null["encoder_hidden_states"].any() and not null["added_cond_kwargs"]["text_embeds"].any()
    assert null["added_cond_kwargs"]["time_ids"].tolist() == [[64, 48, 0, 0, 64, 48]] * 2


def test_conditioner_sd3_without_t5_uses_zeros():
    cond = TextConditioner("sd3", [clip_tokenizer()] * 2 + [None],
                           [clip_encoder(8, True), clip_encoder(8, True, seed=2), None], t5_length=5,
                           joint_attention_dim=16)
    states = cond.condition(["a cat"])["encoder_hidden_states"]
    assert states.shape == (1, 8 + 5, 16)
    assert not states[:, 8:].any() and not states[:, :8, 16:].any()


def test_conditioner_errors():
    with pytest.raises(ValueError, match="kind"):
        TextConditioner("sd9", [], [])
    with pytest.raises(ValueError, match="2 tokenizer"):
        TextConditioner("flux", [clip_tokenizer()], [clip_encoder(8)])
    with pytest.raises(ValueError, match="needs text encoder 2"):
        TextConditioner("flux", [clip_tokenizer(), None], [clip_encoder(8), None])
    with pytest.raises(ValueError, match="image_size"):
        TextConditioner("sdxl", [clip_tokenizer()] * 2, [clip_encoder(8), clip_encoder(8, True)])
    with pytest.raises(ValueError, match="joint_attention_dim"):
        TextConditioner("sd3", [clip_tokenizer()] * 2 + [None], [clip_encoder(8, True)] * 2 + [None])
    cond = conditioner("sd")
    with pytest.raises(TypeError, match="list"):
        cond.condition("a cat")
    with pytest.raises(ValueError, match="non-empty"):
        cond.condition([])
    assert not any(p.requires_grad for p in cond.encoders[0].parameters())


# ---------- the adapters on text-conditioned teachers ----------

SIGMA = torch.tensor([0.3, 4.0], dtype=F64)


def vp_reference(unet, den, x, sigma, prediction, **cond):
    a = torch.rsqrt(1 + sigma ** 2)
    x_vp = a.reshape(-1, 1, 1, 1) * x
    raw = unet(x_vp, den.timesteps(sigma), **cond).sample
    return predictions.to_x0(raw, x_vp, a, a * sigma, prediction)


def flow_reference(raw, x, sigma):
    t = sigma / (1 + sigma)
    x_flow = x / (1 + sigma).reshape(-1, 1, 1, 1)
    return x_flow - t.reshape(-1, 1, 1, 1) * raw


@pytest.mark.parametrize("kind,prediction", [("sd", "epsilon"), ("sd", "v_prediction"), ("sdxl", "epsilon")])
def test_unet_teacher_with_prompts_equals_the_manual_conversion(kind, prediction):
    unet = cond_unet(sdxl=kind == "sdxl")
    den = DiffusersDenoiser(unet, VPSchedule.linear(), prediction)
    text = conditioner(kind, dtype=F64)
    x = torch.randn(2, 4, 8, 8, dtype=F64)
    cond = text.condition(["a cat", "a dog"])
    with torch.no_grad():
        out = den(x, SIGMA, **cond)
        ref = vp_reference(unet, den, x, SIGMA, prediction, **cond)
        null = den(x, SIGMA, **text.null_condition(2))
    torch.testing.assert_close(out, ref, **float64_network_tolerance(ref))
    assert out.shape == x.shape and not torch.allclose(out, null)
    with pytest.raises(ValueError, match="text-conditioned.*empty prompt"):
        den.null_condition(2)


def test_sd3_teacher_equals_the_manual_conversion():
    model = sd3_transformer()
    den = FlowDenoiser(model)
    text = conditioner("sd3", dtype=F64)
    x = torch.randn(2, 4, 8, 8, dtype=F64)
    cond = text.condition(["a cat", "a dog"])
    with torch.no_grad():
        out = den(x, SIGMA, **cond)
        t = SIGMA / (1 + SIGMA)
        raw = model(x / (1 + SIGMA).reshape(-1, 1, 1, 1), timestep=1000 * t, **cond).sample  # SD3: sigma * 1000
        null = den(x, SIGMA, **text.null_condition(2))
    ref = flow_reference(raw, x, SIGMA)
    torch.testing.assert_close(out, ref, **float64_network_tolerance(ref))
    assert not torch.allclose(out, null)


@pytest.mark.parametrize("guidance_embeds", [True, False])
def test_flux_teacher_packs_and_equals_the_manual_conversion(guidance_embeds):
    model = flux_transformer(guidance_embeds)
    den = FlowDenoiser(model, guidance=3.5 if guidance_embeds else None)
    text = conditioner("flux", dtype=F64)
    x = torch.randn(2, 4, 6, 8, dtype=F64)
    cond = text.condition(["a cat", "a dog"])
    t = SIGMA / (1 + SIGMA)
    x_flow = x / (1 + SIGMA).reshape(-1, 1, 1, 1)
    # the pipeline's own packing and ids (FluxPipeline._pack_latents, _prepare_latent_image_ids)
    packed = diffusers.FluxPipeline._pack_latents(x_flow, 2, 4, 6, 8)
    img_ids = diffusers.FluxPipeline._prepare_latent_image_ids(2, 3, 4, x.device, F64)
    extra = {"guidance": torch.full((2,), 3.5)} if guidance_embeds else {}
    with torch.no_grad():
        out = den(x, SIGMA, **cond)
        raw = model(packed, timestep=t, img_ids=img_ids, txt_ids=torch.zeros(6, 3, dtype=F64), **cond,
                    **extra).sample  # FLUX: sigma, scaled by 1000 inside the model
        null = den(x, SIGMA, **text.null_condition(2))
    raw = diffusers.FluxPipeline._unpack_latents(raw, 6 * 8, 8 * 8, 8)
    ref = flow_reference(raw, x, SIGMA)
    torch.testing.assert_close(out, ref, **float64_network_tolerance(ref))
    assert out.shape == x.shape and not torch.allclose(out, null)


def test_flux_packing_round_trips_exactly_and_matches_the_pipeline():
    x = torch.randn(3, 5, 4, 6)
    packed = pack_latents(x)
    assert torch.equal(packed, diffusers.FluxPipeline._pack_latents(x, 3, 5, 4, 6))
    assert torch.equal(unpack_latents(packed, 4, 6), x)
    assert torch.equal(latent_image_ids(4, 6, "cpu", torch.float32),
                       diffusers.FluxPipeline._prepare_latent_image_ids(3, 2, 3, "cpu", torch.float32))
    with pytest.raises(ValueError, match="even"):
        pack_latents(torch.zeros(1, 2, 3, 4))
    with pytest.raises(ValueError, match="unpack"):
        unpack_latents(packed, 4, 8)


def test_flux_errors():
    model = flux_transformer(True)
    x = torch.randn(1, 4, 4, 4, dtype=F64)
    cond = {"encoder_hidden_states": torch.randn(1, 3, 16, dtype=F64),
            "pooled_projections": torch.randn(1, 8, dtype=F64)}
    with pytest.raises(ValueError, match="guidance-distilled"):
        FlowDenoiser(model)(x, SIGMA[:1], **cond)
    with pytest.raises(ValueError, match="embeds no guidance"):
        FlowDenoiser(flux_transformer(False), guidance=3.5)
    with pytest.raises(ValueError, match="4 channels"):
        FlowDenoiser(model, guidance=1.0)(torch.randn(1, 3, 4, 4, dtype=F64), SIGMA[:1], **cond)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        FlowDenoiser(model, guidance=1.0)(x, SIGMA[:1], pooled_projections=cond["pooled_projections"])


# ---------- pipeline directories through load_teacher ----------

def save_sd_pipeline(path):
    pipe = diffusers.StableDiffusionPipeline(
        vae=tiny_vae(), text_encoder=clip_encoder(8).float(), tokenizer=clip_tokenizer(), unet=cond_unet().float(),
        scheduler=diffusers.DDPMScheduler(prediction_type="v_prediction", steps_offset=1, clip_sample=False),
        safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path)
    return pipe


def save_flux_pipeline(path):
    pipe = diffusers.FluxPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(),
                                  text_encoder=clip_encoder(8).float(), tokenizer=clip_tokenizer(),
                                  text_encoder_2=t5_encoder(16).float(), tokenizer_2=t5_tokenizer(),
                                  transformer=flux_transformer(False).float())
    pipe.save_pretrained(path)
    return pipe


def test_load_teacher_reads_a_stable_diffusion_pipeline(tmp_path):
    pipe = save_sd_pipeline(tmp_path)
    den, arch, text = load_teacher(str(tmp_path), with_conditioner=True)
    assert isinstance(den, DiffusersDenoiser) and den.prediction == "v" and arch is None
    assert text.kind == "sd" and text.dtype == torch.float32
    x = torch.randn(2, 4, 8, 8)
    cond = text.condition(["a cat", "a dog"])
    direct = DiffusersDenoiser(pipe.unet, VPSchedule.from_diffusers(pipe.scheduler), "v")
    with torch.no_grad():
        torch.testing.assert_close(den(x, SIGMA.float(), **cond), direct(x, SIGMA.float(), **cond), rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="text-to-image pipeline.*prompts"):
        load_teacher(str(tmp_path))


def test_load_teacher_reads_a_flux_pipeline(tmp_path):
    save_flux_pipeline(tmp_path)
    den, _, text = load_teacher(str(tmp_path), with_conditioner=True)
    assert isinstance(den, FlowDenoiser) and den.pack and den.time_scale == 1.0 and text.kind == "flux"
    x = torch.randn(2, 4, 4, 4)
    with torch.no_grad():
        out = den(x, SIGMA.float(), **text.condition(["a cat", "a dog"]))
    assert out.shape == x.shape and bool(torch.isfinite(out).all())


def test_load_teacher_pipeline_errors(tmp_path):
    save_sd_pipeline(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    shutil.rmtree(tmp_path / "text_encoder")
    with pytest.raises(CheckpointError, match="no text_encoder/ subfolder"):
        load_teacher(str(tmp_path), with_conditioner=True)
    (tmp_path / "model_index.json").write_text(json.dumps(dict(index, text_encoder=[None, None])))
    with pytest.raises(CheckpointError, match="has no text_encoder"):
        load_teacher(str(tmp_path), with_conditioner=True)
    (tmp_path / "model_index.json").write_text(json.dumps(dict(index, _class_name="KandinskyPipeline")))
    with pytest.raises(CheckpointError, match="KandinskyPipeline.*not supported"):
        load_teacher(str(tmp_path), with_conditioner=True)


# ---------- the command line: distill a text-to-image teacher, then sample its student ----------

def test_text_student_from_the_command_line_samples_prompts_through_the_vae(tmp_path, capsys):
    """``sidfast distill --prompts`` on a pipeline directory, then ``sidfast sample --prompts``: the student's
    latents, conditioned on each image's prompt (i mod N), decoded by the pipeline's VAE."""
    from sidfast import samplers
    from sidfast.training import student
    from sidfast.models.vae import LatentDecoder

    pipe_dir = tmp_path / "sd"
    pipe = save_sd_pipeline(pipe_dir)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na dog\n")
    run = tmp_path / "run"
    code, _, err = run_main(["distill", "--teacher", pipe_dir, "--prompts", prompts, "--run-dir", run,
                         "--iterations", "2", "--batch", "2", "--grid-size", "2", "--teacher-steps", "2",
                         "--guidance", "lsg", "--cfg", "1.5", "--no-progress", "--device", "cpu"], capsys)
    assert code == 0, err
    out_dir = tmp_path / "samples"
    code, out, err = run_main(["sample", run / "checkpoint.pt", "--out", out_dir, "--num", "3", "--batch", "2",
                           "--prompts", prompts], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out_dir.iterdir()) == ["000000.png", "000001.png", "000002.png"]
    # the same images from Python: latents per prompt, then the VAE (scaling factor of its config)
    net, options = student.from_checkpoint(run / "checkpoint.pt", prompts=str(prompts))
    images = samplers.sample_images(net, 3, batch=2, **options)
    scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)  # the VAE's upsampling
    assert images.shape == (3, 3, 8 * scale, 8 * scale) and images.abs().max() <= 1
    latents = samplers.sample_images(net, 3, batch=2, **{**options, "decode": None})
    decoder = LatentDecoder(pipe.vae, pipe.vae.config.scaling_factor)
    with torch.no_grad():  # decoded batch by batch, as sampled (the same kernels: equal bit for bit)
        want = torch.cat([pipe.vae.float().decode(z / pipe.vae.config.scaling_factor).sample.clamp(-1, 1)
                          for z in latents.split(2)])
    torch.testing.assert_close(images, want, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([decoder(z) for z in latents.split(2)]), want, rtol=0, atol=0)
    # image i gets prompt i mod 2: images 0 and 2 share a prompt, and differ only by their latents
    cond = options["cond"](0, 3)
    text = TextConditioner.from_pretrained(pipe_dir)
    torch.testing.assert_close(cond["encoder_hidden_states"],
                               text.condition(["a red cat", "a dog", "a red cat"])["encoder_hidden_states"])
    # errors in command-line words
    code, _, err = run_main(["sample", run / "checkpoint.pt", "--out", tmp_path / "x.png"], capsys)
    assert code == 2 and "--prompts FILE" in err, err
    code, _, err = run_main(["sample", run / "checkpoint.pt", "--out", tmp_path / "x.png", "--prompts",
                         tmp_path / "missing.txt"], capsys)
    assert code == 2 and "--prompts" in err and "does not exist" in err, err
