"""PixArt-Sigma in the same files (issue 30): its presets, its official .pth and diffusers folders, its sampling loop
against diffusers' PixArtSigmaPipeline, the 2K buckets, and the mistakes a Sigma user makes, each named.
(The full-size transformer parity is in test_pixart.py's FULL_CASES, beside alpha's; the SDXL VAE in test_vae.py.)"""
import dataclasses
import json

import pytest
import torch

import sample as sample_py
from conftest import diffusers_pixart, make_pipeline_dir, report
from data import ASPECT_RATIOS_TRAIN, bucket
from pixart_min import PRESETS, PixArt, from_diffusers, load_pixart, sample, sincos_pos_embed
from test_pixart import inputs, max_err, reference

SIGMA = {"PixArt-Sigma-XL-2-256x256": (32, 0.5), "PixArt-Sigma-XL-2-512-MS": (64, 1),
         "PixArt-Sigma-XL-2-1024-MS": (128, 2), "PixArt-Sigma-XL-2-2K-MS": (256, 4)}


@pytest.mark.parametrize("name", SIGMA)
def test_sigma_presets_are_alphas_model_with_300_tokens(name):
    size, scale = SIGMA[name]
    c = PRESETS[name]
    assert (c.input_size, c.pe_interpolation, c.model_max_length, c.micro_condition) == (size, scale, 300, False)
    alpha = dataclasses.replace(c, input_size=32, pe_interpolation=1.0, model_max_length=120)
    assert alpha == PRESETS["PixArt-XL-2-256"]
    with torch.device("meta"):
        model = PixArt(c)
    assert sum(p.numel() for p in model.parameters()) == 610_856_096          # alpha 256's count: no new weights
    assert model.y_embedder.y_embedding.shape == (300, 4096)


