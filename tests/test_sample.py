# sample.py end to end, in-process, on the tiny pipelines of conftest.py: sizes, counts, seeds, binning, the
# --ckpt and --offload paths, the bundled default, and bad input (exit code 2 with a message naming the problem).
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import sample
from pixart_min import load_pixart, save_pixart

FAST = ["--steps", "2", "--device", "cpu"]


def run(capsys, *argv):
    """main(argv) -> the PNG paths it printed, in order."""
    sample.main([str(a) for a in argv] + FAST)
    return [Path(line) for line in capsys.readouterr().out.splitlines() if line.endswith(".png")]


def pixels(paths):
    return [np.asarray(Image.open(p)) for p in paths]


def test_pipeline_sizes_counts_latents_and_seeds(pipeline_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["a red circle", "a blue square", "--model", pipeline_dir, "--n", 2, "--height", 32, "--width", 48,
            "--out", out, "--latents"]
    first = run(capsys, *argv)
    assert len(first) == 4 and all(p.exists() for p in first)
    assert all(Image.open(p).size == (48, 32) for p in first)         # PIL gives (width, height)
    assert all(torch.load(p.with_suffix(".pt")).shape == (4, 16, 24) for p in first)   # tiny VAE: /2
    images = pixels(first)
    assert not np.array_equal(images[0], images[1])                     # seed + k: different noise
    assert not np.array_equal(images[0], images[2])                     # different prompt, same noise
    saved = [p.read_bytes() for p in first]
    second = run(capsys, *argv)
    assert len(second) == 4 and not set(first) & set(second)            # new names, nothing overwritten
    assert [p.read_bytes() for p in first] == saved
    assert all(np.array_equal(a, b) for a, b in zip(images, pixels(second)))   # same seed, same images


def test_micro_condition_bins_then_crops(pipeline_dir_micro, tmp_path, capsys):
    # native 16 px (8 latents x 2): 20x36 (h/w 0.556) -> bucket 0.57 (768x1344 / 64 -> 12x21 -> 12x20 on the
    # multiple of 4), latents 6x10; the decoded 12x20 is scaled by 1.8 to 21x36 and centre-cropped to 20x36
    paths = run(capsys, "a red circle", "--model", pipeline_dir_micro, "--height", 20, "--width", 36,
                "--out", tmp_path, "--latents")
    assert len(paths) == 1 and Image.open(paths[0]).size == (36, 20)
    assert torch.load(paths[0].with_suffix(".pt")).shape == (4, 6, 10)


def test_buckets_match_the_reference():
    from diffusers.image_processor import PixArtImageProcessor
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import ASPECT_RATIO_1024_BIN, ASPECT_RATIO_512_BIN
    assert data.ASPECT_RATIOS == {float(k): tuple(map(int, v)) for k, v in ASPECT_RATIO_1024_BIN.items()}
    for h, w in [(1024, 1024), (720, 1280), (1080, 1920), (300, 1500), (2000, 480), (900, 1000), (777, 555)]:
        for native, table in [(1024, ASPECT_RATIO_1024_BIN), (512, ASPECT_RATIO_512_BIN)]:
            assert data.bucket(h, w, native, 16) == PixArtImageProcessor.classify_height_width_bin(h, w, table)
    x = torch.randn(2, 3, 12, 20)
    assert torch.equal(data.resize_and_crop(x, 20, 36), PixArtImageProcessor.resize_and_crop_tensor(x, 36, 20))


def test_ckpt_with_t5_and_vae(pipeline_dir, tmp_path, capsys):
    model = load_pixart(pipeline_dir)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "model.pth")
    save_pixart(model, tmp_path / "model.safetensors")
    common = ["a red circle", "--height", 16, "--width", 24, "--negative-prompt", "", "--out", tmp_path / "out"]
    pth = run(capsys, *common, "--ckpt", tmp_path / "model.pth", "--num-heads", 2, "--t5", pipeline_dir,
              "--vae", pipeline_dir / "vae")
    assert len(pth) == 1 and Image.open(pth[0]).size == (24, 16)
    # the .safetensors carries the config (a .pth needs --num-heads), and with the same null caption ("") both
    # must give exactly what the pipeline folder gives
    st = run(capsys, *common, "--ckpt", tmp_path / "model.safetensors", "--t5", pipeline_dir, "--vae", pipeline_dir)
    ref = run(capsys, *common, "--model", pipeline_dir)
    assert np.array_equal(*pixels(st + ref)) and np.array_equal(*pixels(pth + ref))


