"""sample.py's wiring against the library and diffusers' pipeline (issue 31, item 2): what the command line hands to
pixart_min.sample is checked by value, not only by the pictures' sizes."""
import shutil
from pathlib import Path

import pytest
import torch

import data
import lora
import sample
from conftest import diffusers_vae, make_pipeline_dir
from pixart_min import PRESETS, T5TextEncoder, load_pixart
from pixart_min import sample as sample_latents


def run(capsys, *argv, steps=3):
    """sample.main on the CPU -> the clean latents it saved, one (C, h, w) tensor per picture."""
    sample.main([str(a) for a in argv] + ["--steps", str(steps), "--device", "cpu", "--latents"])
    out = capsys.readouterr().out.splitlines()
    return [torch.load(Path(line)) for line in out if line.endswith(".pt")]


def noise(C, h, w, seed=0):
    """Picture k's starting noise, as sample.py draws it: on the CPU from seed + k."""
    return torch.randn(C, h, w, generator=torch.Generator().manual_seed(seed))[None]


NEGATIVE = "a big yellow star to the left of a blue square"


def test_negative_prompt_is_the_null_caption(pipeline_dir, tmp_path, capsys):
    """--negative-prompt changes the picture, and gives what pixart_min.sample gives with that text's T5 features
    as null_y and its own mask (longer than the prompt's) as null_mask."""
    common = ["a red circle", "--model", pipeline_dir, "--height", 16, "--width", 24]
    plain = run(capsys, *common, "--out", tmp_path / "plain")
    negative = run(capsys, *common, "--negative-prompt", NEGATIVE, "--out", tmp_path / "negative")
    assert (negative[0] - plain[0]).abs().max() > 1e-2
    t5 = T5TextEncoder(pipeline_dir)
    (y, mask), (null_y, null_mask) = t5(["a red circle"]), t5([NEGATIVE])
    assert null_mask.sum() > mask.sum() > 1                                 # its own mask: longer than the prompt's
    want = sample_latents(load_pixart(pipeline_dir), noise(4, 8, 12), y, mask, null_y=null_y, null_mask=null_mask,
                          steps=3)
    assert torch.allclose(negative[0], want[0], atol=1e-6)


def test_lcm_from_the_command_line(pipeline_dir, tmp_path, capsys):
    """--sampler lcm: 4 steps and no guidance unless told, each picture's fresh noise from its own seed."""
    got = run(capsys, "a red circle", "--model", pipeline_dir, "--height", 16, "--width", 24, "--sampler", "lcm",
              "--n", 2, "--out", tmp_path, steps=4)
    y, mask = T5TextEncoder(pipeline_dir)(["a red circle"])
    generators = [torch.Generator().manual_seed(k) for k in (0, 1)]           # the starting noise, then the steps'
    start = torch.stack([torch.randn(4, 8, 12, generator=g) for g in generators])
    want = sample_latents(load_pixart(pipeline_dir), start, y.expand(2, -1, -1), mask.expand(2, -1), steps=4,
                          cfg_scale=1, sampler="lcm", generator=generators)
    assert len(got) == 2 and all(torch.allclose(g, w, rtol=1e-5, atol=1e-3) for g, w in zip(got, want))



def test_the_bundled_student_from_the_command_line(tmp_path, capsys):
    """--model checkpoints/toy_lcm --sampler lcm is pixart_min.sample's LCM with the student's weights and the toy's
    text encoder, which the folder carries."""
    prompt, folder = "a small red circle above a large blue square", data.TOY.parent / "toy_lcm"
    got = run(capsys, prompt, "--model", folder, "--sampler", "lcm", "--out", tmp_path, steps=4)
    y, mask = T5TextEncoder(folder, max_length=PRESETS["toy"].model_max_length)([prompt])
    g = torch.Generator().manual_seed(0)                                  # the starting noise, then the steps'
    start = torch.randn(1, 3, 32, 32, generator=g)
    want = sample_latents(load_pixart(folder), start, y, mask, steps=4, cfg_scale=1, sampler="lcm", generator=[g])
    assert len(got) == 1 and torch.allclose(got[0], want[0], atol=1e-5)

def test_a_lora_adapter_from_the_command_line(pipeline_dir, tmp_path, capsys):
    """--lora: the adapter merged into the model, as lora.py merges it; one that does not fit is named (exit 2)."""
    model = load_pixart(pipeline_dir)
    lora.add_lora(model, rank=2, targets=["attn2.to_k", "attn2.to_v"])
    for m in model.modules():
        if isinstance(m, lora.LoRA):
            for B in m.lora_B.values():
                torch.nn.init.normal_(B, std=0.5)                           # a trained adapter's B is not zero
    lora.save_lora(model, tmp_path / "adapter")
    common = ["a red circle", "--model", pipeline_dir, "--height", 16, "--width", 24]
    got = run(capsys, *common, "--lora", tmp_path / "adapter", "--out", tmp_path / "a")
    plain = run(capsys, *common, "--out", tmp_path / "b")
    t5 = T5TextEncoder(pipeline_dir)
    (y, mask), (null_y, null_mask) = t5(["a red circle"]), t5([""])      # diffusers weights: the null caption is ""
    want = sample_latents(lora.merge_lora(model), noise(4, 8, 12), y, mask, null_y=null_y, null_mask=null_mask,
                          steps=3)
    assert torch.allclose(got[0], want[0], atol=1e-5) and (got[0] - plain[0]).abs().max() > 1e-3
    (tmp_path / "adapter" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 3, '
                                                              '"target_modules": ["to_k", "to_v"]}')
    with pytest.raises(SystemExit) as e:
        run(capsys, *common, "--lora", tmp_path / "adapter", "--out", tmp_path / "c")
    assert e.value.code == 2 and "do not fit rank r = 3" in capsys.readouterr().err


