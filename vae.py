# A compact Stable-Diffusion AutoencoderKL (the VAE PixArt-α works in), with diffusers' parameter names,
# so a diffusers VAE folder (e.g. sd-vae-ft-ema, PixArt's vae/) loads with a strict load_state_dict.
# Architecture: Rombach et al. 2022 (LDM), github.com/CompVis/latent-diffusion; names: diffusers AutoencoderKL.
import inspect
import json
import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

VAE_FILES = ["vae/*", "config.json", "diffusion_pytorch_model*"]   # what to download of a hub id: the VAE alone


def GroupNorm(groups, channels):
    return nn.GroupNorm(groups, channels, eps=1e-6)  # eps 1e-6 everywhere in the LDM autoencoder


#################################################################################
#                                 Building Blocks                               #
#################################################################################

class ResnetBlock(nn.Module):
    """Two (GroupNorm, SiLU, 3x3 conv) steps plus a skip; a 1x1 conv_shortcut when channels change."""
    def __init__(self, in_ch, out_ch, groups):
        super().__init__()
        self.norm1, self.conv1 = GroupNorm(groups, in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2, self.conv2 = GroupNorm(groups, out_ch), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))    # (B, out, H, W)
        h = self.conv2(F.silu(self.norm2(h)))    # (B, out, H, W)
        return self.conv_shortcut(x) + h         # (B, out, H, W)


class Attention(nn.Module):
    """Single-head self-attention over all H*W positions, with a GroupNorm in front and a residual."""
    def __init__(self, ch, groups):
        super().__init__()
        self.group_norm = GroupNorm(groups, ch)
        self.to_q, self.to_k, self.to_v = nn.Linear(ch, ch), nn.Linear(ch, ch), nn.Linear(ch, ch)
        self.to_out = nn.ModuleList([nn.Linear(ch, ch)])  # a list only for the name "to_out.0"

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)                                  # (B, HW, C)
        h = F.scaled_dot_product_attention(self.to_q(h), self.to_k(h), self.to_v(h))      # (B, HW, C)
        return x + self.to_out[0](h).transpose(1, 2).reshape(B, C, H, W)                  # (B, C, H, W)


class Resample(nn.Module):
    """Halve H and W (pad one pixel right and bottom, stride-2 3x3 conv) or double them (nearest x2, 3x3 conv)."""
    def __init__(self, ch, up):
        super().__init__()
        self.up = up
        self.conv = nn.Conv2d(ch, ch, 3, stride=1 if up else 2, padding=1 if up else 0)

    def forward(self, x):
        if self.up:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)
        return self.conv(F.pad(x, (0, 1, 0, 1)))                                  # (B, C, H/2, W/2)


class DownBlock(nn.Module):
    """One encoder level: n ResnetBlocks, then a Resample down except at the last level."""
    def __init__(self, in_ch, out_ch, n, groups, down):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups) for i in range(n))
        self.downsamplers = nn.ModuleList([Resample(out_ch, up=False)] if down else [])

    def forward(self, x):
        for layer in [*self.resnets, *self.downsamplers]:
            x = layer(x)
        return x                                                     # (B, out, H or H/2, W or W/2)


class UpBlock(nn.Module):
    """One decoder level: n ResnetBlocks, then a Resample up except at the last level."""
    def __init__(self, in_ch, out_ch, n, groups, up):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups) for i in range(n))
        self.upsamplers = nn.ModuleList([Resample(out_ch, up=True)] if up else [])

    def forward(self, x):
        for layer in [*self.resnets, *self.upsamplers]:
            x = layer(x)
        return x                                                     # (B, out, H or 2H, W or 2W)


class MidBlock(nn.Module):
    """The bottleneck: ResnetBlock, Attention, ResnetBlock at the lowest resolution."""
    def __init__(self, ch, groups):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(ch, ch, groups), ResnetBlock(ch, ch, groups)])
        self.attentions = nn.ModuleList([Attention(ch, groups)])

    def forward(self, x):
        x = self.resnets[0](x)                                       # (B, C, h, w)
        return self.resnets[1](self.attentions[0](x))                # (B, C, h, w)


#################################################################################
#                               Encoder and Decoder                             #
#################################################################################

class Encoder(nn.Module):
    """Image (B, 3, H, W) -> Gaussian parameters (B, 2 * latent, H/f, W/f), f = 2 ** (levels - 1)."""
    def __init__(self, in_ch, chs, n, groups, latent_ch):
        super().__init__()
        self.conv_in = nn.Conv2d(in_ch, chs[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownBlock(chs[max(i - 1, 0)], c, n, groups, down=i < len(chs) - 1) for i, c in enumerate(chs))
        self.mid_block = MidBlock(chs[-1], groups)
        self.conv_norm_out = GroupNorm(groups, chs[-1])
        self.conv_out = nn.Conv2d(chs[-1], 2 * latent_ch, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)                                          # (B, chs[0], H, W)
        for block in self.down_blocks:
            x = block(x)                                             # ... -> (B, chs[-1], H/f, W/f)
        x = self.mid_block(x)                                        # (B, chs[-1], H/f, W/f)
        return self.conv_out(F.silu(self.conv_norm_out(x)))          # (B, 2 * latent, H/f, W/f)


class Decoder(nn.Module):
    """Latent (B, latent, h, w) -> image (B, 3, h * f, w * f); each level has n + 1 ResnetBlocks."""
    def __init__(self, out_ch, chs, n, groups, latent_ch):
        super().__init__()
        rev = list(reversed(chs))
        self.conv_in = nn.Conv2d(latent_ch, rev[0], 3, padding=1)
        self.mid_block = MidBlock(rev[0], groups)
        self.up_blocks = nn.ModuleList(
            UpBlock(rev[max(i - 1, 0)], c, n + 1, groups, up=i < len(rev) - 1) for i, c in enumerate(rev))
        self.conv_norm_out = GroupNorm(groups, chs[0])
        self.conv_out = nn.Conv2d(chs[0], out_ch, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))                          # (B, chs[-1], h, w)
        for block in self.up_blocks:
            x = block(x)                                             # ... -> (B, chs[0], h * f, w * f)
        return self.conv_out(F.silu(self.conv_norm_out(x)))          # (B, 3, h * f, w * f)


