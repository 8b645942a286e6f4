"""sidfast.evaluate.export (``sidfast export``): what stock diffusers makes from the exported directory equals
``sidfast sample``'s output for the same latents, to float32 rounding, for tiny students distilled for two
iterations from a ``UNet2DModel`` (LoRA generator and class labels; two DDIM steps), a Stable Diffusion, an SDXL
and an SD3 pipeline; each test runs the Python ``sidfast export`` prints, as printed.

Tolerance (``assert_reproduces``): diffusers and sidfast compute the same function in float32 along different
roundings (the input scaled by ``1 / sqrt(1 + sigma^2)`` or by ``rsqrt``, ``t z`` or ``sigma z / (1 + sigma)``;
the x0 conversion and the Euler step). Against the exact value (the same weights, latents and noise draws, in
float64) sidfast's own float32 result is off by ``e``, measured; diffusers' result, the same networks on inputs a
few roundings away, is off by a few ``e``, plus the Euler step's own roundings of values of the size of its
input: ``4 e + rounding_bound(float32, |x| + |x0|, 8)``. A VP scheduler also computes the continuous timestep of
each level from a float32 log-sigma table where sidfast's adapter uses a float64 one: the same float32 number or
one ulp apart, and the tolerance adds what that difference changes in the exact (float64) result. Each test also
shows that a call one training timestep away (what a DDIM scheduler at the nearest integer timestep would run)
is more than ten times outside the tolerance.
"""
import copy
import json
import os

import pytest
import torch

from nets import clip_encoder, clip_tokenizer, cond_unet, sd3_transformer, t5_encoder, t5_tokenizer, tiny_vae
from sidfast import reference
from sidfast.conditions import flat_condition, nested_condition
from sidfast.evaluate import export
from sidfast.labels import format_labels
from sidfast.samplers import sample_images
from sidfast.training import student
from utils import rounding_bound, run_main, tiny_diffusers_unet

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytestmark = pytest.mark.slow  # each module fixture distills a student (2 iterations) on the CPU

F64 = torch.float64
DISTILL = ["--iterations", "2", "--batch", "2", "--grid-size", "0", "--teacher-steps", "0", "--no-progress",
           "--device", "cpu"]
# the generator's first level pinned at sigma 2.5 (the recipes' own: a DDPM table's t_init 625, a flow teacher's
# t = 1 with four steps; the latter is exported by test_sd3_student_of_the_default_recipe_from_pure_noise)
PINNED = ["--sigma-init", "2.5"]


# ---------- the tolerance ----------

def float64_student(net, options, z, cond=None, timesteps=None):
    """What ``sample_images`` computes for latents ``z`` (one batch, seed 0), in float64: the generator's K steps
    at ``student.generator_levels`` with its re-noising; fresh noise drawn as ``sample_images`` draws it (float32,
    seed 1), then widened. ``timesteps``: {level: timestep} given to a VP network in place of its adapter's."""
    net64 = copy.deepcopy(net).double()
    if timesteps is not None:
        net64.timesteps = lambda sigma: torch.tensor([timesteps[s] for s in sigma.tolist()], dtype=torch.float32)
    levels = student.generator_levels(options)
    labels = None
    if options["num_classes"]:
        labels = format_labels(torch.arange(z.shape[0]) % options["num_classes"], options["num_classes"],
                               options["label_format"])
    flat = flat_condition(cond or {})  # SDXL's added_cond_kwargs nest
    cond = nested_condition(flat, [v.to(F64) for v in flat.values()])
    fresh = torch.Generator().manual_seed(1)
    x = reference.generator_input(z.to(F64), levels[0])
    with torch.no_grad():
        for k, sigma in enumerate(levels):
            d = net64(x, torch.full((z.shape[0],), sigma, dtype=F64), labels, **cond)
            if k + 1 < len(levels):
                eps = {"fresh": lambda: torch.randn(z.shape, generator=fresh).to(F64), "fixed": lambda: z.to(F64),
                       "ddim": lambda: (x - d) / sigma}[options["renoise"]]()
                x = d + levels[k + 1] * eps
    return d