def test_ckpt_reads_as_many_tokens_as_its_model_was_trained_on(pipeline_dir, tmp_path, capsys):
    save_pixart(load_pixart(pipeline_dir, model_max_length=8), tmp_path / "short.safetensors")   # y_embedding: 8 rows
    assert len(run(capsys, "a red circle", "--ckpt", tmp_path / "short.safetensors", "--t5", pipeline_dir,
                   "--vae", pipeline_dir, "--height", 16, "--width", 16, "--out", tmp_path / "out")) == 1


def test_ddpm_picture_k_is_the_same_whatever_n(tmp_path, capsys):
    common = ["a large red circle", "--sampler", "ddpm", "--steps", 3, "--latents"]
    two = run(capsys, *common, "--n", 2, "--out", tmp_path / "two")
    one = run(capsys, *common, "--out", tmp_path / "one")
    shifted = run(capsys, *common, "--seed", 1, "--out", tmp_path / "shifted")
    lat = lambda p: torch.load(p.with_suffix(".pt"))
    same = lambda a, b: torch.allclose(lat(a), lat(b), atol=1e-4)         # a batch of 2 rounds unlike a batch of 1
    assert same(two[0], one[0]) and same(two[1], shifted[0]) and not same(two[0], two[1])


def test_offload_changes_nothing(pipeline_dir, tmp_path, capsys):
    argv = ["a red circle", "a blue square", "--model", pipeline_dir, "--out", tmp_path]
    plain, offloaded = run(capsys, *argv), run(capsys, *argv, "--offload")
    assert len(plain) == len(offloaded) == 2                              # zip alone would hide a missing picture
    assert all(np.array_equal(a, b) for a, b in zip(pixels(plain), pixels(offloaded)))


def test_default_is_the_bundled_toy_model(tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("a large red circle\n\n   \na small blue square\n")
    paths = run(capsys, "--prompts-file", tmp_path / "prompts.txt", "--out", tmp_path / "out")
    assert len(paths) == 2 and all(Image.open(p).size == (32, 32) for p in paths)
    again = run(capsys, "a large red circle", "--out", tmp_path / "again")
    assert again[0].read_bytes() == paths[0].read_bytes()                 # seed 0 both times: the same picture


def test_empty_prompt_warns(pipeline_dir, tmp_path, capsys):
    with pytest.warns(UserWarning, match="prompt 0 is empty"):
        assert len(run(capsys, "", "--model", pipeline_dir, "--out", tmp_path)) == 1


@pytest.mark.parametrize("argv, message", [
    (["--height", "30"], "multiples of 4"),
    (["--steps", "0"], "--steps"),
    (["--steps", "1000"], "from 1 to 999"),
    (["--cfg", "nan"], "--cfg"),
    (["--sampler", "lcm", "--cfg", "4.5"], "--sampler lcm takes no --cfg"),
    (["--n", "0"], "--n"),
    (["--model", "{tmp}/no-such-folder"], "no-such-folder"),
    (["--ckpt", "{tmp}/model.pth"], "--t5"),
    (["--ckpt", "{tmp}/missing.pth", "--t5", "{pipe}", "--vae", "{pipe}"], "missing.pth"),
    (["--model", "{tmp}"], "not a PixArt pipeline folder"),
    (["--seed", str(2 ** 64)], "--seed must be from"),
    (["--device", "gpu"], "is not a device"),
    (["--out", "{pipe}/transformer/config.json"], "is a file"),
])
def test_bad_input_exits_2(argv, message, pipeline_dir, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path, pipe=pipeline_dir) for a in argv]
    if "--model" not in argv and "--ckpt" not in argv:
        argv += ["--model", str(pipeline_dir)]
    with pytest.raises(SystemExit) as e:
        sample.main(FAST + ["a red circle", "--out", str(tmp_path / "out")] + argv)   # argv last: it wins
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "sample.py: error:" in err and message in err


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 chatter inside diffusers' scheduler
def test_same_pictures_as_diffusers_pipeline(pipeline_dir, tmp_path, capsys):
    """diffusers' PixArtAlphaPipeline (the oracle) on the same folder and the same starting noise."""
    from diffusers import PixArtAlphaPipeline
    paths = run(capsys, "a red circle", "a blue square", "--model", pipeline_dir, "--n", 2, "--height", 16,
                "--width", 24, "--out", tmp_path)
    pipe = PixArtAlphaPipeline.from_pretrained(pipeline_dir)
    noise = torch.stack([torch.randn(4, 8, 12, generator=torch.Generator().manual_seed(k)) for k in range(2)])
    for j, prompt in enumerate(["a red circle", "a blue square"]):
        ref = pipe(prompt, num_images_per_prompt=2, height=16, width=24, num_inference_steps=2, latents=noise,
                   clean_caption=False, use_resolution_binning=False, output_type="np").images
        ours = np.stack(pixels(paths[2 * j:2 * j + 2])).astype(np.float32) / 255
        assert np.abs(ours - ref).max() <= 1.01 / 255                  # PNG rounding only


