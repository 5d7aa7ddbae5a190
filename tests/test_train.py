# train.py: the re-parameterisation, exact resume, NaN stop, DDP with two CPU processes, real-data folders.
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from PIL import Image

import pixart_min as pm
import data
import train
from conftest import diffusers_vae, losses, randomize_, write_t5_dir
from data import TOY_DIT
from dit import DiT, reparameterize, save_dit

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--preset", "tiny", "--batch-size", "8", "--eval-every", "0", "--lr", "1e-3", "--warmup", "2"]


def tiny_dit(seed=0):
    config = pm.PixArtConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=128, depth=2, num_heads=2,
                             caption_channels=32, model_max_length=6)
    return randomize_(DiT(config, num_classes=5), seed).eval()


def test_reparameterised_pixart_computes_what_dit_computed_at_t500():
    dit = tiny_dit()
    pixart = reparameterize(dit, t=500).eval()
    torch.manual_seed(0)
    x, y, mask = torch.randn(3, 4, 8, 8), torch.randn(3, 6, 32), torch.ones(3, 6)
    t, null = torch.full((3,), 500), torch.full((3,), 5)
    with torch.no_grad():
        want = dit(x, t, null)
        assert (pixart(x, t, y, mask) - want).abs().max() <= 1e-5          # the caption cannot matter yet
        assert (pixart(x, t, y, mask) - dit(x, t, torch.tensor([0, 1, 2]))).abs().max() > 1e-3   # a class does
        assert (pixart(x, t // 5, y, mask) - dit(x, t // 5, null)).abs().max() > 1e-3          # other t differ
    assert all((b.cross_attn.proj.weight == 0).all() for b in pixart.blocks)
    plain = reparameterize(dit, t=None).eval()                    # the ablation: shared weights only
    assert torch.equal(plain.blocks[1].attn.qkv.weight, dit.blocks[1].attn.qkv.weight)
    assert not torch.equal(plain.t_block[1].weight, pixart.t_block[1].weight)
    with torch.no_grad():
        assert (plain(x, t, y, mask) - want).abs().max() > 1e-3


def test_dit_grad_checkpointing_recomputes_the_same_gradients(monkeypatch):
    real, calls = torch.utils.checkpoint.checkpoint, []
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.tensor([1, 5])
    grads = []
    for flag in (False, True):
        dit = tiny_dit().train()
        dit.grad_checkpointing, dit.config.class_dropout_prob = flag, 0.0
        dit(x, t, y).square().mean().backward()
        grads.append([p.grad for p in dit.parameters()])
    assert len(calls) == 2 and all(torch.allclose(a, b, atol=1e-7) for a, b in zip(*grads))   # one per block


def test_dit_has_the_official_key_layout(tmp_path):
    with torch.device("meta"):                              # shapes only: DiT-XL/2 without 2.7 GB of memory
        dit = DiT(pm.PRESETS["PixArt-XL-2-256"], num_classes=1000)
    sd = dit.state_dict()
    assert sd["y_embedder.embedding_table.weight"].shape == (1001, 1152)
    assert sd["blocks.27.adaLN_modulation.1.weight"].shape == (6912, 1152)
    assert sd["final_layer.adaLN_modulation.1.weight"].shape == (2304, 1152)
    assert sd["pos_embed"].shape == (1, 256, 1152) and "t_block.1.weight" not in sd
    assert not any("cross_attn" in k or "scale_shift_table" in k for k in sd)
    # a file in that layout (plain state dict, as facebookresearch/DiT saves) loads back strictly
    small = tiny_dit()
    torch.save(small.state_dict(), tmp_path / "DiT-tiny.pt")
    loaded = train.load_model(tmp_path / "DiT-tiny.pt")
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x, t, torch.tensor([1, 5])), small(x, t, torch.tensor([1, 5])))