def assert_reproduces(got, want, net, options, z, info, scheduler, cond=None):
    """``got`` (diffusers) equals ``want`` (sidfast sample) within the module docstring's tolerance; returns
    (the tolerance, the exact result). ``scheduler``: the exported scheduler, for a VP student's timesteps."""
    exact = float64_student(net, options, z, cond)
    levels = student.generator_levels(options)
    timestep_effect = 0.0
    if info["family"] == "vp":
        scheduler.set_timesteps(sigmas=[*info["scheduler_levels"], 0.0])
        timesteps = dict(zip(levels, scheduler.timesteps.tolist()))
        timestep_effect = (float64_student(net, options, z, cond, timesteps) - exact).abs().max().item()
    start = (levels[0] if info["family"] == "vp" else info["scheduler_levels"][0]) * z
    e = (want.to(F64) - exact).abs().max().item()
    # the reference is sidfast's computation: its float32 result is within float32 rounding of it
    assert e <= rounding_bound(torch.float32, exact.abs().max().item(), 1000), e
    step = rounding_bound(torch.float32, start.abs().max().item() + exact.abs().max().item(), 8)
    tol = 4 * e + step + timestep_effect
    diff = (got.to(F64) - want.to(F64)).abs().max().item()
    assert got.shape == want.shape and diff <= tol, (diff, tol, e, timestep_effect)
    return tol, exact


# ---------- running the exported call ----------

def export_and_call(tmp_path, capsys, run, name, *extra, output_type=None):
    """``sidfast export RUN --out tmp/NAME EXTRA``; (the exported info, the namespace of the printed snippet run
    as printed, with ``output_type`` added to the pipeline's last call when given)."""
    out = tmp_path / name
    code, printed, err = run_main(["export", run, "--out", out, *extra], capsys)
    assert code == 0, err
    info = json.loads((out / export.INFO_NAME).read_text())
    assert info["snippet"] in printed
    return info, run_snippet(info["snippet"], output_type)


def run_snippet(snippet, output_type=None):
    if output_type is not None:
        assert snippet.count("guidance_scale=1.0).images") == 1
        snippet = snippet.replace("guidance_scale=1.0).images",
                                  f"guidance_scale=1.0, output_type={output_type!r}).images")
    namespace = {}
    exec(compile(snippet, "<sidfast export snippet>", "exec"), namespace)
    return namespace


def sidfast_sample(run, steps=None, prompts=None):
    """(net, options, what ``sidfast sample RUN --num 4 [--steps K] [--prompts FILE]`` samples (latents, before
    any decoding), its latents z): the functions ``cmd_sample`` calls."""
    net, options = student.from_checkpoint(run, prompts=prompts)
    if steps is not None:
        options["gen_steps"] = steps
    z = torch.randn((export.SNIPPET_IMAGES, *options["shape"]), generator=torch.Generator().manual_seed(0))
    samples = sample_images(net, export.SNIPPET_IMAGES, **{**options, "decode": None})
    return net, options, samples, z


def neighbour_sigma(alphas_cumprod, sigma):
    """The sigma of the integer training timestep nearest to ``sigma``'s continuous one (a DDIM-style call)."""
    ac = alphas_cumprod.to(F64)
    t = int(torch.argmin((((1 - ac) / ac).sqrt() - sigma).abs()))
    return float(((1 - ac[t]) / ac[t]).sqrt())


def assert_safetensors_only(root):
    files = [p.name for p in root.rglob("*") if p.is_file()]
    assert any(f.endswith(".safetensors") for f in files)
    assert not any(f.endswith((".bin", ".pt", ".pth", ".ckpt")) for f in files), files


# ---------- a U-Net (VP): LoRA generator, class labels ----------

@pytest.fixture(scope="module")
def unet_run(tmp_path_factory):
    """A class-conditional epsilon-prediction ``UNet2DModel`` (DDPMPipeline directory) distilled with a LoRA
    generator."""
    from sidfast import cli

    root = tmp_path_factory.mktemp("unet")
    teacher = root / "teacher"
    unet = tiny_diffusers_unet(num_class_embeds=3)
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(prediction_type="epsilon")).save_pretrained(
        teacher)
    assert cli.main(["distill", "--teacher", str(teacher), "--run-dir", str(root / "run"), "--generator", "lora",
                     "--lora-rank", "2", *DISTILL, *PINNED]) == 0
    return root


