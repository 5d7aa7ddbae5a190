"""pixart_min's transformer, weight loading, samplers and training loss, checked against diffusers as the oracle.

1. Transformer parity: diffusers' PixArtTransformer2DModel with random weights, saved with save_pretrained,
   loaded with load_pixart, same outputs (tiny configs, then the full-size PixArt-XL-2 256 and 1024-MS).
2. The official .pth layout, our .safetensors files, and every kind of bad checkpoint.
3. Samplers: DPM-Solver++ and DDIM against diffusers' schedulers run in the pipeline's loop; DDPM's contract.
4. Training: the hybrid loss against an independent IDDPM formula, it trains, caption dropout,
   gradient checkpointing.

Every model is random: conftest's randomize_ overwrites the zero-initialised weights too, so that
nothing is compared through a zero. Max errors are printed; run with -s to see them.
"""

import contextlib
import copy
import dataclasses
import gc
import json
import math

import pytest
import torch
from torch import nn

import bench
import pixart_min
from conftest import diffusers_pixart, pixart_scheduler, randomize_, report
from pixart_min import PRESETS, PixArt, PixArtConfig, load_pixart, sample, save_pixart, training_loss


def max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


def reference(ref, x, t, y, mask, hw=None, ar=None):
    """diffusers' output for the same inputs, called the way its PixArt pipeline calls it."""
    with torch.no_grad():
        return ref(x, encoder_hidden_states=y, timestep=t, encoder_attention_mask=mask,
                   added_cond_kwargs={"resolution": hw, "aspect_ratio": ar}).sample