def test_a_saved_dit_loads_back_as_itself_in_fp16(tmp_path):
    small = tiny_dit()
    (tmp_path / "toy_dit").mkdir()
    save_dit(small, tmp_path / "toy_dit" / "dit.safetensors")
    loaded = train.load_model(tmp_path / "toy_dit").eval()                # the folder, as checkpoints/toy_dit
    assert isinstance(loaded, DiT) and loaded.config == small.config and loaded.num_classes == 5
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.tensor([1, 5])
    with torch.no_grad():
        half = small.half().float()                                       # what fp16 storage keeps of it
        assert torch.equal(loaded(x, t, y), half(x, t, y))


def test_the_default_toy_run_is_stage_2_from_the_bundled_dit():
    assert train.parse_args([]).init_dit == str(TOY_DIT)
    for argv in (["--from-scratch"], ["--preset", "tiny"], ["--cond", "class"], ["--image-size", "64"],
                 ["--init", str(ROOT / "checkpoints" / "toy")]):
        assert train.parse_args(argv).init_dit is None, argv
    with pytest.raises(SystemExit):
        train.parse_args(["--from-scratch", "--init-dit", str(TOY_DIT)])


def test_resume_continues_exactly(tmp_path):
    train.main(["--out", str(tmp_path / "a"), "--steps", "6", "--save-every", "3", *FAST])
    train.main(["--out", str(tmp_path / "c"), "--steps", "3", "--save-every", "3", *FAST])   # "killed" at step 3
    (tmp_path / "c").rename(tmp_path / "b")                 # and moved: it goes on beside its checkpoint
    train.main(["--resume", str(tmp_path / "b" / "last.pt"), "--steps", "6"])
    assert not (tmp_path / "c").exists()
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert len(a) == len(b) == 6 and a == b
    wa = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    wb = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert wa["step"] == wb["step"] == 6
    assert all(torch.equal(wa["state_dict"][k], wb["state_dict"][k]) for k in wa["state_dict"])
    assert all(torch.equal(wa["state_dict_ema"][k], wb["state_dict_ema"][k]) for k in wa["state_dict"])
    assert a[-1] != a[0]                                    # it did train


def test_resume_takes_a_gentler_lr_and_keeps_the_rest(tmp_path, capsys):
    """After a NaN loss the message says: --resume it with a lower --lr. The other settings stay the run's own."""
    train.main(["--out", str(tmp_path), "--steps", "2", "--save-every", "2", *FAST])
    train.main(["--resume", str(tmp_path / "last.pt"), "--steps=3", "--lr", "1e-4", "--batch-size", "4"])
    assert "keeps the run's own --batch-size" in capsys.readouterr().out
    args = torch.load(tmp_path / "last.pt", weights_only=True)["args"]
    assert (args["steps"], args["lr"], args["batch_size"]) == (3, 1e-4, 8) and len(losses(tmp_path)) == 3


def test_a_new_run_does_not_overwrite_an_old_one(tmp_path):
    train.main(["--out", str(tmp_path), "--steps", "1", "--save-every", "1", *FAST])
    before = (tmp_path / "last.pt").read_bytes()
    with pytest.raises(SystemExit, match=f"{tmp_path} already holds a run: --resume {tmp_path / 'last.pt'}"):
        train.main(["--out", str(tmp_path), "--steps", "2", *FAST])
    assert (tmp_path / "last.pt").read_bytes() == before and len(losses(tmp_path)) == 1


def test_weights_that_do_not_fit_the_data_are_named(tmp_path):
    pm.save_pixart(pm.PixArt(pm.PRESETS["tiny"]), tmp_path / "tiny.safetensors")    # 4 latent channels, not 3
    for flag in ("--init", "--score"):
        with pytest.raises(SystemExit, match="tiny.safetensors takes 4 latent channels, and this data has 3"):
            train.main([flag, str(tmp_path / "tiny.safetensors"), "--out", str(tmp_path / "run"), *FAST])