def test_unet_student_through_diffusers_equals_sidfast_sample(unet_run, tmp_path, capsys):
    run = unet_run / "run"
    net, options, want, z = sidfast_sample(run)
    info, ns = export_and_call(tmp_path, capsys, run, "student")
    assert info["exact"] and info["call_sigmas"] == [options["sigma_init"], 0.0] and options["num_classes"] == 3
    assert "class_labels=class_labels" in info["snippet"]
    tol, _ = assert_reproduces(ns["images"], want, net, options, z, info, ns["scheduler"])
    # the test can fail: the same call at the nearest integer training timestep is far outside the tolerance
    scheduler = ns["scheduler"]
    sigma = neighbour_sigma(scheduler.alphas_cumprod, options["sigma_init"])
    scheduler.set_timesteps(sigmas=[sigma, 0.0])
    x = z * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(ns["model"](scheduler.scale_model_input(x, t), t, class_labels=ns["class_labels"])
                               .sample, t, x).prev_sample
    assert (x - want).abs().max() > 10 * tol
    # the LoRA factors are merged into plain weights that moved away from the teacher's
    out = tmp_path / "student"
    assert_safetensors_only(out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors",
                                                     "scheduler_config.json", export.INFO_NAME]
    teacher = diffusers.UNet2DModel.from_pretrained(unet_run / "teacher" / "unet").state_dict()
    exported = ns["model"].state_dict()
    assert teacher.keys() == exported.keys()
    assert any(not torch.equal(teacher[k], exported[k]) for k in teacher)
    assert not any("lora" in k for k in exported)


def test_unet_student_exported_with_two_steps_runs_the_fresh_noise_loop(unet_run, tmp_path, capsys):
    """``--steps 2`` of a student with fresh re-noising: the printed loop of one-step scheduler calls draws the
    noise sidfast sample draws and equals its two-step samples."""
    run = unet_run / "run"
    net, options, want, z = sidfast_sample(run, steps=2)
    info, ns = export_and_call(tmp_path, capsys, run, "student2", "--steps", "2")
    assert not info["exact"] and info["renoise"] == "fresh" and info["scheduler_levels"] == [2.5, 1.25]
    assert_reproduces(ns["images"], want, net, options, z, info, ns["scheduler"])


@pytest.fixture(scope="module")
def unet_ddim_run(tmp_path_factory):
    """An unconditional v-prediction ``UNet2DModel`` (model directory, scheduler config beside it) distilled into
    a two-step generator with DDIM re-noising."""
    from sidfast import cli

    root = tmp_path_factory.mktemp("unet-ddim")
    teacher = root / "teacher"
    tiny_diffusers_unet(seed=1).save_pretrained(teacher)
    diffusers.DDPMScheduler(prediction_type="v_prediction", beta_schedule="squaredcos_cap_v2").save_config(teacher)
    assert cli.main(["distill", "--teacher", str(teacher), "--run-dir", str(root / "run"), "--gen-steps", "2",
                     "--renoise", "ddim", *DISTILL, *PINNED]) == 0
    return root


def test_unet_student_with_two_ddim_steps_is_one_scheduler_call(unet_ddim_run, tmp_path, capsys):
    """DDIM re-noising between the levels is diffusers' Euler step from one level to the next: all K levels in
    one ``sigmas=`` call."""
    run = unet_ddim_run / "run"
    net, options, want, z = sidfast_sample(run)
    info, ns = export_and_call(tmp_path, capsys, run, "student")
    assert info["exact"] and info["gen_steps"] == 2 and info["call_sigmas"] == [2.5, 1.25, 0.0]
    assert_reproduces(ns["images"], want, net, options, z, info, ns["scheduler"])


# ---------- Stable Diffusion (VP, v-prediction), its teacher saved as pickled .bin files ----------

