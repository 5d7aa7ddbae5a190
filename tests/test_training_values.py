"""train.py's values, not only its self-consistency (issue 31, item 4): the EMA update against its formula, the share
of dropped captions, AdamW's settings and clipping against the paper, the VAE's scale on cached latents against
diffusers' encoder, and the micro-conditions a 1024-MS-style model receives in real-data training. Everything is
driven through train.main and data.FolderData; train.py itself is not changed."""
import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

import data
import pixart_min as pm
import train
from conftest import diffusers_vae, write_t5_dir

FAST = ["--preset", "tiny", "--batch-size", "8", "--eval-every", "0", "--lr", "1e-3", "--warmup", "2"]


def recorded_forwards(monkeypatch):
    """PixArt.forward, recording the inputs of every training-mode call: x, hw, ar and force_drop_ids."""
    calls, forward = [], pm.PixArt.forward

    def recording(self, x, t, y, mask=None, hw=None, ar=None, force_drop_ids=None):
        if self.training:
            calls.append(dict(x=x.detach().clone(), hw=hw, ar=ar, drop=force_drop_ids))
        return forward(self, x, t, y, mask, hw, ar, force_drop_ids)

    monkeypatch.setattr(pm.PixArt, "forward", recording)
    return calls


@pytest.mark.parametrize("rate", [0.9999, 0.2])
def test_one_ema_update_is_its_formula(rate, tmp_path, monkeypatch):
    """After optimiser step n: ema = d * ema + (1 - d) * theta_n, with d = min(--ema, (1 + n) / (10 + n)): the
    paper's rate 0.9999, warmed up as TensorFlow's ExponentialMovingAverage(num_updates) does, so that a short run
    does not keep its random start. At n = 2 that is d = 3/12 for the paper's rate and d = 0.2 for --ema 0.2."""
    saved = {}

    def save_run(out, model, ema, opt, step, args, target=None):               # the weights at every save, by step
        saved[step] = [{k: p.detach().clone() for k, p in m.named_parameters()} for m in (model, ema)]

    monkeypatch.setattr(train, "save_run", save_run)
    train.main([*FAST, "--steps", "2", "--save-every", "1", "--ema", str(rate), "--out", str(tmp_path)])
    (theta1, ema1), (theta2, ema2) = saved[1], saved[2]
    d = min(rate, 3 / 12)
    for k in theta2:
        assert torch.allclose(ema2[k], d * ema1[k] + (1 - d) * theta2[k], rtol=0, atol=1e-6), k
    moved = [k for k in theta2 if not torch.equal(theta1[k], theta2[k])]
    assert len(moved) > len(theta2) // 2                                  # the step did change the weights


def test_a_tenth_of_the_captions_are_dropped(tmp_path, monkeypatch):
    """§2.2: 10% of captions become the null caption. Over 25 steps of 64 captions (1,600 draws, standard deviation
    0.75 points) the share is 10% +- 3 points, and each step draws its own."""
    calls = recorded_forwards(monkeypatch)
    train.main([*FAST, "--batch-size", "64", "--steps", "25", "--save-every", "25", "--image-size", "16",
                "--out", str(tmp_path)])
    drops = torch.stack([c["drop"] for c in calls])                        # (25, 64)
    assert drops.shape == (25, 64) and drops.dtype == torch.bool
    assert abs(drops.float().mean().item() - 0.1) <= 0.03
    assert len({tuple(d.tolist()) for d in drops}) == 25


def test_adamw_and_clipping_are_the_papers(tmp_path, monkeypatch):
    """The paper's appendix and official configs (reference/paper.md): AdamW with weight decay 0.03 and eps 1e-10
    on every parameter, gradient clipping at 1.0 (the base config; the stage configs use 0.01), EMA 0.9999 and 10%
    null captions are train.py's defaults; and the optimiser it builds is that one, stepping on gradients clipped
    to --clip (0.01 here, far below the raw norm) in total L2 norm."""
    args = train.parse_args(["--preset", "tiny"])
    assert (args.weight_decay, args.clip, args.ema, args.null_prob) == (0.03, 1.0, 0.9999, 0.1)
    steps, step = [], torch.optim.AdamW.step

    def recording(self, *a, **k):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        steps.append((self, torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item(), len(grads)))
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording)
    n_params = len(list(pm.PixArt(dataclasses.replace(pm.PRESETS["tiny"], caption_channels=64)).parameters()))
    train.main([*FAST, "--steps", "2", "--clip", "0.01", "--out", str(tmp_path)])
    opt = steps[0][0]
    assert type(opt) is torch.optim.AdamW and len(opt.param_groups) == 1 and len(steps) == 2
    group = opt.param_groups[0]
    assert (group["weight_decay"], group["eps"], group["betas"]) == (0.03, 1e-10, (0.9, 0.999))
    assert len(group["params"]) == n_params and all(n == n_params for _, _, n in steps)
    assert all(norm == pytest.approx(0.01, rel=1e-4) for _, norm, _ in steps)