#################################################################################
#                                  AutoencoderKL                                #
#################################################################################

OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


class AutoencoderKL(nn.Module):
    """The SD VAE: encode images to a diagonal Gaussian over latents, decode latents back to images."""
    def __init__(self, in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                 latent_channels=4, norm_num_groups=32, scaling_factor=0.18215, act_fn="silu",
                 down_block_types=None, up_block_types=None):
        super().__init__()
        chs = list(block_out_channels)
        for name, types, plain in [("down_block_types", down_block_types, "DownEncoderBlock2D"),
                                   ("up_block_types", up_block_types, "UpDecoderBlock2D")]:
            if types is not None and list(types) != [plain] * len(chs):
                raise ValueError(f"{name} must be {len(chs)} x {plain!r} (the plain SD VAE), got {types}")
        if act_fn != "silu":
            raise ValueError(f"act_fn must be 'silu' (the SD VAE), got {act_fn!r}")
        self.scaling_factor = scaling_factor      # latents are multiplied by this before diffusion (SD: 0.18215)
        self.latent_channels = latent_channels
        self.downscale = 2 ** (len(chs) - 1)      # 8 for the SD VAE
        self.encoder = Encoder(in_channels, chs, layers_per_block, norm_num_groups, latent_channels)
        self.decoder = Decoder(out_channels, chs, layers_per_block, norm_num_groups, latent_channels)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)

    def encode(self, images):
        """images (B, 3, H, W) in [-1, 1] -> latent mean and std, each (B, latent, H/8, W/8), unscaled."""
        H, W = images.shape[-2:]
        if H % self.downscale or W % self.downscale:
            raise ValueError(f"image height and width must be multiples of {self.downscale}, got {H}x{W}")
        mean, logvar = self.quant_conv(self.encoder(images)).chunk(2, dim=1)  # (B, latent, H/8, W/8) each
        return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))              # clamp as diffusers and LDM do

    def decode(self, latents):
        """unscaled latents (B, latent, h, w) -> images (B, 3, 8h, 8w), roughly in [-1, 1], not clamped."""
        return self.decoder(self.post_quant_conv(latents))                  # (B, 3, 8h, 8w)

    @classmethod
    def from_pretrained(cls, folder, device=None, dtype=None):
        """Load a diffusers VAE folder (config.json + weights) or a pipeline folder that holds vae/. For a hub id,
        download it first: pixart_min.local_folder(hub_id, VAE_FILES)."""
        folder = Path(folder)
        if (folder / "vae" / "config.json").is_file():
            folder = folder / "vae"
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"no VAE config.json in {folder} (nor in {folder / 'vae'})")
        config = json.loads((folder / "config.json").read_text())
        for key in ["use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"]:
            if config.get(key) is False:
                raise ValueError(f"{folder}: {key}=false is not the SD VAE and is not supported")
        known = inspect.signature(cls).parameters
        model = cls(**{k: v for k, v in config.items() if k in known})  # other config keys are ignored
        if (folder / "diffusion_pytorch_model.safetensors").is_file():
            from safetensors.torch import load_file
            state = load_file(folder / "diffusion_pytorch_model.safetensors")
        elif (folder / "diffusion_pytorch_model.bin").is_file():
            state = torch.load(folder / "diffusion_pytorch_model.bin", map_location="cpu", weights_only=True)
        else:
            raise FileNotFoundError(f"no diffusion_pytorch_model.safetensors or .bin in {folder}")
        # The one key map: old files call the attention weights query/key/value/proj_attn, maybe as 1x1 convs.
        renamed = {}
        for k, v in state.items():
            new = re.sub(r"(attentions\.\d+)\.(query|key|value|proj_attn)\.",
                         lambda m: f"{m[1]}.{OLD_ATTENTION_NAMES[m[2]]}.", k)
            renamed[new] = v[:, :, 0, 0] if new != k and v.ndim == 4 else v
        expected = model.state_dict()
        missing = sorted(expected.keys() - renamed.keys())
        unexpected = sorted(renamed.keys() - expected.keys())
        wrong = [f"{k} {tuple(renamed[k].shape)} != {tuple(v.shape)}"
                 for k, v in expected.items() if k in renamed and renamed[k].shape != v.shape]
        if missing or unexpected or wrong:
            raise ValueError(f"{folder}: weights do not match config.json; missing keys: {missing}; "
                             f"unexpected keys: {unexpected}; wrong shapes (file != model): {wrong}")
        model.load_state_dict(renamed, strict=True)
        return model.to(device=device, dtype=dtype).eval()


class Pixels(nn.Module):
    """The toy world's "autoencoder": the latents are the pixels themselves, so nothing is learned."""
    scaling_factor, downscale, latent_channels = 1.0, 1, 3

    def encode(self, images):
        return images, torch.zeros_like(images)

    def decode(self, latents):
        return latents