@pytest.fixture(scope="module")
def sd_run(tmp_path_factory):
    from sidfast import cli

    root = tmp_path_factory.mktemp("sd")
    pipe = diffusers.StableDiffusionPipeline(
        vae=tiny_vae(), text_encoder=clip_encoder(8).float(), tokenizer=clip_tokenizer(), unet=cond_unet().float(),
        scheduler=diffusers.DDPMScheduler(prediction_type="v_prediction", beta_schedule="scaled_linear",
                                          beta_start=0.00085, beta_end=0.012, steps_offset=1, clip_sample=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root / "teacher", safe_serialization=False)
    (root / "prompts.txt").write_text(f"{export.SNIPPET_PROMPT}\n")
    assert cli.main(["distill", "--teacher", str(root / "teacher"), "--prompts", str(root / "prompts.txt"),
                     "--run-dir", str(root / "run"), *DISTILL, *PINNED]) == 0
    return root


def check_pipeline(root, tmp_path, capsys, steps=None, run="run"):
    """Latents and images of the exported pipeline's printed call against ``sidfast sample --prompts``."""
    run, prompts = root / run, str(root / "prompts.txt")
    net, options, want, z = sidfast_sample(run, steps=steps, prompts=prompts)
    extra = ["--steps", str(steps)] if steps else []
    info, ns = export_and_call(tmp_path, capsys, run, "latents", *extra, output_type="latent")
    latents = ns["images"]
    tol, exact = assert_reproduces(latents, want, net, options, z, info, ns["pipe"].scheduler,
                                   cond=options["cond"](0, z.shape[0]))
    # the images: the pipeline's decode is sidfast's (the same VAE call, bit for bit) on latents that agree, so
    # they agree within the latents' tolerance carried through the VAE, at its gain measured from sidfast's own
    # latent and image errors against the exact ones
    images = run_snippet(info["snippet"], output_type="pt")["images"]
    decoder = options["decode"]
    torch.testing.assert_close(images, decoder(latents) * 0.5 + 0.5, rtol=0, atol=0)
    vae64 = copy.deepcopy(decoder.vae).double()
    with torch.no_grad():
        exact_images = vae64.decode(exact / decoder.scaling_factor + decoder.shift_factor).sample.clamp(-1, 1)
    sidfast_images = decoder(want)
    gain = (sidfast_images.to(F64) - exact_images).abs().max() / (want.to(F64) - exact).abs().max()
    diff = (images.to(F64) * 2 - 1 - sidfast_images.to(F64)).abs().max()
    assert diff <= gain * tol + rounding_bound(torch.float32, 2.0, 8), (diff, gain, tol)
    # the student is not its teacher
    key = "unet" if info["family"] == "vp" else "transformer"
    teacher = getattr(diffusers, info["model_class"]).from_pretrained(root / "teacher" / key).state_dict()
    exported = getattr(ns["pipe"], key).state_dict()
    assert teacher.keys() == exported.keys() and any(not torch.equal(teacher[k], exported[k]) for k in teacher)
    return info, ns, tol, want, z


def test_sd_student_through_its_pipeline_equals_sidfast_sample(sd_run, tmp_path, capsys):
    info, ns, tol, want, z = check_pipeline(sd_run, tmp_path, capsys)
    assert info["layout"] == "pipeline" and info["pipeline_class"] == "StableDiffusionPipeline"
    out = tmp_path / "latents"
    assert_safetensors_only(out)  # the teacher's .bin components were written as safetensors
    index = json.loads((out / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "EulerDiscreteScheduler"] and index["unet"][1] == "UNet2DConditionModel"
    teacher = diffusers.StableDiffusionPipeline.from_pretrained(sd_run / "teacher")
    pipe = ns["pipe"]
    for name in ("text_encoder", "vae"):  # the other components are the teacher's
        a, b = getattr(teacher, name).state_dict(), getattr(pipe, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    # the test can fail: the pipeline at the nearest integer training timestep
    sigma = neighbour_sigma(pipe.scheduler.alphas_cumprod, 2.5)
    off = pipe([export.SNIPPET_PROMPT] * 4, sigmas=[sigma, 0.0], latents=z, guidance_scale=1.0,
               output_type="latent").images
    assert (off - want).abs().max() > 10 * tol


def test_sd_student_two_steps_loop_of_pipeline_calls(sd_run, tmp_path, capsys):
    info, *_ = check_pipeline(sd_run, tmp_path, capsys, steps=2)
    assert not info["exact"] and "for k in range(len(levels) - 1):" in info["snippet"]


# ---------- SDXL (two text encoders, time ids) ----------

@pytest.fixture(scope="module")
def sdxl_run(tmp_path_factory):
    from sidfast import cli

    root = tmp_path_factory.mktemp("sdxl")
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=tiny_vae(), text_encoder=clip_encoder(8).float(), tokenizer=clip_tokenizer(),
        text_encoder_2=clip_encoder(8, projection=True, seed=2).float(), tokenizer_2=clip_tokenizer(),
        unet=cond_unet(sdxl=True).float(), add_watermarker=False,
        scheduler=diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                   beta_end=0.012, timestep_spacing="leading", steps_offset=1))
    pipe.save_pretrained(root / "teacher")
    (root / "prompts.txt").write_text(f"{export.SNIPPET_PROMPT}\n")
    assert cli.main(["distill", "--teacher", str(root / "teacher"), "--prompts", str(root / "prompts.txt"),
                     "--run-dir", str(root / "run"), *DISTILL, *PINNED]) == 0
    return root


def test_sdxl_student_through_its_pipeline_equals_sidfast_sample(sdxl_run, tmp_path, capsys):
    info, ns, *_ = check_pipeline(sdxl_run, tmp_path, capsys)
    assert info["pipeline_class"] == "StableDiffusionXLPipeline" and "add_watermarker=False" in info["snippet"]


# ---------- SD3 (flow matching, a transformer) ----------

@pytest.fixture(scope="module")
def sd3_run(tmp_path_factory):
    from sidfast import cli

    root = tmp_path_factory.mktemp("sd3")
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=sd3_transformer().float(), scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(shift_factor=0.1, scaling_factor=0.9), text_encoder=clip_encoder(8, True).float(),
        tokenizer=clip_tokenizer(), text_encoder_2=clip_encoder(8, True, seed=2).float(), tokenizer_2=clip_tokenizer(),
        text_encoder_3=t5_encoder(16).float(), tokenizer_3=t5_tokenizer())
    pipe.save_pretrained(root / "teacher")
    (root / "prompts.txt").write_text(f"{export.SNIPPET_PROMPT}\n")
    distill = ["distill", "--teacher", str(root / "teacher"), "--prompts", str(root / "prompts.txt"), *DISTILL]
    assert cli.main([*distill, "--run-dir", str(root / "run-default")]) == 0  # SiD-DiT's recipe: 4 steps from t = 1
    distill += PINNED
    assert cli.main([*distill, "--run-dir", str(root / "run"), "--gen-steps", "1"]) == 0
    assert cli.main([*distill, "--run-dir", str(root / "run-ddim"), "--gen-steps", "2", "--renoise", "ddim",
                     "--step-spacing", "flow"]) == 0
    return root