def inputs(B, H, W, L, caption_channels, seed=0, C=4, lengths=None):
    """Latents, timesteps, captions, a padded mask (a different real length per row) and micro-conditions."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g)
    t = torch.linspace(0, 999, B).round().long()                            # from clean to pure noise
    y = torch.randn(B, L, caption_channels, generator=g)
    lengths = lengths or [L - (i * (L - 1)) // max(B - 1, 1) for i in range(B)]   # L, ..., 1
    mask = (torch.arange(L)[None] < torch.tensor(lengths)[:, None]).long()  # (B, L), 1 = real token
    hw = torch.tensor([[8.0 * H, 8.0 * W]]).repeat(B, 1) + 64 * torch.arange(B)[:, None]   # pixels, per row
    ar = hw[:, :1] / hw[:, 1:]                                              # (B, 1) height / width
    return x, t, y, mask, hw, ar


def random_pixart(config, seed=0):
    """Our PixArt with every weight random (zero-initialised ones too) except pos_embed: that buffer is a
    fixed sin-cos table, which load_pixart recomputes rather than reads (checkpoints.md §1)."""
    model = PixArt(config)
    pos = model.pos_embed.clone()
    randomize_(model, seed)
    model.pos_embed.copy_(pos)
    return model.eval()


# ----------------------------------------------------------------------------------------------------
# 1. Transformer parity with diffusers
# ----------------------------------------------------------------------------------------------------

TINY_CASES = {  # diffusers config overrides -> (pe_interpolation we must infer, micro-conditions)
    "plain": (dict(), 1),
    "interp2": (dict(interpolation_scale=2), 2),
    "micro": (dict(use_additional_conditions=True), 1),                 # 2 heads x 24: hidden divides by 3
    "micro-interp2": (dict(use_additional_conditions=True, interpolation_scale=2), 2),
}


@pytest.mark.parametrize("case", TINY_CASES)
def test_tiny_transformer_matches_diffusers(case, tmp_path):
    cfg, interp = TINY_CASES[case]
    ref = diffusers_pixart(seed=1, **cfg)
    ref.save_pretrained(tmp_path / "pipe" / "transformer")                 # a pipeline folder's layout
    micro = cfg.get("use_additional_conditions", False)
    for folder in (tmp_path / "pipe", tmp_path / "pipe" / "transformer"):    # parent folder, model folder
        model = load_pixart(folder)
        assert not model.training
        assert model.config.micro_condition == micro
        assert model.config.pe_interpolation == interp
        assert model.config.num_heads == 2 and model.config.depth == 2
        # sample_size is 8: 8x8 uses the stored table, the others recompute it (the interpolation path)
        for H, W in [(8, 8), (8, 12), (12, 8), (16, 16)]:
            x, t, y, mask, hw, ar = inputs(B=3, H=H, W=W, L=7, caption_channels=32, seed=H * W)
            hw, ar = (hw, ar) if micro else (None, None)
            with torch.no_grad():
                ours = model(x, t, y, mask, hw, ar)
            theirs = reference(ref, x, t, y, mask, hw, ar)
            assert ours.shape == theirs.shape == (3, 8, H, W)
            assert report(f"tiny {case} {H}x{W} ({folder.name}/)", max_err(ours, theirs)) <= 1e-5
    # the comparison above can only catch a masking or micro-condition bug if those inputs matter
    with torch.no_grad():
        unmasked = model(x, t, y, None, hw, ar)
        assert max_err(unmasked[1:], ours[1:]) > 1e-3                       # rows 1, 2 have padding
        assert max_err(unmasked[0], ours[0]) <= 1e-5                         # row 0 is all real tokens
        if micro:
            assert max_err(model(x, t, y, mask, hw * 2, ar), ours) > 1e-3
            assert max_err(model(x, t, y, mask, hw, ar * 2), ours) > 1e-3


@pytest.mark.parametrize("case", ["plain", "micro-interp2"])
def test_to_diffusers_writes_what_diffusers_loads(case, tmp_path):
    """bench.to_diffusers and bench.diffusers_config run from_diffusers and config_from_diffusers backwards: diffusers
    builds its model from our config and loads our weights strictly, and computes what we compute."""
    from diffusers import PixArtTransformer2DModel

    ref = diffusers_pixart(seed=2, **TINY_CASES[case][0])
    ref.save_pretrained(tmp_path / "transformer")
    model = load_pixart(tmp_path / "transformer")
    theirs = PixArtTransformer2DModel(**bench.diffusers_config(model.config)).eval()
    theirs.load_state_dict(bench.to_diffusers(model.state_dict()), strict=True)
    assert pixart_min.config_from_diffusers(dict(theirs.config)) == pixart_min.config_from_diffusers(dict(ref.config))
    for k, v in ref.state_dict().items():
        assert torch.equal(theirs.state_dict()[k], v), k
    x, t, y, mask, hw, ar = inputs(B=2, H=8, W=8, L=7, caption_channels=32, seed=3)
    hw, ar = (hw, ar) if model.config.micro_condition else (None, None)
    assert max_err(reference(theirs, x, t, y, mask, hw, ar), reference(ref, x, t, y, mask, hw, ar)) == 0


def test_bench_times_the_same_work_on_both_sides():
    """bench.py end to end on the toy size: three jobs, each timed for ours and diffusers; and the two sampling
    loops it times return the same latents, so the ratio compares like with like."""
    rows = bench.main(["--sizes", "toy", "--repeats", "2", "--steps", "3"])
    assert [r["job"] for r in rows] == ["forward", "3-step loop", "train step"]
    for r in rows:
        assert r["ours"]["seconds"] > 0 and r["diffusers"]["seconds"] > 0
        assert r["ratio"] == pytest.approx(r["ours"]["seconds"] / r["diffusers"]["seconds"])
    ours, theirs = bench.twins(PRESETS["toy"])
    jobs = bench.jobs(ours, theirs, PRESETS["toy"], 32, 24, "cpu", torch.float32, 3, 2)
    our_loop, their_loop, _ = jobs["3-step loop"]
    a, b = our_loop(), their_loop()
    assert max_err(a, b) <= 1e-4 * b.abs().max().item()


@pytest.mark.parametrize("argv, message", [(["--device", "gpu"], "--device 'gpu': cpu, cuda or cuda:N"),
                                           (["--steps", "1000"], "--steps from 2 to 999"),
                                           (["--json", "/no/such/folder/x.json"], "no folder /no/such/folder")])
def test_bench_names_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("device, index", [("cuda", 0), ("cuda:1", 1)])
def test_bench_selects_the_card_it_is_given(device, index, monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: chosen.append("name") or "a card")
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(bench, "run", lambda *a: None)                      # no GPU here: stop before the timing
    bench.main(["--device", device, "--sizes", "toy"])
    assert chosen[0] == index


def test_bench_knows_a_cards_peak_only_by_its_whole_name(monkeypatch):
    for name, peak in [("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA A100-SXM4-80GB", 312),
                       ("NVIDIA H100 NVL", None), ("NVIDIA RTX A1000 6GB Laptop GPU", None), ("NVIDIA A10G", None)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: name)
        assert bench.peak_tflops("cuda") == peak, name


def test_tensor_bytes_counts_the_tensors_alive_at_once():
    """bench.TensorBytes, the CPU's peak memory: new storages count from creation to release, including the
    ones only autograd still holds; views and in-place results are not new memory."""
    with bench.TensorBytes() as counted:
        a = torch.ones(1000)                                      # 4000 bytes
        b = a * 2                                                 # 8000 alive
        del b
        c = (a + 1).view(10, 100)                                 # 8000 again
        c.add_(1)
    assert (counted.peak, counted.now) == (8000, 8000)
    w = torch.randn(1000, 1000, requires_grad=True)
    with bench.TensorBytes() as counted:
        x = torch.randn(10, 1000)
        s = (x @ w).exp().sum()             # autograd keeps x (for w's gradient) and exp's result, not x @ w
        del x
        held = counted.now
        s.backward()
    assert held == 2 * 10 * 1000 * 4 + 4 and counted.now == w.numel() * 4 + 4     # then: w.grad and s
    assert counted.peak >= counted.now + 10 * 1000 * 4                 # the gradient of x @ w, alive for a while


@contextlib.contextmanager
def no_random_init():
    """Skip torch's and our random initialisation while building 0.6B models. Every weight is overwritten
    right after (randomize_ on diffusers' side, a strict load on ours), so the values never mattered;
    on a 2-core CPU this saves about 15 s per test. The small tests run the normal initialisation."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nn.Linear, "reset_parameters", lambda self: None)
        mp.setattr(nn.Conv2d, "reset_parameters", lambda self: None)
        mp.setattr(PixArt, "initialize_weights", lambda self: None)
        yield


def count_parameters(preset):
    with torch.device("meta"):                                               # shapes only, no memory
        return sum(p.numel() for p in PixArt(PRESETS[preset]).parameters())


XL = dict(num_layers=28, num_attention_heads=16, attention_head_dim=72, caption_channels=4096)
FULL_CASES = {  # preset -> (diffusers config, latent H, W, our parameter count, save_pretrained shard size)
    "PixArt-XL-2-256": (dict(XL, sample_size=32), 32, 32, 610_856_096, "10GB"),
    # the hub config has no interpolation_scale: with sample_size 128 both sides must infer 2
    "PixArt-XL-2-1024-MS": (dict(XL, sample_size=128, use_additional_conditions=True), 16, 16, 611_349_152, "1GB"),
    # PixArt-Sigma's hub configs: the transformer alone says Sigma by its 256 px scale 0.5 or by the 2K size
    "PixArt-Sigma-XL-2-256x256": (dict(XL, sample_size=32, interpolation_scale=0.5), 32, 32, 610_856_096, "10GB"),
    "PixArt-Sigma-XL-2-2K-MS": (dict(XL, sample_size=256, interpolation_scale=4, use_additional_conditions=False),
                                16, 16, 610_856_096, "10GB"),
}


@pytest.mark.parametrize("preset", FULL_CASES)
def test_full_size_transformer_matches_diffusers(preset, tmp_path):
    cfg, H, W, n_params, shard = FULL_CASES[preset]
    assert count_parameters(preset) == n_params                             # the paper's 611M

    with no_random_init():
        ref = diffusers_pixart(seed=2, **cfg)
    ref.save_pretrained(tmp_path, max_shard_size=shard)                     # 1GB: three shards and an index
    x, t, y, mask, hw, ar = inputs(B=1, H=H, W=W, L=120, caption_channels=4096, seed=3, lengths=[37])
    t = torch.tensor([500])
    hw, ar = (hw, ar) if cfg.get("use_additional_conditions") else (None, None)
    theirs = reference(ref, x, t, y, mask, hw, ar)
    del ref                                                                 # one 2.4 GB model at a time
    gc.collect()

    with no_random_init():
        model = load_pixart(tmp_path)
    assert model.config == PRESETS[preset]
    assert sum(p.numel() for p in model.parameters()) == n_params
    with torch.no_grad():
        ours = model(x, t, y, mask, hw, ar)
    del model
    gc.collect()
    assert theirs.abs().max() < 100                                         # O(1) outputs: abs error means something
    assert report(f"{preset} latent {H}x{W}", max_err(ours, theirs)) <= 1e-4


# ----------------------------------------------------------------------------------------------------
# 2. Checkpoint files: the official .pth, our .safetensors, and bad input
# ----------------------------------------------------------------------------------------------------

def assert_same_model(a, b, *args):
    assert a.config == b.config
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    with torch.no_grad():
        assert torch.equal(a(*args), b(*args))


def test_official_pth_round_trip(tmp_path):
    model = random_pixart(PRESETS["tiny"], seed=4)
    sd = model.state_dict()
    assert "pos_embed" in sd and "y_embedder.y_embedding" in sd             # as in the released files
    torch.save({"state_dict": sd}, tmp_path / "x.pth")                      # the official wrapper
    torch.save(sd, tmp_path / "plain.pth")                                  # a bare state dict (DiT's style)
    x, t, y, mask, _, _ = inputs(B=2, H=8, W=12, L=120, caption_channels=32, seed=5)
    for name in ("x.pth", "plain.pth"):
        # a .pth holds no config and weights do not tell the head count: the caller names it
        loaded = load_pixart(tmp_path / name, num_heads=2)
        assert not loaded.training
        assert loaded.has_null_caption                                      # y_embedding came with the file
        assert_same_model(loaded, model, x, t, y, mask)


def test_safetensors_round_trip_keeps_config(tmp_path):
    config = PixArtConfig(input_size=12, patch_size=2, in_channels=3, hidden_size=48, depth=3, num_heads=4,
                          mlp_ratio=2.0, caption_channels=24, model_max_length=16, learn_sigma=False,
                          micro_condition=True, pe_interpolation=0.5, class_dropout_prob=0.25, prediction="v")
    model = random_pixart(config, seed=6)
    save_pixart(model, tmp_path / "m.safetensors")
    loaded = load_pixart(tmp_path / "m.safetensors")
    assert (loaded.config.num_heads, loaded.config.prediction) == (4, "v")  # not in any tensor's shape
    with pytest.raises(ValueError, match="prediction must be 'epsilon' or 'v', got 'x0'"):
        load_pixart(tmp_path / "m.safetensors", prediction="x0")
    x, t, y, mask, hw, ar = inputs(B=2, H=12, W=8, L=16, caption_channels=24, C=3, seed=7)
    assert_same_model(loaded, model, x, t, y, mask, hw, ar)


@pytest.fixture
def tiny_sd():
    return random_pixart(PRESETS["tiny"], seed=8).state_dict()


def save_pth(path, sd):
    torch.save({"state_dict": sd}, path)
    return path


def test_bad_checkpoint_contents(tiny_sd, tmp_path):
    def load(sd, **kw):
        return load_pixart(save_pth(tmp_path / "bad.pth", sd), num_heads=2, **kw)

    sd = dict(tiny_sd)
    del sd["blocks.1.attn.qkv.weight"]
    with pytest.raises(ValueError, match=r"missing: blocks\.1\.attn\.qkv\.weight"):
        load(sd)

    sd = dict(tiny_sd, **{"blocks.0.attn.extra": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"unexpected: blocks\.0\.attn\.extra"):
        load(sd)

    sd = dict(tiny_sd, **{"blocks.0.attn.proj.bias": torch.zeros(31)})
    with pytest.raises(ValueError, match=r"wrong shape: blocks\.0\.attn\.proj\.bias is \(31,\)"):
        load(sd)

    # several problems at once: all of them are named, not only the first
    sd = dict(tiny_sd, extra=torch.zeros(1))
    del sd["blocks.0.mlp.fc2.bias"]
    with pytest.raises(ValueError, match=r"(?s)missing: blocks\.0\.mlp\.fc2\.bias.*unexpected: extra"):
        load(sd)

    # pos_embed of a grid that no square latent gives, of the wrong width, or not the input_size asked for
    for shape, kw in [((1, 20, 32), {}), ((1, 16, 48), {}), ((1, 36, 32), dict(input_size=8))]:
        with pytest.raises(ValueError, match=r"pos_embed is \(1, \d+, \d+\)"):
            load(dict(tiny_sd, pos_embed=torch.zeros(shape)), **kw)

    with pytest.raises(ValueError, match="not a PixArt checkpoint"):          # a foreign file
        load({"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3), "encoder.conv_in.bias": torch.zeros(8)})


def test_bad_checkpoint_files(tiny_sd, tmp_path):
    for path in (save_pth(tmp_path / "x.pth", tiny_sd), tmp_path / "x.safetensors"):
        if path.suffix == ".safetensors":
            save_pixart(random_pixart(PRESETS["tiny"]), path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])                             # an interrupted download
        with pytest.raises(ValueError, match=r"(?s)cannot read .*truncated"):
            load_pixart(path)

    (tmp_path / "notes.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="cannot read"):
        load_pixart(tmp_path / "notes.pth")

    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="holds a list, not a state dict"):
        load_pixart(tmp_path / "list.pth")

    with pytest.raises(FileNotFoundError, match="no such file"):
        load_pixart(tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match="config.json"):              # a folder without the model
        load_pixart(tmp_path)


def test_null_caption_depends_on_the_format(pipeline_dir, tiny_sd, tmp_path):
    x, _, y, mask, _, _ = inputs(B=2, H=8, W=8, L=120, caption_channels=32, seed=9)
    diffusers_model = load_pixart(pipeline_dir)
    assert diffusers_model.has_null_caption is False                        # diffusers drops y_embedding
    with pytest.raises(ValueError, match="null_y"):
        sample(diffusers_model, x, y, mask, steps=2)
    save_pixart(diffusers_model, tmp_path / "converted.safetensors")        # its random y_embedding is not
    converted = load_pixart(tmp_path / "converted.safetensors")             # written, so it is not taken
    assert converted.has_null_caption is False                              # for a null caption after a reload
    with pytest.raises(ValueError, match="null_y"):
        sample(converted, x, y, mask, steps=2)
    null_y, null_mask = y.flip(0), mask.flip(0)
    assert torch.equal(sample(converted, x, y, mask, null_y=null_y, null_mask=null_mask, steps=2),
                       sample(diffusers_model, x, y, mask, null_y=null_y, null_mask=null_mask, steps=2))

    official = load_pixart(save_pth(tmp_path / "x.pth", tiny_sd), num_heads=2)
    assert official.has_null_caption is True
    # without null_y the official guidance: the model's fixed null caption, with the prompt's own mask
    null_y = official.y_embedder.y_embedding[None].expand_as(y)
    assert torch.equal(sample(official, x, y, mask, steps=3),
                       sample(official, x, y, mask, null_y=null_y, null_mask=mask, steps=3))


# ----------------------------------------------------------------------------------------------------
# 3. Samplers
# ----------------------------------------------------------------------------------------------------

class Denoiser(PixArt):
    """A loaded PixArt whose eps output is the ideal denoiser of N(0, I) data, sqrt(1 - abar_t) x_t, plus
    0.1 x the network's. A random network's eps has nothing to do with x_t, so samplers turn it into
    latents of size ~1000 (x0 = (x_t - sigma eps) / alpha, with alpha_999 = 0.006), where float32 alone
    leaves errors of ~1e-3. With this shift the latents stay O(1) and an absolute 1e-4 means something,
    while the text, mask and guidance still change the result by O(1). Both loops use this same model."""

    def forward(self, x, t, *args, **kwargs):
        out = super().forward(x, t, *args, **kwargs)
        C = self.config.in_channels
        a = pixart_min.ALPHAS_CUMPROD.to(x)[t][:, None, None, None]
        return torch.cat([(1 - a).sqrt() * x + 0.1 * out[:, :C], out[:, C:]], dim=1)


class VDenoiser(PixArt):
    """The same idea for a v-prediction model: v = 0.1 x the network's output - x_t keeps the clean-picture
    estimate sqrt(abar) x_t - sqrt(1 - abar) v within 1.5 x_t, so the latents stay O(1)."""

    def forward(self, x, t, *args, **kwargs):
        out = super().forward(x, t, *args, **kwargs)
        C = self.config.in_channels
        return torch.cat([0.1 * out[:, :C] - x, out[:, C:]], dim=1)


def as_denoiser(model, kind=Denoiser, **config):
    """model's weights in a Denoiser (or VDenoiser), with some config fields changed if given."""
    out = kind(dataclasses.replace(model.config, **config))
    out.load_state_dict(model.state_dict())
    out.has_null_caption = model.has_null_caption
    return out.eval()


def diffusers_loop(scheduler, model, noise, y, mask, null_y, null_mask, steps, cfg_scale, hw=None, ar=None):
    """The sampling loop of diffusers' PixArtAlphaPipeline, around our model."""
    scheduler.set_timesteps(steps)
    latents, B, C = noise * scheduler.init_noise_sigma, len(noise), noise.shape[1]
    cond = dict(hw=None if hw is None else torch.cat([hw, hw]), ar=None if ar is None else torch.cat([ar, ar]))
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        with torch.no_grad():
            out = model(inp, t.expand(2 * B), torch.cat([null_y, y]), torch.cat([null_mask, mask]), **cond)
        uncond, text = out.chunk(2)                                          # batched [uncond, cond]
        out = uncond + cfg_scale * (text - uncond)
        latents = scheduler.step(out.chunk(2, dim=1)[0], t, latents).prev_sample  # eps: first half
    return latents


def ddim_scheduler(prediction_type="epsilon"):
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
                         prediction_type=prediction_type, timestep_spacing="trailing", clip_sample=False,
                         set_alpha_to_one=True)


@pytest.fixture(scope="module")
def sampler_setup(tmp_path_factory):
    """The tiny model loaded from a diffusers folder (as a Denoiser), a negative prompt and two captions."""
    folder = tmp_path_factory.mktemp("sampler_model")
    diffusers_pixart(seed=10).save_pretrained(folder)
    model = as_denoiser(load_pixart(folder))
    g = torch.Generator().manual_seed(11)
    noise = torch.randn(2, 4, 8, 12, generator=g)
    y, null_y = torch.randn(2, 6, 32, generator=g), torch.randn(2, 6, 32, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    null_mask = torch.tensor([[1, 0, 0, 0, 0, 0]] * 2)                      # "" -> "</s>" and padding
    return model, noise, y, mask, null_y, null_mask


def test_timesteps_match_the_hub_scheduler():
    for steps in (1, 5, 7, 10, 20, 25, 50, 100, 1000):
        scheduler = pixart_scheduler()
        scheduler.set_timesteps(steps)
        assert torch.equal(pixart_min.timesteps(steps), scheduler.timesteps.long()), steps


def test_sample_from_a_later_start(sampler_setup):
    """start=t finishes a picture already noised to step t: the grid spaces t..0 as it spaces 999..0, and one
    step from t returns the model's clean-picture estimate at t."""
    assert pixart_min.timesteps(10, start=500).tolist() == list(range(500, 0, -50))
    model, noise, y, mask, null_y, null_mask = sampler_setup
    t, a = 300, pixart_min.ALPHAS_CUMPROD[300].item()
    eps = model(noise, torch.full((2,), t), y, mask)[:, :4]                 # guidance 1: the caption's own eps
    x0 = sample(model, noise, y, mask, null_y=null_y, null_mask=null_mask, steps=1, cfg_scale=1, sampler="ddim",
                start=t)
    assert max_err(x0, (noise - math.sqrt(1 - a) * eps) / math.sqrt(a)) <= 1e-4
    with pytest.raises(ValueError, match="steps must be an integer from 1 to 5,"):
        sample(model, noise, y, mask, null_y=null_y, null_mask=null_mask, steps=6, start=5)
    with pytest.raises(ValueError, match="start must be a step from 1 to 999"):
        sample(model, noise, y, mask, null_y=null_y, null_mask=null_mask, start=1000)


@pytest.mark.parametrize("steps", [20, 10, 5, 7])
def test_dpm_solver_matches_diffusers(sampler_setup, steps):
    model, noise, y, mask, null_y, null_mask = sampler_setup
    ours = sample(model, noise, y, mask, null_y=null_y, null_mask=null_mask, steps=steps, cfg_scale=4.5)
    theirs = diffusers_loop(pixart_scheduler(), model, noise, y, mask, null_y, null_mask, steps, 4.5)
    assert theirs.abs().max() < 20
    assert report(f"dpm-solver {steps} steps", max_err(ours, theirs)) <= 1e-4
    # guidance must matter, or this comparison could not see it done wrong
    assert max_err(ours, sample(model, noise, y, mask, null_y=null_y, null_mask=null_mask, steps=steps,
                                cfg_scale=1.0)) > 1e-2


def test_dpm_solver_matches_diffusers_with_micro_conditions(tmp_path):
    diffusers_pixart(seed=12, use_additional_conditions=True, interpolation_scale=2).save_pretrained(tmp_path)
    model = as_denoiser(load_pixart(tmp_path))
    B, H, W = 2, 8, 12
    noise, _, y, mask, hw, ar = inputs(B=B, H=H, W=W, L=5, caption_channels=32, seed=13)
    null_y, null_mask = torch.zeros_like(y), torch.zeros_like(mask)
    null_mask[:, 0] = 1
    ours = sample(model, noise, y, mask, null_y=null_y, null_mask=null_mask, hw=hw, ar=ar, steps=20)
    theirs = diffusers_loop(pixart_scheduler(), model, noise, y, mask, null_y, null_mask, 20, 4.5, hw, ar)
    assert report("dpm-solver 20 steps, micro-conditions", max_err(ours, theirs)) <= 1e-4


@pytest.mark.parametrize("steps", [20, 10, 5])
def test_ddim_matches_diffusers(sampler_setup, steps, monkeypatch):
    model, noise, y, mask, null_y, null_mask = sampler_setup
    # Our samplers share one grid, pixart_min.timesteps: the hub's "linspace" spacing, 999, 949, ..., 549,
    # 500, 450, ..., 50 for 20 steps, whose gaps are 49 or 50. diffusers' DDIMScheduler.step does not read
    # the next grid point; it computes it as t - 1000 // steps, which is only right on an evenly spaced
    # grid. So on the linspace grid the two would differ by design. We swap in the evenly spaced
    # "trailing" grid (999, 949, ..., 49) that DDIMScheduler(timestep_spacing="trailing") uses, and then
    # the update rules themselves must agree.
    monkeypatch.setattr(pixart_min, "timesteps", lambda n, start, lcm=False: torch.arange(999, 0, -1000 // n))
    ours = sample(model, noise, y, mask, null_y=null_y, null_mask=null_mask, steps=steps, sampler="ddim")
    scheduler = ddim_scheduler()
    theirs = diffusers_loop(scheduler, model, noise, y, mask, null_y, null_mask, steps, 4.5)
    assert torch.equal(scheduler.timesteps, torch.arange(999, 0, -1000 // steps))
    assert theirs.abs().max() < 20
    assert report(f"ddim {steps} steps (trailing grid)", max_err(ours, theirs)) <= 1e-4


@pytest.mark.parametrize("sampler", ["dpm-solver", "ddim"])
def test_v_prediction_matches_diffusers(sampler_setup, sampler, monkeypatch):
    """A model that predicts v (the toy's target): our samplers against diffusers' with
    prediction_type="v_prediction"."""
    model, noise, y, mask, null_y, null_mask = sampler_setup
    vmodel = as_denoiser(model, VDenoiser, prediction="v")
    if sampler == "ddim":                                                  # the evenly spaced grid, as above
        monkeypatch.setattr(pixart_min, "timesteps", lambda n, start, lcm=False: torch.arange(999, 0, -1000 // n))
    scheduler = pixart_scheduler("v_prediction") if sampler == "dpm-solver" else ddim_scheduler("v_prediction")
    ours = sample(vmodel, noise, y, mask, null_y=null_y, null_mask=null_mask, steps=10, sampler=sampler)
    theirs = diffusers_loop(scheduler, vmodel, noise, y, mask, null_y, null_mask, 10, 4.5)
    assert report(f"{sampler} 10 steps, v-prediction", max_err(ours, theirs)) <= 1e-4
    # read as eps, the same outputs give another picture: the sampler does read the config
    vmodel.config.prediction = "epsilon"
    assert max_err(ours, sample(vmodel, noise, y, mask, null_y=null_y, null_mask=null_mask, steps=10,
                                sampler=sampler)) > 1e-2


def test_ddpm_and_guidance_scale_zero(sampler_setup):
    model, noise, y, mask, null_y, null_mask = sampler_setup
    kw = dict(null_y=null_y, null_mask=null_mask, steps=10, sampler="ddpm")
    a = sample(model, noise, y, mask, generator=torch.Generator().manual_seed(0), **kw)
    b = sample(model, noise, y, mask, generator=torch.Generator().manual_seed(0), **kw)
    c = sample(model, noise, y, mask, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)                                                 # the generator fixes the noise
    assert max_err(a, c) > 1e-2                                              # and the noise matters

    # cfg_scale 0: only the unconditional branch is left, so the captions do not matter
    kw = dict(null_y=null_y, null_mask=null_mask, steps=10, sampler="ddim")
    zero = sample(model, noise, y, mask, cfg_scale=0.0, **kw)
    null_only = sample(model, noise, null_y, null_mask, cfg_scale=1.0, **kw)
    assert report("ddim cfg 0 vs null caption alone", max_err(zero, null_only)) <= 1e-5    # float rounding
    assert max_err(zero, sample(model, noise, y, mask, cfg_scale=1.0, **kw)) > 1e-2


def lcm_scheduler():
    """LCMScheduler as PixArt-LCM's training script validates with (train_scripts/train_pixart_lcm.py: linear betas
    1e-4 .. 0.02, epsilon, set_timesteps(steps, 50)); the other settings are LCMScheduler's defaults: 50 original
    steps, "leading" spacing, timestep_scaling 10, set_alpha_to_one."""
    from diffusers import LCMScheduler

    return LCMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", prediction_type="epsilon")


@pytest.mark.parametrize("steps", [4, 1, 2, 3, 8])
def test_lcm_matches_diffusers(sampler_setup, steps):
    """PixArt-LCM's loop as diffusers' PixArtAlphaPipeline runs it at guidance_scale 0 (no guidance: the captioned
    prediction alone), each step's fresh noise drawn from the same generator."""
    model, noise, y, mask, _, _ = sampler_setup
    scheduler, g = lcm_scheduler(), torch.Generator().manual_seed(13)
    scheduler.set_timesteps(steps)
    assert torch.equal(scheduler.timesteps, pixart_min.timesteps(steps, lcm=True))   # 999, 759, 499, 259 for 4
    latents = noise.clone()
    for t in scheduler.timesteps:
        with torch.no_grad():
            out = model(latents, t.expand(len(noise)), y, mask)
        latents = scheduler.step(out.chunk(2, dim=1)[0], t, latents, generator=g).prev_sample
    ours = sample(model, noise, y, mask, steps=steps, cfg_scale=1, sampler="lcm",
                  generator=torch.Generator().manual_seed(13))
    err = max_err(ours, latents) / latents.abs().max().item()
    assert report(f"lcm {steps} steps (relative)", err) <= 1e-5
    if steps > 1:                                                            # the fresh noise matters
        other = sample(model, noise, y, mask, steps=steps, cfg_scale=1, sampler="lcm",
                       generator=torch.Generator().manual_seed(14))
        assert max_err(ours, other) > 1e-3


def test_lcm_rejects_what_it_cannot_use(sampler_setup):
    model, noise, y, mask, null_y, null_mask = sampler_setup
    for bad in [dict(cfg_scale=4.5, null_y=null_y, null_mask=null_mask), dict(start=500, steps=4), dict(steps=51)]:
        with pytest.raises(ValueError, match="lcm takes no guidance .* cfg_scale=1.* 1 to 50 steps"):
            sample(model, noise, y, mask, sampler="lcm", **{"cfg_scale": 1, **bad})


def test_sample_rejects_bad_arguments(sampler_setup):
    model, noise, y, mask, null_y, null_mask = sampler_setup
    kw = dict(null_y=null_y, null_mask=null_mask)
    for bad, match in [(dict(steps=0), "steps"), (dict(steps=1.5), "steps"), (dict(steps=1001), "steps"),
                       (dict(cfg_scale=float("nan")), "guidance"), (dict(cfg_scale=float("inf")), "guidance"),
                       (dict(sampler="euler"), "sampler 'euler'"),
                       (dict(generator=[torch.Generator()], sampler="ddpm"), "1 generators for 2 pictures"),
                       (dict(null_y=null_y[:1], null_mask=null_mask[:1]), "1 null captions for 2 captions"),
                       (dict(known=(noise[:1], noise > 0)), "known=.latents, keep. needs latents of the noise's"),
                       (dict(known=(noise, (noise > 0).float())), "bool keep")]:
        with pytest.raises(ValueError, match=match):
            sample(model, noise, y, mask, **{**kw, **bad})
    assert torch.equal(sample(model, noise, y, mask, steps=2.0, **kw), sample(model, noise, y, mask, steps=2, **kw))
    own = PixArt(PRESETS["tiny"]).eval()                                     # the null caption is 120 tokens long
    with pytest.raises(ValueError, match="captions of 121 tokens, but this model reads at most 120"):
        sample(own, noise, torch.randn(2, 121, 32), torch.ones(2, 121), steps=2)
    with pytest.raises(ValueError, match=r"model.eval\(\)"):                # training mode drops captions at random
        sample(own.train(), noise, y, mask, steps=2)


def test_inpainting_keeps_the_known_latents_and_paints_the_rest(sampler_setup):
    model, noise, y, mask, null_y, null_mask = sampler_setup
    kw = dict(null_y=null_y, null_mask=null_mask, steps=5)
    original = torch.randn(noise.shape, generator=torch.Generator().manual_seed(7))
    keep = torch.zeros(1, 1, *noise.shape[-2:], dtype=torch.bool)
    keep[..., : noise.shape[-1] // 2] = True                                # the left half: known
    out = sample(model, noise, y, mask, known=(original, keep), **kw)
    assert torch.equal(out[..., keep[0, 0]], original[..., keep[0, 0]])    # kept to the last bit
    nothing = sample(model, noise, y, mask, known=(original, torch.zeros_like(keep)), **kw)
    assert torch.equal(nothing, sample(model, noise, y, mask, **kw))        # nothing known: plain sampling
    assert max_err(out[..., ~keep[0, 0]], nothing[..., ~keep[0, 0]]) > 1e-3  # the painted half sees the known one


def test_another_models_transformer_folder_is_named(tmp_path):
    from safetensors.torch import save_file
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "SD3Transformer2DModel", "sample_size": 128}))
    save_file({"pos_embed.proj.weight": torch.zeros(1)}, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ValueError, match=r"not a PixArt transformer: its config.json \(SD3Transformer2DModel\)"):
        load_pixart(tmp_path)


def test_a_model_without_learned_sigma_is_named_where_it_needs_one():
    model = PixArt(dataclasses.replace(PRESETS["tiny"], learn_sigma=False)).eval()     # diffusers allows it
    x, y = torch.randn(1, 4, 8, 8), torch.randn(1, 6, 32)
    with pytest.raises(ValueError, match="does not learn sigma: use dpm-solver or ddim"):
        sample(model, x, y, None, null_y=y, null_mask=None, steps=2, sampler="ddpm")
    with pytest.raises(ValueError, match="must learn sigma"):
        training_loss(model, x, y)
    assert sample(model, x, y, None, null_y=y, null_mask=None, steps=2).shape == x.shape    # the others need none


def test_sample_null_y_without_null_mask(sampler_setup):
    model, noise, y, mask, null_y, _ = sampler_setup
    with pytest.raises(ValueError, match="null_mask"):
        sample(model, noise, y, mask, null_y=null_y, steps=2)


# ----------------------------------------------------------------------------------------------------
# 4. Training
# ----------------------------------------------------------------------------------------------------

def reference_hybrid_loss(eps, v, x0, noise, t, decoder_nll=True):
    """IDDPM's hybrid loss (Nichol & Dhariwal 2021), float64, written from the paper's formulas with
    torch.distributions: MSE on eps, plus the bound term with the mean detached (in bits):
    KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) for t > 0, the discretised decoder NLL of x0 at t = 0
    (or, with decoder_nll=False, the KL there too, against the clipped posterior variance)."""
    from torch.distributions import Normal, kl_divergence

    eps, v, x0, noise = (a.double() for a in (eps, v, x0, noise))
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    post_logvar_clipped = torch.cat([post_var[1:2], post_var[1:]]).log()   # var_0 = 0: use var_1
    c1 = betas * abar_prev.sqrt() / (1 - abar)                               # posterior mean coefficients
    c2 = (1 - abar_prev) * (1 - betas).sqrt() / (1 - abar)
    sh = lambda a: a[t][:, None, None, None]                                  # noqa: E731
    xt = sh(abar).sqrt() * x0 + (1 - sh(abar)).sqrt() * noise
    x0_pred = (xt - (1 - sh(abar)).sqrt() * eps) / sh(abar).sqrt()
    frac = (v + 1) / 2                                                        # learned range
    logvar = frac * sh(betas.log()) + (1 - frac) * sh(post_logvar_clipped)
    model = Normal(sh(c1) * x0_pred + sh(c2) * xt, (0.5 * logvar).exp())
    true = Normal(sh(c1) * x0 + sh(c2) * xt, (0.5 * sh(post_logvar_clipped)).exp())
    kl = kl_divergence(true, model)
    upper = torch.where(x0 > 0.999, torch.ones_like(x0), model.cdf(x0 + 1 / 255))
    lower = torch.where(x0 < -0.999, torch.zeros_like(x0), model.cdf(x0 - 1 / 255))
    nll = -(upper - lower).clamp(min=1e-12).log()
    vb = torch.where((t[:, None, None, None] == 0) & decoder_nll, nll, kl).mean(dim=(1, 2, 3)) / math.log(2)
    mse = ((noise - eps) ** 2).mean(dim=(1, 2, 3))
    return (mse + vb).mean()


def hybrid_case():
    """x0 in [-1, 1] (some exactly at the ends), noise, and a stand-in network whose output is a leaf tensor
    (eps near the noise, variance channel in [-1, 1]), so that the loss and its gradients are checkable."""
    B, C, H, W = 4, 4, 6, 6
    g = torch.Generator().manual_seed(14)
    x0 = (torch.rand(B, C, H, W, generator=g) * 2.2 - 1.1).clamp(-1, 1)
    noise = torch.randn(B, C, H, W, generator=g)
    out = nn.Parameter(torch.cat([noise + 0.3 * torch.randn(B, C, H, W, generator=g),
                                  torch.rand(B, C, H, W, generator=g) * 2 - 1], dim=1))
    return x0, noise, out, lambda xt, t, y, mask, hw, ar: out


def relative_loss_error(t):
    x0, noise, out, network = hybrid_case()
    C = x0.shape[1]
    loss = training_loss(network, x0, None, t=t, noise=noise)
    expected = reference_hybrid_loss(out[:, :C].detach(), out[:, C:].detach(), x0, noise, t)
    assert torch.isfinite(loss)
    return abs(loss.item() - expected.item()) / expected.item()


def test_hybrid_loss_matches_iddpm():
    # t = 0 is the decoder likelihood; at small t float32 costs up to ~5e-4 (see the precision test below),
    # while a wrong term or variance range is off by percents
    for t, tol in [([0, 0, 0, 0], 1e-3), ([0, 1, 2, 10], 1e-3), ([100, 300, 600, 999], 1e-5)]:
        assert report(f"hybrid loss (relative), t={t}", relative_loss_error(torch.tensor(t))) <= tol

    x0, noise, out, network = hybrid_case()
    B, C = x0.shape[:2]
    for t in (torch.zeros(B, dtype=torch.long), torch.tensor([0, 1, 500, 999])):
        out.grad = None
        training_loss(network, x0, None, t=t, noise=noise).backward()
        # eps learns from the MSE alone (the bound's mean is detached); the variance only from the bound
        mse_grad = -2 * (noise - out[:, :C].detach()) / out[:, :C].numel()
        assert torch.allclose(out.grad[:, :C], mse_grad, atol=1e-9)
        assert out.grad[:, C:].abs().min() > 0

    # the t = 0 check above can fail: there the decoder likelihood and a KL are far apart
    t = torch.zeros(B, dtype=torch.long)
    kl_at_0 = reference_hybrid_loss(out[:, :C].detach(), out[:, C:].detach(), x0, noise, t, decoder_nll=False)
    assert abs(kl_at_0.item() - training_loss(network, x0, None, t=t, noise=noise).item()) > 1e-2


def test_hybrid_loss_with_v_prediction():
    """prediction="v": the MSE is on v = sqrt(abar) eps - sqrt(1 - abar) x0, and the bound reads the eps it implies."""
    x0, noise, out, network = hybrid_case()
    C, t = x0.shape[1], torch.tensor([1, 100, 500, 999])
    a = pixart_min.ALPHAS_CUMPROD[t].view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise                              # float64 from here on
    v_hat, var = out[:, :C].detach().double(), out[:, C:].detach().double()
    eps_hat = a.sqrt() * v_hat + (1 - a).sqrt() * xt
    v_mse = ((a.sqrt() * noise - (1 - a).sqrt() * x0 - v_hat) ** 2).mean()
    eps_mse = ((noise - eps_hat) ** 2).mean()
    expected = reference_hybrid_loss(eps_hat, var, x0, noise, t) - eps_mse + v_mse
    loss = training_loss(network, x0, None, t=t, noise=noise, prediction="v")
    assert report("hybrid loss with v (relative)", abs(loss.item() - expected.item()) / expected.item()) <= 1e-5
    out.grad = None
    loss.backward()                                                          # the mean learns from the v-MSE alone
    v_true = (a.sqrt() * noise - (1 - a).sqrt() * x0).float()
    assert torch.allclose(out.grad[:, :C], -2 * (v_true - out[:, :C].detach()) / out[:, :C].numel(), atol=1e-9)
    # the same outputs read as eps give another loss: the prediction argument is not ignored
    assert abs(training_loss(network, x0, None, t=t, noise=noise).item() - loss.item()) > 1e-2


def test_training_loss_trains_the_models_own_target():
    model = random_pixart(dataclasses.replace(PRESETS["tiny"], prediction="v"), seed=3)
    x0, t, y, mask, _, _ = inputs(B=2, H=8, W=8, L=6, caption_channels=32, seed=4)
    noise = torch.randn_like(x0)
    loss = lambda **kw: training_loss(model, x0, y, mask, t=t, noise=noise, **kw).item()
    assert loss() == loss(prediction="v") and abs(loss() - loss(prediction="epsilon")) > 1e-2


def test_a_config_whose_width_does_not_split_is_named():
    with pytest.raises(ValueError, match="hidden_size 30 must divide into 4 heads"):
        PixArt(dataclasses.replace(PRESETS["tiny"], hidden_size=30, num_heads=4))
    with pytest.raises(ValueError, match="and into 3"):
        PixArt(dataclasses.replace(PRESETS["tiny"], hidden_size=32, num_heads=2, micro_condition=True))


def test_hybrid_loss_precision_at_small_t():
    assert report("hybrid loss (relative), t=[1, 1, 1, 1]", relative_loss_error(torch.tensor([1] * 4))) <= 1e-5


def tiny_batch(seed=15, B=4):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, 4, 8, 8, generator=g) * 0.5
    y = torch.randn(B, 10, 32, generator=g)
    mask = (torch.arange(10)[None] < torch.tensor([10, 7, 4, 1])[:B, None]).long()
    t = torch.tensor([3, 250, 600, 990])[:B]
    noise = torch.randn(x0.shape, generator=g)
    return x0, y, mask, t, noise


def test_training_loss_decreases():
    torch.manual_seed(16)
    model = PixArt(PRESETS["tiny"]).train()                                 # the official initialisation
    x0, y, mask, t, noise = tiny_batch()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0)
    losses = []
    for _ in range(30):
        torch.manual_seed(17)                                               # the same caption dropout each step
        loss = training_loss(model, x0, y, mask, t=t, noise=noise)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"\n  training loss: {losses[0]:.3f} -> {losses[-1]:.3f}", end="")
    assert losses[-1] < 0.6 * losses[0]


def test_caption_dropout_uses_the_null_caption():
    model = random_pixart(PRESETS["tiny"], seed=18)
    x, t, y, mask, _, _ = inputs(B=3, H=8, W=8, L=120, caption_channels=32, seed=19)
    null = model.y_embedder.y_embedding[None].expand_as(y)
    with torch.no_grad():
        with_y, with_null = model(x, t, y, mask), model(x, t, null, mask)   # eval: no dropout
        assert max_err(with_y, with_null) > 1e-2                            # the caption matters
        assert torch.equal(model(x, t, y, mask, force_drop_ids=torch.ones(3)), with_null)   # unless asked for
        model.train()
        assert torch.allclose(model(x, t, y, mask, force_drop_ids=torch.ones(3)), with_null, atol=1e-6)
        assert torch.allclose(model(x, t, y, mask, force_drop_ids=torch.zeros(3)), with_y, atol=1e-6)
        mixed = model(x, t, y, mask, force_drop_ids=torch.tensor([1, 0, 1]))
        assert torch.allclose(mixed[[0, 2]], with_null[[0, 2]], atol=1e-6)
        assert torch.allclose(mixed[1], with_y[1], atol=1e-6)


def test_grad_checkpointing_changes_nothing():
    config = PixArtConfig(**{**vars(PRESETS["tiny"]), "depth": 3, "micro_condition": True, "hidden_size": 48})
    plain = random_pixart(config, seed=20).train()
    ckpt = copy.deepcopy(plain)
    ckpt.grad_checkpointing = True
    x0, y, mask, t, noise = tiny_batch()
    _, _, _, _, hw, ar = inputs(B=4, H=8, W=8, L=10, caption_channels=32)
    calls = {"plain": 0, "ckpt": 0}
    results = {}
    for name, model in (("plain", plain), ("ckpt", ckpt)):
        for block in model.blocks:
            block.register_forward_pre_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
        torch.manual_seed(21)                                               # the same caption dropout
        loss = training_loss(model, x0, y, mask, hw, ar, t=t, noise=noise)
        loss.backward()
        results[name] = (loss.detach(), {k: p.grad for k, p in model.named_parameters()})
    assert calls == {"plain": 3, "ckpt": 6}                                 # blocks recomputed in backward
    (l1, g1), (l2, g2) = results["plain"], results["ckpt"]
    assert torch.allclose(l1, l2, atol=1e-6, rtol=1e-6)
    assert g1.keys() == g2.keys()
    assert all(g1[k] is not None and torch.allclose(g1[k], g2[k], atol=1e-6, rtol=1e-6) for k in g1)
    report("grad checkpointing: gradients", max(max_err(g1[k], g2[k]) for k in g1))