@pytest.fixture(scope="module")
def pipeline_dir_1024(tmp_path_factory):
    """A tiny 1024-MS pipeline as diffusers sees one: transformer sample_size 128 (which switches on diffusers'
    binning with ASPECT_RATIO_1024_BIN and its micro-conditions) and a VAE of four levels (8x down, the SD VAE's),
    so that its native size is 1024 px on both sides."""
    folder = make_pipeline_dir(tmp_path_factory.mktemp("pipeline_1024"), dict(sample_size=128), micro=True)
    shutil.rmtree(folder / "vae")
    diffusers_vae(block_out_channels=(8,) * 4, down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4).save_pretrained(folder / "vae")
    return folder


class Stop(Exception):
    """Raised where the transformer would first run: the inputs are what the test wants, not the pictures."""


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("height, width, bucket", [(720, 1280, (768, 1344)), (1000, 600, (1280, 768))])
def test_micro_conditions_are_the_pipelines(pipeline_dir_1024, tmp_path, capsys, monkeypatch, height, width, bucket):
    """The hw and ar that sample.py hands to the sampler for a non-square size are, value for value, the
    resolution and aspect_ratio that diffusers' PixArtAlphaPipeline passes to its transformer: the bucket's
    pixel height and width, and their ratio h/w (not the size asked for, nor the table's rounded key)."""
    from diffusers import PixArtAlphaPipeline
    seen = {}

    def ours(model, noise, y, mask, *, hw, ar, **kw):
        seen.update(hw=hw, ar=ar, latents=noise.shape)
        raise Stop

    monkeypatch.setattr(sample, "sample", ours)
    with pytest.raises(Stop):
        run(capsys, "a red circle", "--model", pipeline_dir_1024, "--n", 2, "--height", height, "--width", width,
            "--out", tmp_path)
    pipe = PixArtAlphaPipeline.from_pretrained(pipeline_dir_1024)

    def theirs(latents, *, added_cond_kwargs, **kw):
        seen.update(theirs=added_cond_kwargs, their_latents=latents.shape)
        raise Stop

    monkeypatch.setattr(pipe.transformer, "forward", theirs)
    with pytest.raises(Stop):
        pipe("a red circle", height=height, width=width, num_images_per_prompt=2, num_inference_steps=2,
             clean_caption=False, output_type="latent")
    resolution, aspect_ratio = seen["theirs"]["resolution"], seen["theirs"]["aspect_ratio"]
    assert resolution.tolist() == [list(bucket)] * 4                      # [uncond, cond] x 2 pictures
    assert torch.equal(seen["hw"], resolution[:2]) and torch.equal(seen["ar"], aspect_ratio[:2])
    assert seen["ar"].dtype == aspect_ratio.dtype and seen["ar"][0].item() == pytest.approx(bucket[0] / bucket[1])
    assert seen["latents"] == (2, 4, bucket[0] // 8, bucket[1] // 8)     # the bucket's latents, as theirs
    assert seen["their_latents"] == (4, *seen["latents"][1:])


def test_ddim_and_bf16_run_end_to_end(tmp_path, capsys):
    """On the bundled toy model: --sampler ddim is pixart_min.sample's DDIM (and not the default DPM-Solver, which
    equals DDIM only at 2 steps), and --dtype bf16 runs T5, the transformer and the sampler in bf16 on the CPU,
    within 0.03 mean absolute error of fp32 (0.4% per bf16 rounding; measured about 0.01), and not equal to it."""
    common, steps = ["a large red circle above a small blue square"], 5
    dpm = run(capsys, *common, "--out", tmp_path / "dpm", steps=steps)[0]
    ddim = run(capsys, *common, "--sampler", "ddim", "--out", tmp_path / "ddim", steps=steps)[0]
    bf16 = run(capsys, *common, "--dtype", "bf16", "--out", tmp_path / "bf16", steps=steps)[0]
    length = PRESETS["toy"].model_max_length
    y, mask = T5TextEncoder(data.TOY, max_length=length)(common)
    want = sample_latents(load_pixart(data.TOY), noise(3, 32, 32), y, mask, steps=steps, sampler="ddim")
    assert torch.allclose(ddim, want[0], atol=1e-5) and (ddim - dpm).abs().max() > 1e-2
    err = (bf16.clamp(-1, 1) - dpm.clamp(-1, 1)).abs().mean().item()
    assert 0 < err <= 0.03