def sigma_twins(seed, size=8):
    """A tiny diffusers transformer configured as Sigma's (the scale input_size / 64, no micro-conditions), and
    the official .pth state dict of the same weights: pos_embed stored, a null caption of 300 tokens."""
    ref = diffusers_pixart(seed=seed, sample_size=size, interpolation_scale=size / 64, use_additional_conditions=False)
    sd = from_diffusers(ref.state_dict())
    sd["pos_embed"] = sincos_pos_embed(32, size // 2, size // 2, size // 2, size / 64)[None]
    sd["y_embedder.y_embedding"] = torch.randn(300, 32, generator=torch.Generator().manual_seed(seed))
    return ref, sd


def test_official_sigma_pth_loads_as_sigma(tmp_path):
    """A Sigma-shaped official .pth: the 300-row null caption says Sigma, so the scale is input_size / 64 (0.125 for
    these 8x8 latents; 0.5 for the released 256 px model), not alpha's max(input_size // 64, 1) = 1."""
    ref, sd = sigma_twins(seed=20)
    torch.save({"state_dict": sd}, tmp_path / "sigma.pth")
    model = load_pixart(tmp_path / "sigma.pth", num_heads=2)
    assert (model.config.model_max_length, model.config.pe_interpolation) == (300, 0.125)
    assert not model.config.micro_condition and model.has_null_caption
    for H, W in [(8, 8), (8, 12), (16, 8)]:
        x, t, y, mask, _, _ = inputs(B=2, H=H, W=W, L=300, caption_channels=32, seed=H * W, lengths=[300, 17])
        with torch.no_grad():
            ours = model(x, t, y, mask)
        assert report(f"tiny Sigma .pth {H}x{W}", max_err(ours, reference(ref, x, t, y, mask))) <= 1e-5
    # without pos_embed the size must be given, and the scale follows from it
    del sd["pos_embed"]
    torch.save(sd, tmp_path / "no_pos.pth")
    assert load_pixart(tmp_path / "no_pos.pth", num_heads=2, input_size=8).config.pe_interpolation == 0.125
    with pytest.raises(ValueError, match="null caption of 300 tokens .* PixArt-Sigma: 300.* asks for 120"):
        load_pixart(tmp_path / "sigma.pth", num_heads=2, model_max_length=120)


@pytest.fixture(scope="module")
def sigma_pipeline_dir(tmp_path_factory):
    """A tiny PixArtSigmaPipeline folder, 1024-MS-like: its transformer config sets interpolation_scale and no
    micro-conditions, as the hub's does, and only model_index.json says the captions have 300 tokens."""
    return make_pipeline_dir(tmp_path_factory.mktemp("sigma_pipeline"),
                             dict(interpolation_scale=2, use_additional_conditions=False), sigma=True)


def test_sigma_pipeline_folder_loads_with_300_tokens(sigma_pipeline_dir, tmp_path):
    for folder in (sigma_pipeline_dir, sigma_pipeline_dir / "transformer"):
        c = load_pixart(folder).config
        assert (c.model_max_length, c.pe_interpolation, c.micro_condition) == (300, 2, False)
    alone = tmp_path / "transformer"                                # the same config without its pipeline: alpha
    alone.mkdir()
    for f in (sigma_pipeline_dir / "transformer").iterdir():
        (alone / f.name).write_bytes(f.read_bytes())
    assert load_pixart(alone).config.model_max_length == 120
    # what a transformer folder alone still tells: 2K (only Sigma has it), or Sigma's scale 0.5 at 256 px
    cfg = json.loads((alone / "config.json").read_text())
    from pixart_min import config_from_diffusers
    assert config_from_diffusers(dict(cfg, sample_size=256, interpolation_scale=4))["model_max_length"] == 300
    assert config_from_diffusers(dict(cfg, sample_size=32, interpolation_scale=0.5))["model_max_length"] == 300
    assert config_from_diffusers(dict(cfg, sample_size=32, interpolation_scale=None))["model_max_length"] == 120


def test_sampling_matches_the_sigma_pipeline(sigma_pipeline_dir):
    """diffusers' PixArtSigmaPipeline run on prompt embeddings (DPM-Solver++, 20 steps, guidance 4.5) against
    pixart_min.sample on the same embeddings, with the negative prompt's features and mask as the null caption."""
    from diffusers import PixArtSigmaPipeline

    pipe = PixArtSigmaPipeline.from_pretrained(sigma_pipeline_dir)
    model = load_pixart(sigma_pipeline_dir)
    g = torch.Generator().manual_seed(21)
    noise = torch.randn(1, 4, 8, 12, generator=g)
    y, null_y = torch.randn(1, 300, 32, generator=g), torch.randn(1, 300, 32, generator=g)
    mask, null_mask = (torch.arange(300) < 23).long()[None], (torch.arange(300) < 1).long()[None]
    f = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    theirs = pipe(negative_prompt=None, prompt_embeds=y, prompt_attention_mask=mask, negative_prompt_embeds=null_y,
                  negative_prompt_attention_mask=null_mask, latents=noise.clone(), num_inference_steps=20,
                  guidance_scale=4.5, height=8 * f, width=12 * f, use_resolution_binning=False,
                  output_type="latent").images
    ours = sample(model, noise, y, mask, null_y=null_y, null_mask=null_mask, steps=20, cfg_scale=4.5)
    err = max_err(ours, theirs) / theirs.abs().max().item()
    assert report("tiny Sigma pipeline, DPM-Solver 20 steps (relative)", err) <= 1e-5


def test_2k_buckets_are_diffusers_2048_bins():
    from diffusers.image_processor import PixArtImageProcessor
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import ASPECT_RATIO_2048_BIN

    g = torch.Generator().manual_seed(22)
    sizes = [(2048, 2048), (1080, 1920), (3000, 1000), (800, 3900), *torch.randint(256, 4096, (20, 2), generator=g)]
    for h, w in sizes:
        h, w = int(h), int(w)
        assert bucket(h, w, 2048, 16, ASPECT_RATIOS_TRAIN) == PixArtImageProcessor.classify_height_width_bin(
            h, w, ratios=ASPECT_RATIO_2048_BIN), (h, w)


def test_alpha_model_is_not_given_300_tokens(tmp_path):
    model = PixArt(PRESETS["tiny"]).eval()
    y, mask = torch.randn(1, 300, 32), torch.ones(1, 300, dtype=torch.long)
    for null in ({}, dict(null_y=y, null_mask=mask)):
        with pytest.raises(ValueError, match="captions of 300 tokens, but this model reads at most 120"):
            sample(model, torch.randn(1, 4, 8, 8), y, mask, steps=2, **null)


def test_sample_py_runs_sigma_at_a_bucket_with_300_tokens(sigma_pipeline_dir, tmp_path, capsys, monkeypatch):
    """sample.py on a Sigma pipeline: T5 encodes 300 tokens, and the size snaps to a bucket though the model has no
    micro-conditions (as PixArtSigmaPipeline's binning does)."""
    seen = {}

    def spy(model, noise, y, mask, **kw):
        seen.update(tokens=y.shape[1], null_tokens=kw["null_y"].shape[1], size=tuple(noise.shape[-2:]))
        return noise
    monkeypatch.setattr(sample_py, "sample", spy)
    sample_py.main(["a red circle", "--model", str(sigma_pipeline_dir), "--height", "12", "--width", "28",
                    "--steps", "2", "--device", "cpu", "--out", str(tmp_path)])
    f = 2                                                                # the tiny VAE's downscale
    h, w = bucket(12, 28, 8 * f, 2 * f)
    assert (h, w) != (12, 28) and seen == dict(tokens=300, null_tokens=300, size=(h // f, w // f))
    assert "aspect-ratio bucket" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["sigma with the SD VAE", "alpha with the SDXL VAE", "2K on a 1024 model"])
def test_sigma_mistakes_are_named(case, sigma_pipeline_dir, pipeline_dir, tmp_path, capsys):
    import shutil

    from conftest import diffusers_vae
    folder = tmp_path / "pipe"
    source = pipeline_dir if case.startswith("alpha") else sigma_pipeline_dir
    shutil.copytree(source, folder)
    argv = ["a red circle", "--model", str(folder), "--device", "cpu", "--out", str(tmp_path / "out")]
    if "VAE" in case:                                                    # swap in the other family's VAE
        shutil.rmtree(folder / "vae")
        cfg = {} if case.startswith("sigma") else dict(scaling_factor=0.13025, force_upcast=False)
        diffusers_vae(**cfg).save_pretrained(folder / "vae")
        want = ("scaled by 0.13025 .*SDXL.* scales by 0.18215: use the VAE of PixArt-alpha/pixart_sigma_sdxlvae"
                if case.startswith("sigma") else "scaled by 0.18215 .*SD's.* scales by 0.13025: use the VAE of")
    else:                                                                # native 16 px: 64 x 64 is 16 times the area
        argv += ["--height", "64", "--width", "64"]
        want = "64x64 is 16.0 times the area .* PixArt-Sigma-XL-2-2K-MS"
    with pytest.raises(SystemExit) as e:
        sample_py.main(argv)
    assert e.value.code == 2
    import re
    assert re.search(want, capsys.readouterr().err.replace("\n", " "))