def test_a_checkpoint_from_before_the_schedule_options_resumes(tmp_path):
    train.main(["--out", str(tmp_path), "--steps", "2", "--save-every", "2", *FAST])
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    del ckpt["args"]["lr_decay"], ckpt["args"]["timesteps"]       # as saved by train.py before they existed
    torch.save(ckpt, tmp_path / "last.pt")
    train.main(["--resume", str(tmp_path / "last.pt"), "--steps", "3"])
    assert len(losses(tmp_path)) == 3


def test_a_checkpoint_keeps_a_missing_null_caption_missing(tmp_path, pipeline_dir):
    model = pm.load_pixart(pipeline_dir)                       # diffusers weights: no null caption
    opt = torch.optim.AdamW(model.parameters())
    train.save_checkpoint(tmp_path / "last.pt", model, model, opt, 0, argparse.Namespace())
    assert train.load_model(tmp_path / "last.pt").has_null_caption is False
    pm.save_pixart(pm.PixArt(pm.PRESETS["tiny"]), tmp_path / "own.safetensors")
    assert pm.load_pixart(tmp_path / "own.safetensors").has_null_caption is True


def test_learning_rate_warms_up_then_stays_or_follows_a_cosine():
    steps = 100
    flat = train.parse_args(["--lr", "1e-3", "--warmup", "10", "--steps", str(steps)])
    cosine = train.parse_args(["--lr", "1e-3", "--warmup", "10", "--steps", str(steps), "--lr-decay", "cosine"])
    lr = [train.learning_rate(s, flat) for s in range(steps)]
    assert lr[0] == pytest.approx(1e-4) and lr[9:] == [1e-3] * (steps - 9)     # the paper: warm-up, then constant
    lr = [train.learning_rate(s, cosine) for s in range(steps)]
    assert lr[0] == pytest.approx(1e-4) and max(lr) <= 1e-3
    assert lr[50] == pytest.approx(0.5e-3) and lr[-1] < 1e-6                     # half way: half; the end: ~0
    assert all(a > b for a, b in zip(lr[9:], lr[10:]))                         # falls every step after warm-up


def test_logit_normal_timesteps_gather_in_the_middle():
    g = torch.Generator().manual_seed(0)
    middle = {}
    for how in ("uniform", "logit-normal"):
        t = train.draw_timesteps(100_000, g, how)
        assert t.dtype == torch.long and t.min() >= 0 and t.max() <= pm.T - 1
        middle[how] = ((t >= 270) & (t < 730)).float().mean().item()
    assert middle["uniform"] == pytest.approx(0.46, abs=0.01)
    assert middle["logit-normal"] == pytest.approx(0.68, abs=0.01)           # one standard deviation of the normal


@pytest.mark.parametrize("poison, message", [(lambda loss: loss * float("nan"), "the loss is nan and"),
                                             (lambda loss: loss + (loss - loss).sqrt(), "gradients' norm nan")])
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys, poison, message):
    """A NaN loss, or a finite loss with NaN gradients (sqrt's slope at 0), at the fifth step."""
    real = pm.training_loss
    calls = []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return poison(loss) if len(calls) == 5 else loss

    monkeypatch.setattr(pm, "training_loss", poisoned)
    with pytest.raises(SystemExit) as e:
        train.main(["--out", str(tmp_path), "--steps", "10", "--save-every", "2", *FAST])
    assert e.value.code == 1
    out = capsys.readouterr().out
    assert message in out and "at step 4" in out
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["step"] == 4 and all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict_ema"].values())
    assert not list(tmp_path.glob("*.tmp"))


def test_torchrun_two_processes_match_one(tmp_path):
    args = ["--steps", "4", "--save-every", "4", *FAST]
    train.main(["--out", str(tmp_path / "one"), *args])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29517",
                          str(ROOT / "train.py"), "--out", str(tmp_path / "two"), *args],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "replicas' weights differ by at most 0.0e+00" in run.stdout
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(two) == 4 and np.allclose(one, two, rtol=1e-4, atol=1e-6), (one, two)
    w1 = torch.load(tmp_path / "one" / "last.pt", weights_only=True)["state_dict"]
    w2 = torch.load(tmp_path / "two" / "last.pt", weights_only=True)["state_dict"]
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) <= 1e-4


