# vae.py against diffusers' AutoencoderKL (test-only oracle), random weights, nothing downloaded.
import json
import re

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersVAE
from safetensors.torch import save_file

from conftest import report
from vae import AutoencoderKL

TOL = 1e-4
OLD_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
NARROW = dict(block_out_channels=[16, 32, 32], layers_per_block=2, latent_channels=4, norm_num_groups=8,
              down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3)
SD_VAE = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, norm_num_groups=32,
              sample_size=256, scaling_factor=0.18215,
              down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)


def reference(config, seed=0):
    """A diffusers VAE with random weights; GroupNorm scales and shifts randomised too (they start at 1 and 0)."""
    torch.manual_seed(seed)
    ref = DiffusersVAE(**config).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
    return ref


def max_err(a, b):
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def narrow(tmp_path_factory):
    folder = tmp_path_factory.mktemp("narrow")
    ref = reference(NARROW)
    ref.save_pretrained(folder, safe_serialization=True)
    return ref, folder


def rewrite(folder, state, tmp_path):
    """Save `state` with the narrow config.json into a fresh folder."""
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "diffusion_pytorch_model.safetensors")
    return tmp_path


def check_parity(ref, ours, images, label):
    with torch.no_grad():
        dist = ref.encode(images).latent_dist
        mean, std = ours.encode(images)
        latents = torch.randn_like(mean)
        errors = dict(mean=max_err(mean, dist.mean), std=max_err(std, dist.std),
                      decode=max_err(ours.decode(latents), ref.decode(latents).sample))
    for k, v in errors.items():
        report(f"VAE {label}: {k}", v)
    assert all(e <= TOL for e in errors.values()), errors


def test_narrow_parity(narrow):
    ref, folder = narrow
    ours = AutoencoderKL.from_pretrained(folder)
    assert not ours.training and ours.scaling_factor == ref.config.scaling_factor
    assert ours.state_dict().keys() == ref.state_dict().keys()
    torch.manual_seed(1)
    images = torch.rand(2, 3, 32, 48) * 2 - 1                                  # non-square
    check_parity(ref, ours, images, "narrow config, 2x3x32x48 image")
    assert ours.encode(images)[0].shape == (2, 4, 8, 12)


def test_pipeline_folder_and_bin(narrow, tmp_path):
    ref, folder = narrow
    ref.save_pretrained(tmp_path / "vae", safe_serialization=False)          # a pipeline folder, .bin weights
    ours = AutoencoderKL.from_pretrained(tmp_path, dtype=torch.float64)
    assert next(ours.parameters()).dtype == torch.float64
    assert max_err(ours.decode(torch.ones(1, 4, 2, 2, dtype=torch.float64)).float(),
                   ref.decode(torch.ones(1, 4, 2, 2)).sample.detach()) <= TOL


def test_old_attention_names(narrow, tmp_path):
    ref, folder = narrow
    old = {}                                                                 # diffusers' names -> old names
    for k, v in ref.state_dict().items():
        m = re.match(r"(.*attentions\.0)\.(to_q|to_k|to_v|to_out\.0)\.(weight|bias)$", k)
        if m:
            k = f"{m[1]}.{OLD_NAMES[m[2]]}.{m[3]}"
            if m[3] == "weight":
                v = v[:, :, None, None]                                      # some old files: 1x1 conv weights
        old[k] = v
    assert any(".query." in k for k in old) and any(".proj_attn." in k for k in old)
    ours = AutoencoderKL.from_pretrained(rewrite(folder, old, tmp_path))
    torch.manual_seed(2)
    check_parity(ref, ours, torch.rand(1, 3, 16, 24) * 2 - 1, "old attention names")


# PixArt-Sigma's VAE is SDXL's: the same architecture and keys, latents scaled by 0.13025 (docs/sigma.md §4)
SDXL_VAE = dict(SD_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=False)


@pytest.mark.parametrize("name, config", [("sd-vae-ft-ema", SD_VAE), ("SDXL (PixArt-Sigma)", SDXL_VAE)])
def test_sd_vae_full_size_decode(name, config, tmp_path):
    ref = reference(config)
    ref.save_pretrained(tmp_path, safe_serialization=True)
    ours = AutoencoderKL.from_pretrained(tmp_path)
    assert ours.scaling_factor == ref.config.scaling_factor == config["scaling_factor"]   # read from config.json
    torch.manual_seed(3)
    latents = torch.randn(1, 4, 8, 8)                                  # as the sampler leaves them: scaled
    with torch.no_grad():
        out, want = ours.decode(latents / ours.scaling_factor), ref.decode(latents / ref.config.scaling_factor).sample
    report(f"VAE {name} config: decode 1x4x8x8", max_err(out, want))
    assert out.shape == (1, 3, 64, 64) and max_err(out, want) <= TOL


@pytest.mark.parametrize("change, match", [
    ("missing", "missing keys: .*decoder.conv_out.bias"),
    ("unexpected", "unexpected keys: .*encoder.extra.weight"),
    ("shape", r"wrong shapes .*quant_conv.weight \(8, 8, 3, 3\) != \(8, 8, 1, 1\)"),
])
def test_bad_weights(narrow, tmp_path, change, match):
    ref, folder = narrow
    state = dict(ref.state_dict())
    if change == "missing":
        del state["decoder.conv_out.bias"]
    elif change == "unexpected":
        state["encoder.extra.weight"] = torch.zeros(3)
    else:
        state["quant_conv.weight"] = torch.zeros(8, 8, 3, 3)
    with pytest.raises(ValueError, match=match):
        AutoencoderKL.from_pretrained(rewrite(folder, state, tmp_path))


def test_bad_folders_and_config(narrow, tmp_path):
    ref, folder = narrow
    with pytest.raises(FileNotFoundError, match="nowhere"):
        AutoencoderKL.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model"):
        AutoencoderKL.from_pretrained(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    for key, value in [("act_fn", "gelu"), ("down_block_types", ["DownBlock2D"] * 3), ("use_quant_conv", False)]:
        (tmp_path / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(ValueError, match=key):
            AutoencoderKL.from_pretrained(tmp_path)


def test_bad_image_size():
    ours = AutoencoderKL(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4)
    with pytest.raises(ValueError, match="multiples of 8"):
        ours.encode(torch.zeros(1, 3, 32, 36))