# ----------------------------------------------------------------------------------------------------
# Real data: a folder of images, its cache, a micro-conditioned model
# ----------------------------------------------------------------------------------------------------

# Original sizes whose h/w is not a bucket's own ratio: 46/100 = 0.46 goes to the training bucket 0.48 (0.42 is
# farther), 70/64 = 1.09 to 1.07 (1.13 is farther); the official training passes the original size and the
# bucket's ratio (paper.md: "micro-conditions carry the original (h, w) and the bucket's ratio").
SIZES = {(46, 100): 0.48, (70, 64): 1.07}
MICRO = dataclasses.replace(pm.PRESETS["tiny"], hidden_size=48, micro_condition=True)   # 48: 2 heads, 3 embeddings


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """Four pictures, two of each size, captioned; a tiny T5 and a tiny VAE with scaling_factor 0.5 (not the SD
    VAE's 0.18215, so a hard-coded factor would show); 4 steps of a micro-conditioned tiny preset, its forward
    calls recorded."""
    root = tmp_path_factory.mktemp("real")
    (root / "photos").mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([*SIZES, *SIZES]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "photos" / f"{i}.png")
        (root / "photos" / f"{i}.txt").write_text(f"picture {i}: a red circle")
    diffusers_vae(scaling_factor=0.5).save_pretrained(root / "vae")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(pm.PRESETS, "tiny-ms", MICRO)
        calls = recorded_forwards(mp)
        train.main(["--data", str(root / "photos"), "--t5", str(write_t5_dir(root / "t5")), "--vae", str(root / "vae"),
                    *FAST, "--preset", "tiny-ms", "--batch-size", "4", "--image-size", "32", "--steps", "6",
                    "--save-every", "6", "--out", str(root / "run")])
    return root, calls


def test_micro_conditions_reach_the_model_in_real_data_training(real_run):
    """Every training forward of the micro-conditioned model gets hw = each picture's original (h, w) and ar = its
    bucket's ratio, one bucket per batch; both buckets come up in 6 steps."""
    _, calls = real_run
    assert len(calls) == 6
    seen = set()
    for c in calls:
        assert c["hw"] is not None and c["ar"] is not None
        (h, w), = {tuple(row) for row in c["hw"].tolist()}                # one bucket, one size per batch here
        assert c["ar"].shape == (4, 1) and torch.allclose(c["ar"], torch.full((4, 1), SIZES[h, w]))
        seen.add((h, w))
    assert seen == set(SIZES)


class NoNoise:
    """A numpy Generator whose normal draws are all zero: FolderData's latents are then its stored means, scaled."""
    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)

    def __getattr__(self, name):
        return getattr(self.rng, name)

    def standard_normal(self, shape, dtype=np.float64):
        return np.zeros(shape, dtype)


@torch.no_grad()
def test_cached_latents_are_scaled_by_the_vaes_factor(real_run):
    """With the noise drawn as zeros, each training latent is the VAE's posterior mean of its picture (resized and
    cropped to its bucket), computed here by diffusers' AutoencoderKL, times the VAE's scaling_factor (0.5)."""
    from diffusers import AutoencoderKL
    root, _ = real_run
    vae = AutoencoderKL.from_pretrained(root / "vae").eval()
    folder = data.FolderData(root / "photos" / ".pixart_cache")
    pictures = [np.array(Image.open(p)) for p in sorted((root / "photos").glob("*.png"))]
    images = [torch.from_numpy(p).permute(2, 0, 1)[None].float() / 127.5 - 1 for p in pictures]
    for seed in range(4):
        x0 = folder.batch(NoNoise(seed), 4)["x0"]                          # (4, 4, h/2, w/2)
        h, w = 2 * x0.shape[-2], 2 * x0.shape[-1]
        means = [vae.encode(data.resize_and_crop(im, h, w)).latent_dist.mean[0] for im in images]
        for row in x0:
            err = min((row - 0.5 * m).abs().max().item() for m in means if m.shape == row.shape)
            assert err <= 5e-3                                             # fp16 storage
        assert min((x0[0] - m).abs().max().item() for m in means if m.shape == x0[0].shape) > 0.05   # unscaled: off