def test_real_data_folder_buckets_and_corrupt_images(tmp_path, capsys, monkeypatch):
    """Real data, with --t5 and --vae given as hub ids: the hub is a stand-in that hands out local folders."""
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(64, 64), (66, 66), (48, 96), (50, 100), (96, 48), (64, 64)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(photos / f"{i}.png")
        (photos / f"{i}.txt").write_text(f"a photo number {i} of a red circle")
    (photos / "broken.png").write_bytes(b"not a png at all")
    (photos / "broken.txt").write_text("a broken file")
    hub = {"test-org/t5": write_t5_dir(tmp_path / "t5"), "test-org/vae": tmp_path / "vae"}
    diffusers_vae().save_pretrained(hub["test-org/vae"])
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, allow_patterns: str(hub[repo]))
    train.main(["--data", str(photos), "--t5", "test-org/t5", "--vae", "test-org/vae", "--image-size", "64",
                "--out", str(tmp_path / "run"), "--steps", "3", "--save-every", "3", *FAST, "--eval-every", "3"])
    out = capsys.readouterr().out
    assert "precomputed 6 images" in out and "skipped 1 unreadable" in out
    folder = data.FolderData(photos / ".pixart_cache")
    assert set(folder.names) == {"64x64", "44x88", "88x44"}       # 1:1, 1:2 and 2:1 buckets at 64 px
    for seed in range(5):
        batch = folder.batch(np.random.default_rng(seed), 4)
        assert batch["x0"].shape[0] == 4 and batch["mask"].sum(1).min() > 0
        assert batch["hw"].shape == (4, 2) and batch["ar"].shape == (4, 1)
    assert len(losses(tmp_path / "run")) == 3
    with pytest.raises(SystemExit, match="was precomputed at --image-size 64, not 32: give another --cache"):
        train.main(["--data", str(photos), "--out", str(tmp_path / "run32"), *FAST])


def test_a_folder_without_a_usable_image_is_named(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "broken.png").write_bytes(b"not a png at all")
    (tmp_path / "data" / "broken.txt").write_text("a broken file")
    diffusers_vae().save_pretrained(tmp_path / "vae")
    with pytest.raises(SystemExit) as e:
        train.main(["--data", str(tmp_path / "data"), "--t5", str(write_t5_dir(tmp_path / "t5")), "--vae",
                    str(tmp_path / "vae"), "--preset", "tiny", "--out", str(tmp_path / "run")])
    assert str(e.value.code) == f"train.py: no readable image with a caption in {tmp_path / 'data'} (1 unreadable)"


def test_a_missing_t5_or_vae_is_named(tmp_path):
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a red circle")
    with pytest.raises(SystemExit) as e:
        train.main(["--data", str(tmp_path), "--t5", str(tmp_path / "t5"), "--vae", str(tmp_path / "vae"),
                    "--preset", "tiny", "--out", str(tmp_path / "run")])
    assert str(e.value.code) == f"train.py: no such file or folder: {tmp_path / 'vae'}"
    assert not (tmp_path / ".pixart_cache").exists()