def test_a_toy_model_folder_samples_in_pixel_space(tmp_path, capsys):
    # the bundled model's layout: pixart.safetensors, text_encoder/ and tokenizer/, and no vae/ (pixels)
    import shutil

    from pixart_min import PRESETS, PixArt
    folder = tmp_path / "toy"
    shutil.copytree(data.TOY / "text_encoder", folder / "text_encoder")
    shutil.copytree(data.TOY / "tokenizer", folder / "tokenizer")
    save_pixart(PixArt(PRESETS["toy"]), folder / "pixart.safetensors")
    paths = run(capsys, "a large red circle", "--model", folder, "--out", tmp_path / "out", "--latents")
    assert len(paths) == 1 and Image.open(paths[0]).size == (32, 32)
    assert torch.load(paths[0].with_suffix(".pt")).shape == (3, 32, 32)     # the latents are the pixels


def scene_png(path, size=32, seed=0):
    """A true picture of the shapes world, saved as a PNG: the picture to edit."""
    import shapes
    images = shapes.sample_batch(1, np.random.default_rng(seed), size=size, n_objects=1)[0]
    Image.fromarray(((images[0].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)).save(path)
    return np.asarray(Image.open(path)).astype(int)


def test_editing_a_picture_with_the_bundled_model(tmp_path, capsys):
    picture = scene_png(tmp_path / "in.png")
    # strength 1 starts from the noise alone: text to image, the same picture
    plain = run(capsys, "a large red circle", "--out", tmp_path / "plain")
    full = run(capsys, "a large red circle", "--init-image", tmp_path / "in.png", "--strength", 1, "--out", tmp_path)
    assert full[0].read_bytes() == plain[0].read_bytes()
    # strength near 0: one step from t = 1 gives the picture back
    kept = pixels(run(capsys, "a large red circle", "--init-image", tmp_path / "in.png", "--strength", 0.001,
                      "--out", tmp_path / "kept"))[0].astype(int)
    assert np.abs(kept - picture).mean() <= 1.5 and np.abs(kept - picture).max() <= 16   # of 255
    # inpainting: the mask's black half is the picture to the last pixel, its white half is drawn anew
    mask = np.zeros((32, 32), np.uint8)
    mask[:, 16:] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    painted = pixels(run(capsys, "a small blue square", "--init-image", tmp_path / "in.png", "--mask",
                         tmp_path / "mask.png", "--out", tmp_path / "painted", "--seed", 3))[0].astype(int)
    assert np.abs(painted[:, :16] - picture[:, :16]).max() <= 1                    # PNG rounding only
    assert np.abs(painted[:, 16:] - picture[:, 16:]).mean() > 5


@pytest.mark.parametrize("argv, message", [
    (["--init-image", "{tmp}/missing.png"], "missing.png"),
    (["--init-image", "{tmp}/in.png", "--strength", "0"], "--strength must be in (0, 1]"),
    (["--init-image", "{tmp}/in.png", "--strength", "1.5"], "--strength must be in (0, 1]"),
    (["--strength", "0.5"], "give it with --init-image"),
    (["--init-image", "{tmp}/in.png", "--mask", "{tmp}/small.png"], "must be the same size"),
    (["--init-image", "{tmp}/in.png", "--mask", "{tmp}/notes.txt"], "notes.txt"),
])
def test_bad_edits_exit_2(argv, message, tmp_path, capsys):
    scene_png(tmp_path / "in.png")
    Image.new("L", (16, 16)).save(tmp_path / "small.png")
    (tmp_path / "notes.txt").write_text("not a picture")
    with pytest.raises(SystemExit) as e:
        sample.main(FAST + ["a red circle", "--out", str(tmp_path / "out")] + [a.format(tmp=tmp_path) for a in argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "sample.py: error:" in err and message in err