def test_sd3_student_through_its_pipeline_equals_sidfast_sample(sd3_run, tmp_path, capsys):
    info, ns, tol, want, z = check_pipeline(sd3_run, tmp_path, capsys)
    assert info["family"] == "flow" and info["pipeline_class"] == "StableDiffusion3Pipeline"
    pipe = ns["pipe"]
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and pipe.scheduler.config.shift == 1.0
    assert_safetensors_only(tmp_path / "latents")
    # the test can fail: a flow time one thousandth (one training timestep) away
    t0 = info["scheduler_levels"][0]
    off = pipe([export.SNIPPET_PROMPT] * 4, sigmas=[t0 + 1e-3], latents=t0 * z, guidance_scale=1.0,
               output_type="latent").images
    assert (off - want).abs().max() > 10 * tol


def test_sd3_student_of_the_default_recipe_from_pure_noise(sd3_run, tmp_path, capsys):
    """SiD-DiT's recipe: four steps from t = 1 (z itself) with fresh noise: the printed loop of pipeline calls."""
    info, *_ = check_pipeline(sd3_run, tmp_path, capsys, run="run-default")
    assert info["scheduler_levels"] == pytest.approx([1.0, 0.75, 0.5, 0.25], abs=1e-15) and info["gen_steps"] == 4