def test_the_three_stages_run_end_to_end(tmp_path):
    common = ["--steps", "2", "--save-every", "2", *FAST]
    train.main(["--cond", "class", "--prediction", "v", "--out", str(tmp_path / "s1"), *common, "--eval-every", "2",
                "--eval-n", "3"])                                               # DiT; the tiny preset's default is eps
    assert torch.load(tmp_path / "s1" / "last.pt", weights_only=True)["kind"] == "dit"
    row = json.loads((tmp_path / "s1" / "metrics.jsonl").read_text())    # stage 1 is scored on the shapes it draws
    assert {k for k in row if k.startswith("1obj_")} == {"1obj_shape", "1obj_circle", "1obj_square", "1obj_triangle"}
    assert 0 <= row["1obj_shape"] <= 1 and (tmp_path / "s1" / "samples_000002.png").exists()
    scored = train.main(["--score", str(tmp_path / "s1" / "last.pt"), "--eval-n", "3", "--out", str(tmp_path / "s1")])
    # the same EMA, prompts and seeds as the run's own last evaluation
    assert scored == {"1obj": {k[5:]: v for k, v in row.items() if k.startswith("1obj_")}}
    with pytest.raises(SystemExit, match="start stage 2 from it with --init-dit"):
        train.main(["--init", str(tmp_path / "s1" / "last.pt"), "--out", str(tmp_path / "wrong"), *common])
    with pytest.raises(SystemExit, match="is a PixArt, not a class-conditional DiT: continue from it with --init"):
        train.main(["--init-dit", str(ROOT / "checkpoints" / "toy"), "--out", str(tmp_path / "wrong"), *common])
    train.main(["--init-dit", str(tmp_path / "s1" / "last.pt"), "--out", str(tmp_path / "s2"), *common])  # text
    for name in ("last.pt", "pixart.safetensors"):                           # --score on either: the EMA weights
        train.main(["--score", str(tmp_path / "s2" / name), "--eval-n", "2", "--out", str(tmp_path / name)])
    drawn = [np.array(Image.open(tmp_path / name / "score_samples.png")) for name in ("last.pt", "pixart.safetensors")]
    assert np.array_equal(*drawn)
    train.main(["--init", str(tmp_path / "s2" / "last.pt"), "--image-size", "64", "--out", str(tmp_path / "s3"),
                *common])
    m32, m64 = (pm.load_pixart(tmp_path / s / "pixart.safetensors") for s in ("s2", "s3"))
    assert (m32.config.input_size, m64.config.input_size, m64.config.pe_interpolation) == (32, 64, 2.0)
    assert m32.config.prediction == m64.config.prediction == "v"          # the target travels with the weights
    train.main(["--score", str(tmp_path / "s3" / "last.pt"), "--eval-n", "2", "--out", str(tmp_path / "score64")])
    grid64 = Image.open(tmp_path / "score64" / "score_samples.png").size   # drawn at the model's own 64 px
    assert grid64[0] > Image.open(tmp_path / "last.pt" / "score_samples.png").size[0]
    D = m32.config.hidden_size
    # the 64 px grid's position table spans the same range: every other row and column is the 32 px table
    assert torch.allclose(m64.pos_embed.reshape(32, 32, D)[::2, ::2], m32.pos_embed.reshape(16, 16, D), atol=1e-6)


@pytest.mark.parametrize("argv, message", [(["--resume", "missing.pt"], "--resume: no such file"),
                                           (["--prediction", "epsilon"], "with the toy, add --from-scratch"),
                                           (["--data", "/no/such/folder"], "--data: no such file"),
                                           (["--preset", "huge"], "invalid choice"),
                                           (["--steps", "0"], "must be positive"),
                                           (["--warmup", "0"], "--warmup must be at least 1"),
                                           (["--ema", "1"], "--ema must be from 0 to below 1"),
                                           (["--null-prob", "2"], "--null-prob from 0 to 1"),
                                           (["--clip", "0"], "--clip above 0"),
                                           (["--init-dit", ".", "--cond", "class"], "leave out --cond class"),
                                           (["--eval-steps", "1000"], "--eval-steps must be from 1 to 999"),
                                           (["--eval-seed", "-1"], "--eval-seed must be 0 or more"),
                                           (["--two-objects", "1.5"], "--two-objects is a share, from 0 to 1"),
                                           (["--save-every", "0"], "--save-every and --eval-n must be at least 1"),
                                           (["--cfg", "nan"], "--cfg must be a finite number"),
                                           (["--data", "."], "buckets are cut for patches of 2"),
                                           (["--data", ".", "--two-objects", ".5"], "are for the shapes world"),
                                           (["--data", ".", "--cond", "class"], "are for the shapes world"),
                                           (["--score", ".", "--data", "."], "leave out --data"),
                                           (["--init", ".", "--prediction", "v"], "--prediction is for a new model")])
def test_bad_arguments_are_named(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--resume", "--init"])
def test_a_truncated_checkpoint_is_named(tmp_path, flag):
    good = tmp_path / "good.pt"
    torch.save({"step": 1, "state_dict": {"w": torch.ones(1000)}}, good)
    bad = tmp_path / "last.pt"
    bad.write_bytes(good.read_bytes()[:100])                      # a copy killed half-way
    with pytest.raises(SystemExit) as e:
        train.main([flag, str(bad), "--out", str(tmp_path / "run")])
    assert f"cannot read {bad}" in str(e.value.code) and "truncated" in str(e.value.code)


# measured: one object all correct 98.4% (63 of 64) and shape 100%; two objects count 98.4%, relation 98.4% and all
# correct 82.8% (53 of 64); held-out pairs 90.6% (one object) and 51.6% (two). The floors for one and two objects
# all correct are the targets, 90% and 70%; the README measures them on 4 x 200 prompts. 64 prompts, not
# 32: with --eval-n 32 this model scores 71.9% two objects, a single prompt above the target, where other CPUs'
# rounding could tip it. The model before the text encoder's fix (commit 22413ea) scores 12.5% here.
BUNDLED_FLOOR = {"1obj_all": 0.9, "1obj_shape": 0.9, "2obj_count": 0.9, "2obj_relation": 0.9, "2obj_all": 0.7,
                 "held_1obj_all": 0.85, "held_2obj_all": 0.45}


def test_bundled_model_scores_what_the_readme_says(tmp_path, capsys):
    """The bundled toy model, scored by `train.py --score` on a small fixed sample (64 prompts a group, seeded).
    The floors are the targets, or this sample's measured figures less a margin for other CPUs' rounding."""
    scores = train.main(["--score", str(ROOT / "checkpoints" / "toy"), "--eval-n", "64", "--out", str(tmp_path)])
    assert (tmp_path / "score.json").exists() and (tmp_path / "score_samples.png").exists()
    assert "1obj" in capsys.readouterr().out
    for key, floor in BUNDLED_FLOOR.items():
        group, metric = key.rsplit("_", 1)
        assert scores[group][metric] >= floor, (key, scores[group][metric])


def test_eval_seed_draws_other_prompts(tmp_path):
    """--eval-seed scores the same model on other prompts and noise, and score.json says which seed it was."""
    for seed in (1234, 4242):
        train.main(["--score", str(ROOT / "checkpoints" / "toy"), "--eval-n", "2", "--eval-seed", str(seed),
                    "--out", str(tmp_path / str(seed))])
    saved = [json.loads((tmp_path / str(seed) / "score.json").read_text()) for seed in (1234, 4242)]
    assert [s["seed"] for s in saved] == [1234, 4242]
    grids = [(tmp_path / str(seed) / "score_samples.png").read_bytes() for seed in (1234, 4242)]
    assert grids[0] != grids[1]


def test_the_bundled_text_encoder_is_what_build_toy_text_makes(tmp_path):
    """checkpoints/toy's tokenizer and frozen T5 come from the code: rebuilt from their seed, they are the same."""
    data.build_toy_text(tmp_path)
    rebuilt, bundled = (pm.T5TextEncoder(folder, max_length=24) for folder in (tmp_path, ROOT / "checkpoints" / "toy"))
    caption = "a small red circle left of a large blue square"
    assert [torch.equal(*t) for t in zip(rebuilt.tokenize([caption]), bundled.tokenize([caption]))] == [True, True]
    ours, theirs = rebuilt.model.state_dict(), bundled.model.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