def test_sd3_student_two_steps_loop_of_pipeline_calls(sd3_run, tmp_path, capsys):
    info, *_ = check_pipeline(sd3_run, tmp_path, capsys, steps=2)
    # the flow recipe's spacing: linear in t, t_1 = t_0 / 2
    assert not info["exact"] and info["scheduler_levels"][1] == pytest.approx(export.flow_time(2.5) / 2)


def test_sd3_student_with_two_ddim_steps_is_one_pipeline_call(sd3_run, tmp_path, capsys):
    info, ns, *_ = check_pipeline(sd3_run, tmp_path, capsys, run="run-ddim")
    t0 = export.flow_time(2.5)
    assert info["exact"] and info["call_sigmas"] == pytest.approx([t0, t0 / 2], rel=1e-15)  # linear in t
    # and its first step alone (--steps 1), the one-step call
    info, *_ = check_pipeline(sd3_run, tmp_path / "one", capsys, steps=1, run="run-ddim")
    assert info["exact"] and info["call_sigmas"] == [t0]


# ---------- sharded runs ----------

def test_a_sharded_run_exports_from_its_folder_its_dcp_and_its_generator_file(unet_ddim_run, tmp_path, capsys):
    """An --fsdp run (one process) keeps checkpoint.dcp and a consolidated generator.pt: export reads all three,
    as sidfast sample does, and writes the weights sample uses."""
    from safetensors.torch import load_file

    from sidfast import cli

    run = tmp_path / "run"
    assert cli.main(["distill", "--teacher", str(unet_ddim_run / "teacher"), "--run-dir", str(run), "--fsdp",
                     *DISTILL]) == 0
    assert (run / "checkpoint.dcp").is_dir() and not (run / "checkpoint.pt").exists()
    net, _ = student.from_checkpoint(run)
    want = net.network.state_dict()
    for name, source in (("folder", run), ("dcp", run / "checkpoint.dcp"), ("generator", run / "generator.pt")):
        code, _, err = run_main(["export", source, "--out", tmp_path / name], capsys)
        assert code == 0, err
        got = load_file(tmp_path / name / "diffusion_pytorch_model.safetensors")
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), name


# ---------- the directory: whole or not at all ----------

def test_export_appears_whole_or_not_at_all(unet_run, tmp_path, capsys, monkeypatch):
    run = unet_run / "run"
    out = tmp_path / "student"
    original = diffusers.EulerDiscreteScheduler.save_config

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(diffusers.EulerDiscreteScheduler, "save_config", fail)
    with pytest.raises(export.ExportError, match="--out .*No space left on device.*nothing was written"):
        export.export_student(run, out)
    assert sorted(os.listdir(tmp_path)) == []  # neither the directory nor its temporary
    monkeypatch.setattr(diffusers.EulerDiscreteScheduler, "save_config", original)
    export.export_student(run, out)
    first = (out / "diffusion_pytorch_model.safetensors").read_bytes()
    # a non-empty --out is refused, and replaced with --overwrite; a failed replacement keeps the old one
    code, _, err = run_main(["export", run, "--out", out], capsys)
    assert code == 2 and "--overwrite" in err and "not empty" in err, err
    monkeypatch.setattr(diffusers.EulerDiscreteScheduler, "save_config", fail)
    with pytest.raises(export.ExportError):
        export.export_student(run, out, overwrite=True)
    assert (out / "diffusion_pytorch_model.safetensors").read_bytes() == first
    assert sorted(os.listdir(tmp_path)) == ["student"]
    monkeypatch.setattr(diffusers.EulerDiscreteScheduler, "save_config", original)
    (out / "stale.txt").write_text("from before")
    code, _, err = run_main(["export", run, "--out", out, "--overwrite", "--steps", "3"], capsys)
    assert code == 0, err
    assert not (out / "stale.txt").exists() and json.loads((out / export.INFO_NAME).read_text())["gen_steps"] == 3
    assert sorted(os.listdir(tmp_path)) == ["student"]
    # an empty directory is simply filled
    (tmp_path / "empty").mkdir()
    assert run_main(["export", run, "--out", tmp_path / "empty"], capsys)[0] == 0
    assert (tmp_path / "empty" / "config.json").is_file()


def test_an_infinite_flow_level_is_time_one_on_z_itself():
    """A flow generator whose first level is infinite (t = 1) takes z itself: the printed call passes z."""
    info = {"shape": [4, 8, 8], "family": "flow", "layout": "pipeline", "pipeline_class": "StableDiffusion3Pipeline",
            "renoise": "fresh", "gen_steps": 1, "num_classes": 0}
    levels = export.scheduler_levels("flow", [float("inf")])
    assert levels == [1.0]
    text = export.snippet(dict(info, scheduler_levels=levels, exact=True), "out")
    assert "sigmas=[1.0], latents=z," in text
    with pytest.raises(export.ExportError, match="infinite"):
        export.scheduler_levels("vp", [float("inf")])



def test_readme_and_docs_show_the_call_export_prints_for_an_sd_student():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    info = {"shape": [4, 64, 64], "family": "vp", "layout": "pipeline", "pipeline_class": "StableDiffusionPipeline",
            "renoise": "fresh", "gen_steps": 1, "num_classes": 0, "exact": True,
            "scheduler_levels": export.scheduler_levels("vp", [2.5])}  # the default --sigma-init
    printed = export.snippet(info, "student")
    for name in ("README.md", os.path.join("docs", "export.md")):
        with open(os.path.join(root, name)) as f:
            assert f"```python\n{printed}```" in f.read(), name
    with open(os.path.join(root, "docs", "export.md")) as f:
        docs = f.read()
    unet = dict(info, shape=[3, 32, 32], layout="model", model_class="UNet2DModel",
                scheduler_class="EulerDiscreteScheduler")
    assert f"```python\n{export.snippet(unet, 'student')}```" in docs
    sd3 = dict(info, shape=[16, 128, 128], family="flow", pipeline_class="StableDiffusion3Pipeline",
               scheduler_levels=export.scheduler_levels("flow", [2.5]))
    assert export.snippet(sd3, "student").splitlines()[-1] in docs


def test_what_no_stock_scheduler_reproduces_is_refused_in_words():
    """FLUX (packed latents, embedded guidance), a learned variance, a scheduler config whose Euler table is not
    the schedule the teacher was evaluated with: one line each, before anything is written."""
    from nets import flux_transformer
    from sidfast.models.diffusers import DiffusersDenoiser
    from sidfast.models.flow import FlowDenoiser
    from sidfast.schedules import VPSchedule

    with pytest.raises(export.ExportError, match="FLUX students are not exported"):
        export._flow_scheduler(FlowDenoiser(flux_transformer(False)), {}, "flux")
    ddpm = diffusers.DDPMScheduler(prediction_type="v_prediction")
    learned = DiffusersDenoiser(tiny_diffusers_unet(), VPSchedule.from_diffusers(ddpm), "v", learned_variance=True)
    with pytest.raises(export.ExportError, match="learned variance"):
        export._euler_scheduler(learned, dict(ddpm.config), "if")
    cosine = DiffusersDenoiser(tiny_diffusers_unet(), VPSchedule.from_diffusers(
        diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2")), "v")
    with pytest.raises(export.ExportError, match="no EulerDiscreteScheduler equivalent"):
        export._euler_scheduler(cosine, dict(ddpm.config), "other")
    plain = DiffusersDenoiser(tiny_diffusers_unet(), VPSchedule.from_diffusers(ddpm), "v")
    euler = export._euler_scheduler(plain, dict(ddpm.config), "plain")
    assert euler.config.prediction_type == "v_prediction" and euler.config.timestep_spacing == "linspace"
