"""pixart-min: PixArt-alpha in one file. The transformer (paper §2.3), the diffusion (schedule, hybrid loss,
samplers), the T5 text side and the loading of official weights. Read it top to bottom.

Paper: Chen et al., "PixArt-alpha: Fast Training of Diffusion Transformer for Photorealistic Text-to-Image
Synthesis", arXiv 2310.00426. Official code: github.com/PixArt-alpha/PixArt-alpha.
"""
import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm


@dataclass
class PixArtConfig:
    """Sizes of a PixArt model, named as in the official code; the defaults are PixArt-XL-2 at 256 px."""
    input_size: int = 32          # latent side at the training resolution (256 px / 8)
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    caption_channels: int = 4096  # T5-v1.1-XXL width
    model_max_length: int = 120   # text tokens: 120 in PixArt-alpha, 300 in PixArt-Sigma
    learn_sigma: bool = True
    micro_condition: bool = False  # 1024-MS: embed the image size and aspect ratio
    pe_interpolation: float = 1.0  # "lewei_scale": alpha 1 at 256 and 512 px, 2 at 1024; Sigma input_size / 64
    class_dropout_prob: float = 0.1  # §2.2: 10% of captions replaced by the null caption
    prediction: str = "epsilon"   # what the network predicts: the noise (the paper), or "v" (the toy; see eps_from)


PRESETS = {
    "PixArt-XL-2-256": PixArtConfig(input_size=32),
    "PixArt-XL-2-512": PixArtConfig(input_size=64),
    "PixArt-XL-2-1024-MS": PixArtConfig(input_size=128, micro_condition=True, pe_interpolation=2.0),
    # PixArt-Sigma (arXiv 2403.04692): alpha's keys and sizes; 300 tokens, no micro-conditions, the SDXL VAE
    **{f"PixArt-Sigma-XL-2-{name}": PixArtConfig(input_size=n, model_max_length=300, pe_interpolation=n / 64)
       for name, n in [("256x256", 32), ("512-MS", 64), ("1024-MS", 128), ("2K-MS", 256)]},
    "toy": PixArtConfig(input_size=32, patch_size=4, in_channels=3, hidden_size=192, depth=6, num_heads=3,
                        caption_channels=64, model_max_length=24, prediction="v"),
    "tiny": PixArtConfig(input_size=8, hidden_size=32, depth=2, num_heads=2, caption_channels=32),
}


# ==================== Embeddings for timesteps and positions (§2.3) ===========

def timestep_embedding(t, dim=256, max_period=10000):
    """Sinusoidal features [cos, sin] of (B,) scalars, as in DiT and the official code."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t[:, None].float() * freqs[None]                           # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)      # (B, dim)


class TimestepEmbedder(nn.Module):
    """Scalar -> sinusoid -> MLP. Embeds the timestep, and in 1024-MS the image size and aspect ratio."""
    def __init__(self, hidden_size, freq_dim=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t):
        return self.mlp(timestep_embedding(t).to(self.mlp[0].weight.dtype))   # (B, D)


def sincos_pos_embed(dim, gh, gw, base_size, pe_interpolation):
    """MAE's 2-D sin-cos table (gh*gw, dim). Both axes span base_size cells whatever the grid's size, so
    a model trained on a base_size grid sees familiar positions at other sizes and aspect ratios."""
    def axis(n, d):                                                   # (n,) positions -> (n, d)
        pos = torch.arange(n, dtype=torch.float64) / (n / base_size) / pe_interpolation
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2))
        out = pos[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)
    ew, eh = axis(gw, dim // 2), axis(gh, dim // 2)                    # first half of channels: the column
    table = torch.cat([ew[None, :, :].expand(gh, gw, -1), eh[:, None, :].expand(gh, gw, -1)], dim=-1)
    return table.reshape(gh * gw, dim).float()


# ==================== The PixArt block (§2.3) =================================

def modulate(x, shift, scale):
    """adaLN's shift and scale of a normalised x (B, N, D) by (B, 1, D) vectors; scale 0 leaves x as it is."""
    return x * (1 + scale) + shift


class SelfAttention(nn.Module):
    """Multi-head self-attention over image tokens, q, k and v from one fused linear."""
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):                                             # x (B, N, D)
        q, k, v = rearrange(self.qkv(x), "b n (k h d) -> k b h n d", k=3, h=self.num_heads).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)                   # (B, H, N, D/H)
        return self.proj(rearrange(x, "b h n d -> b n (h d)"))        # (B, N, D)


class CrossAttention(nn.Module):
    """Image tokens (queries) attend to their own caption's real tokens (keys and values)."""
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, y, mask=None):                               # x (B, N, D), y (B, L, D), mask (B, L)
        q = rearrange(self.q_linear(x), "b n (h d) -> b h n d", h=self.num_heads)
        k, v = rearrange(self.kv_linear(y), "b l (k h d) -> k b h l d", k=2, h=self.num_heads).unbind(0)
        keep = None if mask is None else mask.bool()[:, None, None, :]    # (B, 1, 1, L)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)   # (B, H, N, D/H)
        return self.proj(rearrange(x, "b h n d -> b n (h d)"))        # (B, N, D)


class Mlp(nn.Module):
    """Two linears with tanh-GELU between, as in the official code (its caption embedder uses one too)."""
    def __init__(self, dim, hidden, out=None):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, out or dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))     # (B, N, D)


class PixArtBlock(nn.Module):
    """DiT block + cross-attention, modulated by adaLN-single: S(i) = t_block(t) + E(i) (§2.3)."""
    def __init__(self, dim, num_heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, num_heads)
        self.cross_attn = CrossAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim ** 0.5)  # E(i), this block's own

    def forward(self, x, y, t0, mask=None):                           # x (B, N, D), y (B, L, D), t0 (B, 6D)
        s = self.scale_shift_table[None] + t0.reshape(len(x), 6, -1)  # (B, 6, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = s.chunk(6, dim=1)  # each (B, 1, D)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))           # (B, N, D)
        x = x + self.cross_attn(x, y, mask)                                                    # (B, N, D)
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))            # (B, N, D)
        return x


class FinalLayer(nn.Module):
    """adaLN (shift, scale from the raw timestep embedding) then a linear back to patch pixels."""
    def __init__(self, dim, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim ** 0.5)

    def forward(self, x, t):                                          # x (B, N, D), t (B, D)
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)   # each (B, 1, D)
        return self.linear(modulate(self.norm_final(x), shift, scale))               # (B, N, p*p*C_out)


# ==================== PixArt model ============================================

class CaptionEmbedder(nn.Module):
    """T5 features -> hidden size; holds the null caption, a fixed random buffer as in the official code."""
    def __init__(self, caption_channels, hidden_size, num_tokens):
        super().__init__()
        self.y_proj = Mlp(caption_channels, hidden_size, hidden_size)
        self.register_buffer("y_embedding", torch.randn(num_tokens, caption_channels) / caption_channels ** 0.5)


class PixArt(nn.Module):
    """The PixArt-alpha transformer: latents, timestep and T5 caption in; noise (or v) and variance out."""
    def __init__(self, config: PixArtConfig):
        super().__init__()
        c, D = config, config.hidden_size
        if c.prediction not in ("epsilon", "v"):
            raise ValueError(f"prediction must be 'epsilon' or 'v', got {c.prediction!r}")
        if D % c.num_heads or (c.micro_condition and D % 3):           # heads split D; size embeddings take D/3 each
            raise ValueError(f"hidden_size {D} must divide into {c.num_heads} heads"
                             + (" and into 3 (the micro-conditions)" if c.micro_condition else ""))
        self.config = c
        self.out_channels = c.in_channels * 2 if c.learn_sigma else c.in_channels
        self.base_size = c.input_size // c.patch_size
        self.grad_checkpointing = False
        self.has_null_caption = True  # False for diffusers weights, which drop y_embedding
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv2d(c.in_channels, D, c.patch_size, stride=c.patch_size)
        self.t_embedder = TimestepEmbedder(D)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))  # adaLN-single's one shared MLP
        self.y_embedder = CaptionEmbedder(c.caption_channels, D, c.model_max_length)
        if c.micro_condition:
            self.csize_embedder = TimestepEmbedder(D // 3)              # h and w: 2 * D/3
            self.ar_embedder = TimestepEmbedder(D // 3)                 # h/w: D/3
        self.blocks = nn.ModuleList(PixArtBlock(D, c.num_heads, c.mlp_ratio) for _ in range(c.depth))
        self.final_layer = FinalLayer(D, c.patch_size, self.out_channels)
        # the official checkpoints store this fixed table; forward recomputes it for other grid sizes
        self.register_buffer("pos_embed", sincos_pos_embed(D, self.base_size, self.base_size, self.base_size,
                                                           c.pe_interpolation)[None])
        self._pos_cache = {}
        self.initialize_weights()

    def initialize_weights(self):
        # Official init: xavier for every linear, then normal(0.02) for the embedding MLPs, and zeros for the
        # cross-attention output and the final linear, so training starts from "no text effect, no output".
        for m in self.modules():                 # the patchify conv counts as a linear (its bias keeps torch's init)
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(m.weight.view(len(m.weight), -1))
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear) and ("embedder" in name or name == "t_block.1"):
                nn.init.normal_(m.weight, std=0.02)
            if name.endswith("cross_attn.proj") or name == "final_layer.linear":
                nn.init.zeros_(m.weight), nn.init.zeros_(m.bias)

    def pos_embed_for(self, gh, gw):
        """The (1, gh*gw, D) position table for a gh x gw token grid, computed once per size."""
        if (gh, gw) == (self.base_size, self.base_size):
            return self.pos_embed
        key = (gh, gw, self.pos_embed.device, self.pos_embed.dtype)
        if key not in self._pos_cache:
            table = sincos_pos_embed(self.config.hidden_size, gh, gw, self.base_size, self.config.pe_interpolation)
            self._pos_cache[key] = table[None].to(self.pos_embed)
        return self._pos_cache[key]

    def forward(self, x, t, y, mask=None, hw=None, ar=None, force_drop_ids=None):
        """x (B, C, H, W) latents, t (B,) timesteps, y (B, L, C_text) T5 features, mask (B, L) 1 = real token,
        hw (B, 2) pixel height and width and ar (B, 1) height/width for 1024-MS. Returns (B, C_out, H, W)."""
        c, (B, _, H, W) = self.config, x.shape
        p = c.patch_size
        if H % p or W % p:
            raise ValueError(f"latent size {H}x{W} is not divisible by the patch size {p}")
        if y.shape[-1] != c.caption_channels:
            raise ValueError(f"caption features have {y.shape[-1]} channels, the model expects {c.caption_channels}")
        # .contiguous(): as a transposed view, the tokens would keep their strides through every add and slow linears
        x = rearrange(self.x_embedder.proj(x), "b d h w -> b (h w) d").contiguous()   # (B, N, D), N = HW/p^2
        x = x + self.pos_embed_for(H // p, W // p)                                 # (B, N, D)
        t = self.t_embedder(t)                                                     # (B, D)
        if c.micro_condition:
            if hw is None or ar is None:
                raise ValueError("this 1024-MS model needs the micro-conditions hw (B, 2) and ar (B, 1)")
            csize = rearrange(self.csize_embedder(hw.reshape(-1)), "(b k) d -> b (k d)", b=B)  # (B, 2D/3)
            t = t + torch.cat([csize, self.ar_embedder(ar.reshape(-1))], dim=1)     # (B, D)
        t0 = self.t_block(t)                                                       # (B, 6D)
        if force_drop_ids is not None or (self.training and c.class_dropout_prob > 0):
            drop = (torch.rand(B, device=y.device) < c.class_dropout_prob if force_drop_ids is None
                    else force_drop_ids.bool())
            y = torch.where(drop[:, None, None], self.y_embedder.y_embedding[:y.shape[1]].to(y), y)  # null caption
        y = self.y_embedder.y_proj(y.to(x.dtype))                                  # (B, L, D)
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                x = checkpoint(block, x, y, t0, mask, use_reentrant=False)         # recompute in backward
            else:
                x = block(x, y, t0, mask)                                          # (B, N, D)
        x = self.final_layer(x, t)                                                 # (B, N, p*p*C_out)
        return rearrange(x, "b (h w) (p q c) -> b c (h p) (w q)", h=H // p, p=p, q=p)  # (B, C_out, H, W)


# ==================== Diffusion: schedule, loss, samplers ======================

T = 1000                                                   # training steps, linear betas 1e-4 .. 0.02 (paper appendix)
BETAS = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
ALPHAS_CUMPROD = torch.cumprod(1 - BETAS, dim=0)           # alpha-bar_t: the share of signal left at step t


def q_sample(x0, t, noise):
    """Noise clean latents to step t: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
    a = ALPHAS_CUMPROD.to(x0.device)[t][:, None, None, None]
    return a.sqrt().float() * x0 + (1 - a).sqrt().float() * noise


def posterior(x0, xt, a_t, a_s):
    """Mean, log-variance and log beta of q(x_s | x_t, x0) for s < t (s = t-1 in training, a skip when sampling).
    a_t, a_s are float64 alpha-bars: in float32, 1 - 0.9999 loses most of its digits."""
    beta = 1 - a_t / a_s                                   # the effective beta of the step t -> s
    c0, c1 = a_s.sqrt() * beta / (1 - a_t), (a_t / a_s).sqrt() * (1 - a_s) / (1 - a_t)
    logvar = (beta * (1 - a_s) / (1 - a_t)).log()
    return c0.float() * x0 + c1.float() * xt, logvar.float(), beta.log().float()


def learned_logvar(var, min_log, max_log):
    """Improved DDPM's learned range: the variance channel in [-1, 1] interpolates log beta~ and log beta."""
    frac = (var + 1) / 2
    return frac * max_log + (1 - frac) * min_log


def eps_from(out, xt, a_t, prediction):
    """The noise estimate from the network's output at alpha-bar a_t. A "v" network predicts
    v = sqrt(a_t) eps - sqrt(1 - a_t) x0 (Salimans & Ho 2022): at large t that is about -x0, so its error
    is not multiplied by 1/sqrt(a_t) on the way to the clean picture, as an eps network's is (notebook 02)."""
    return out if prediction == "epsilon" else a_t ** 0.5 * out + (1 - a_t) ** 0.5 * xt


def training_loss(model, x0, y, mask=None, hw=None, ar=None, t=None, noise=None, prediction=None):
    """The paper's hybrid loss: MSE on eps (or on v) + improved DDPM's variational bound for the variance
    (mean detached). `prediction` defaults to the model's own target; to eps for a plain function."""
    if prediction is None:
        prediction = model.config.prediction if isinstance(model, PixArt) else "epsilon"
    B, C = x0.shape[:2]
    t = torch.randint(0, T, (B,), device=x0.device) if t is None else t
    noise = torch.randn_like(x0) if noise is None else noise
    xt = q_sample(x0, t, noise)
    out = model(xt, t, y, mask, hw, ar).float()
    if out.shape[1] != 2 * C:
        raise ValueError("the hybrid loss trains the variance too: the model must learn sigma (learn_sigma=True)")
    out, var = out.split(C, dim=1)                                              # (B, C, H, W) each
    abar = F.pad(ALPHAS_CUMPROD, (1, 0), value=1.0).to(x0.device)   # abar[k] = alpha-bar_(k-1), 1 at k=0
    a_t, a_s = abar[t + 1].view(B, 1, 1, 1), abar[t].view(B, 1, 1, 1)
    target = noise if prediction == "epsilon" else a_t.sqrt().float() * noise - (1 - a_t).sqrt().float() * x0
    mse = ((target - out) ** 2).mean(dim=(1, 2, 3))
    eps = eps_from(out, xt, a_t.float(), prediction)                            # the bound reads the noise estimate
    true_mean, min_log, log_beta = posterior(x0, xt, a_t, a_s)
    min_log = min_log.clamp(min=math.log(BETAS[1] * (1 - ALPHAS_CUMPROD[0]) / (1 - ALPHAS_CUMPROD[1])))  # t=0: -inf
    x0_pred = (xt - (1 - a_t).sqrt().float() * eps.detach()) / a_t.sqrt().float()
    mean, logvar = posterior(x0_pred, xt, a_t, a_s)[0], learned_logvar(var, min_log, log_beta)
    kl = 0.5 * (-1 + logvar - min_log + (min_log - logvar).exp() + (true_mean - mean) ** 2 * (-logvar).exp())
    # at t = 0 the bound's term is the decoder's likelihood of x0 on a 256-level grid instead
    cdf = lambda z: torch.special.ndtr(z * (-0.5 * logvar).exp())
    up = torch.where(x0 > 0.999, torch.ones_like(x0), cdf(x0 - mean + 1 / 255))
    lo = torch.where(x0 < -0.999, torch.zeros_like(x0), cdf(x0 - mean - 1 / 255))
    nll = -(up - lo).clamp(min=1e-12).log()
    vb = torch.where(t.view(B, 1, 1, 1) == 0, nll, kl).mean(dim=(1, 2, 3)) / math.log(2.0)   # in bits
    return (mse + vb).mean()


def timesteps(steps, start=T - 1, lcm=False):
    """The sampling grid of PixArt's hub scheduler ("linspace" spacing): e.g. 999, 949, ..., 100, 50 for 20 steps.
    LCM's: `steps` points of the 50-step grid it was distilled on (999, 979, ..., 19): 999, 759, 499, 259 for 4."""
    if lcm:
        return T - 1 - T // 50 * (torch.arange(steps) * 50 // steps)
    return torch.linspace(0, start, steps + 1, dtype=torch.float64).round().flip(0)[:-1].long()


@torch.no_grad()
def sample(model, noise, y, mask, *, null_y=None, null_mask=None, steps=20, cfg_scale=4.5, sampler="dpm-solver",
           hw=None, ar=None, generator=None, progress=False, start=T - 1, known=None):
    """Denoise `noise` (B, C, H, W) into clean latents, guided by captions y (B, L, C_text) with mask (B, L).
    The null caption is the model's y_embedding unless null_y (the negative prompt's features) is given.
    sampler "lcm" is a consistency model's (PixArt-LCM: 4 steps, cfg_scale=1, which runs the captioned half alone).
    A lower `start` finishes latents already noised to that step (q_sample: SDEdit). known=(latents, keep) inpaints:
    where keep (bool) is True, x is those latents noised to each step with x's first noise; the model paints the
    rest. `generator` draws ddpm's noise: one for the batch, or a list of one per picture (each its own)."""
    steps, start = check_sample_args(model, noise, y, mask, null_y, null_mask, steps, cfg_scale, sampler,
                                     generator, start, known)
    if null_y is None:                       # the official guidance: the null caption, with the prompt's mask
        null_y, null_mask = model.y_embedder.y_embedding[None, :y.shape[1]].expand_as(y), mask
    B, C, dtype = len(noise), model.config.in_channels, next(model.parameters()).dtype
    k = 1 if cfg_scale == 1 else 2          # guidance at scale 1 is the captioned prediction: no null half
    y2, m2 = torch.cat([null_y, y])[-k * B:], None if mask is None else torch.cat([null_mask, mask])[-k * B:]
    if m2 is not None and m2.any():          # padding that every caption masks changes nothing: drop it once
        keep = int(m2.any(0).nonzero().max()) + 1
        y2, m2 = y2[:, :keep], m2[:, :keep]
    hw2, ar2 = (None if v is None else v.repeat(k, 1) for v in (hw, ar))
    ts, abar = timesteps(steps, start, lcm=sampler == "lcm"), ALPHAS_CUMPROD
    ts_device = ts.to(noise.device)          # copied once: a copy from the CPU inside the loop would wait for the GPU
    x, x0_prev = noise.float(), None
    if known is not None:                    # the noise that x holds over the known latents
        (original, keep), a = (known[0].float(), known[1]), abar[ts[0]].item()
        eps_known = (x - math.sqrt(a) * original) / math.sqrt(1 - a)
    for i in tqdm(range(steps), disable=not progress, desc=sampler):
        t = ts[i]
        out = model(x.repeat(k, 1, 1, 1).to(dtype), ts_device[i].repeat(k * B), y2, m2, hw2, ar2).float()
        out_u, out_c = out[:B, :C], out[-B:, :C]                         # (B, C, H, W) each; at k = 1 the same
        a_t = abar[t].item()
        eps = eps_from(out_u + cfg_scale * (out_c - out_u), x, a_t, model.config.prediction)   # guided noise
        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)             # the clean latents it predicts
        if sampler == "lcm":                 # consistency models' boundary condition f(x, 0) = x; t scaled by 10
            c = (10 * t.item()) ** 2 + 0.25                              # sigma_data^2 = 0.25; ~x0 unless t < 1
            x0 = 0.25 / c * x + math.sqrt(1 - 0.25 / c) * x0
        a_s = abar[ts[i + 1]].item() if i + 1 < steps else 1.0          # 1.0: clean
        if i + 1 == steps:                                               # every sampler ends on that estimate
            x = x0
        elif sampler == "ddim":                                          # deterministic: keep the same eps
            x = math.sqrt(a_s) * x0 + math.sqrt(1 - a_s) * eps
        elif sampler in ("ddpm", "lcm"):                                 # ancestral: fresh noise at each step
            z = (torch.stack([torch.randn(x.shape[1:], generator=g) for g in generator])
                 if isinstance(generator, list) else torch.randn(x.shape, generator=generator)).to(x.device)
            if sampler == "lcm":                                         # the estimate, noised afresh to step s
                x = math.sqrt(a_s) * x0 + math.sqrt(1 - a_s) * z
            else:                                                        # the posterior, with the learned variance
                mean, min_log, max_log = posterior(x0, x, abar[t], abar[ts[i + 1]])
                x = mean + (0.5 * learned_logvar(out[-B:, C:], min_log.float(), max_log.float())).exp() * z
        else:                                                 # DPM-Solver++(2M), in lambda = log(alpha/sigma)
            lam = lambda a: 0.5 * math.log(a / (1 - a))
            h = lam(a_s) - lam(a_t)
            d = x0
            if x0_prev is not None:                                      # second order: extrapolate x0
                r = (lam(a_t) - lam(abar[ts[i - 1]].item())) / h
                d = x0 + 0.5 * (x0 - x0_prev) / r
            x = math.sqrt((1 - a_s) / (1 - a_t)) * x - math.sqrt(a_s) * math.expm1(-h) * d
            x0_prev = x0
        if known is not None:                # inpainting: the known region, noised to where x is now
            x = torch.where(keep, math.sqrt(a_s) * original + math.sqrt(1 - a_s) * eps_known, x)
    return x


# ==================== Text: sentencepiece pieces -> T5 features ===============

def local_folder(path, allow_patterns=None):
    """A local file or folder as it is, or a hub id ("org/name") downloaded once into the hub's cache."""
    path = str(path)
    if os.path.exists(path):
        return Path(path)
    if path.count("/") == 1 and not path.startswith((".", "/", "~")):
        from huggingface_hub import snapshot_download
        try:
            return Path(snapshot_download(path, allow_patterns=allow_patterns))
        except Exception as e:
            raise FileNotFoundError(f"{path} is no local path, and the hub did not give it: {e}") from e
    raise FileNotFoundError(f"no such file or folder: {path}")


def tokenize(sp, prompts, max_length=120):
    """Prompts -> ids and mask (B, max_length) as T5's tokenizer makes them: pieces, </s> (id 1), padding (id 0)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)   # one prompt, not one per character
    ids, mask = torch.zeros(2, len(prompts), max_length, dtype=torch.long)       # (B, max_length) each
    for i, pieces in enumerate(sp.encode(prompts)):
        if len(pieces) >= max_length:
            warnings.warn(f"prompt {i} has {len(pieces) + 1} tokens and was truncated to {max_length}: "
                          f"the end, {sp.decode(pieces[max_length - 1:])!r}, is ignored")
            pieces = pieces[:max_length - 1]
        ids[i, :len(pieces) + 1] = torch.tensor(pieces + [1])
        mask[i, :len(pieces) + 1] = 1
    return ids, mask


T5_FILES = ["text_encoder/*", "tokenizer/*", "spiece.model", "config.json", "model*"]   # what a hub id's download needs


class T5TextEncoder:
    """Prompts -> (features (B, L, C), mask (B, L)) with transformers' T5EncoderModel, frozen (§2.4)."""
    def __init__(self, path, device="cpu", dtype=torch.float32, max_length=120, load_in_8bit=False):
        import sentencepiece
        from transformers import T5EncoderModel
        root = local_folder(path, T5_FILES)
        spm = next((f for f in (root / "tokenizer" / "spiece.model", root / "spiece.model") if f.exists()), None)
        if spm is None:
            raise FileNotFoundError(f"no spiece.model in {root} or {root / 'tokenizer'}")
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(spm))
        folder = root / "text_encoder" if (root / "text_encoder").is_dir() else root
        if load_in_8bit:                    # bitsandbytes on a GPU: linear layers in 8 bits, placed by transformers
            if not str(device).startswith("cuda"):
                raise ValueError(f"load_in_8bit needs a CUDA device (and the bitsandbytes and accelerate packages), "
                                 f"got device {device!r}")
            from transformers import BitsAndBytesConfig
            model = T5EncoderModel.from_pretrained(folder, dtype=dtype, device_map=device,
                                                   quantization_config=BitsAndBytesConfig(load_in_8bit=True))
        else:
            model = T5EncoderModel.from_pretrained(folder, dtype=dtype).to(device)
        self.model = model.eval().requires_grad_(False)
        self.device, self.max_length = device, max_length

    def tokenize(self, prompts):
        return tokenize(self.sp, prompts, self.max_length)

    @torch.no_grad()
    def __call__(self, prompts):
        ids, mask = (a.to(self.device) for a in self.tokenize(prompts))
        return self.model(input_ids=ids, attention_mask=mask).last_hidden_state, mask


# ==================== Weights: official .pth, safetensors and the diffusers layout 

DIFFUSERS_NAMES = [  # (diffusers, official) name pieces; q/k/v are fused separately below
    ("pos_embed.proj.", "x_embedder.proj."), ("caption_projection.linear_1.", "y_embedder.y_proj.fc1."),
    ("caption_projection.linear_2.", "y_embedder.y_proj.fc2."), ("adaln_single.linear.", "t_block.1."),
    *[(f"adaln_single.emb.{d}_embedder.linear_{i}.", f"{o}_embedder.mlp.{j}.") for d, o in
      [("timestep", "t"), ("resolution", "csize"), ("aspect_ratio", "ar")] for i, j in [(1, 0), (2, 2)]],
    ("proj_out.", "final_layer.linear."),
    ("transformer_blocks.", "blocks."), (".attn1.to_out.0.", ".attn.proj."), (".attn2.to_q.", ".cross_attn.q_linear."),
    ("attn2.to_out.0.", "cross_attn.proj."), (".ff.net.0.proj.", ".mlp.fc1."), (".ff.net.2.", ".mlp.fc2."),
]


def from_diffusers(sd):
    """diffusers' PixArtTransformer2DModel state dict -> the official keys."""
    out = {}
    for k, v in sd.items():
        k = "final_layer.scale_shift_table" if k == "scale_shift_table" else k
        for theirs, ours in DIFFUSERS_NAMES:
            k = k.replace(theirs, ours)
        out[k] = v
    for k in [k for k in out if ".attn1.to_q." in k]:                 # fuse q, k, v and k, v back together
        a, b = k.split(".attn1.to_q.")
        out[f"{a}.attn.qkv.{b}"] = torch.cat([out.pop(f"{a}.attn1.to_{n}.{b}") for n in "qkv"])
        out[f"{a}.cross_attn.kv_linear.{b}"] = torch.cat([out.pop(f"{a}.attn2.to_{n}.{b}") for n in "kv"])
    return out


def pe_interpolation(input_size, max_length):
    """The position table's scale where a config does not say: alpha's rule, or Sigma's (300 tokens) without a floor."""
    return input_size / 64 if max_length == 300 else max(input_size // 64, 1)


def config_from_diffusers(cfg, sigma=False):
    """diffusers' transformer config.json -> PixArtConfig fields. Its config does not store the caption length:
    sigma=True (the pipeline is PixArtSigmaPipeline), 2K (only Sigma has it) or Sigma's 256 px scale 0.5 say 300."""
    if "caption_channels" not in cfg:                                 # e.g. another model's transformer/
        raise ValueError(f"not a PixArt transformer: its config.json ({cfg.get('_class_name', 'no class name')}) has "
                         "no caption_channels")
    size, c_in = cfg["sample_size"], cfg["in_channels"]
    micro, scale = cfg.get("use_additional_conditions"), cfg.get("interpolation_scale")
    tokens = 300 if sigma or size == 256 or scale == size / 64 < 1 else 120
    return dict(input_size=size, patch_size=cfg["patch_size"], in_channels=c_in, depth=cfg["num_layers"],
                hidden_size=cfg["num_attention_heads"] * cfg["attention_head_dim"],
                num_heads=cfg["num_attention_heads"], caption_channels=cfg["caption_channels"],
                learn_sigma=cfg.get("out_channels") == 2 * c_in, model_max_length=tokens,
                micro_condition=size == 128 and tokens == 120 if micro is None else micro,
                pe_interpolation=scale or pe_interpolation(size, tokens))


def config_from_weights(sd, captions=True):
    """What the tensors' shapes tell. Head count is not in the weights: XL has 16 heads, DiT's others 64 wide, and
    another PixArt's is None (unknown). captions=False: a class-conditional DiT's weights (stage 1), no captions."""
    try:
        D, c_in, p = sd["x_embedder.proj.weight"].shape[:3]
        cfg = dict(patch_size=p, in_channels=c_in, hidden_size=D, mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / D,
                   num_heads=16 if D == 1152 else None if captions else max(D // 64, 1),
                   depth=len({k.split(".")[1] for k in sd if k.startswith("blocks.")}),
                   model_max_length=len(sd.get("y_embedder.y_embedding", range(120))),
                   learn_sigma=sd["final_layer.linear.weight"].shape[0] == p * p * 2 * c_in,
                   micro_condition="csize_embedder.mlp.0.weight" in sd)
        if captions:
            cfg["caption_channels"] = sd["y_embedder.y_proj.fc1.weight"].shape[1]
    except KeyError as e:
        raise ValueError(f"not a PixArt checkpoint: it has no {e} (first keys: {sorted(sd)[:3]})") from None
    if "pos_embed" in sd:                                                # (1, (input_size/p)^2, D)
        cfg["input_size"] = math.isqrt(sd["pos_embed"].shape[1]) * p
        cfg["pe_interpolation"] = pe_interpolation(cfg["input_size"], cfg["model_max_length"])
    return cfg


def read_weights(path):
    """(state dict, stored config or None) of a .pth / .pt / .safetensors file, with clear errors."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                return {k: f.get_tensor(k) for k in f.keys()}, json.loads(meta.get("pixart_config", "null"))
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read {path}: {e}\n(a truncated download, or not a checkpoint file?)") from e
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} holds a {type(ckpt).__name__}, not a state dict")
    return ckpt.get("state_dict", ckpt), ckpt.get("config")


def load_strict(model, sd, source):
    """load_state_dict(strict=True), but first list every missing, unexpected and mis-shaped key by name."""
    own = model.state_dict()
    problems = [f"missing: {k}" for k in sorted(own.keys() - sd.keys())]
    problems += [f"unexpected: {k}" for k in sorted(sd.keys() - own.keys())]
    problems += [f"wrong shape: {k} is {tuple(sd[k].shape)} in the file, {tuple(own[k].shape)} in the model"
                 for k in sorted(own.keys() & sd.keys()) if sd[k].shape != own[k].shape]
    if problems:
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ValueError(f"{source} does not fit {model.config}:\n  " + "\n  ".join(problems[:20]) + more)
    model.load_state_dict(sd, strict=True)


def load_pixart(path, device="cpu", dtype=torch.float32, **config):
    """An official .pth, a .safetensors file, or a diffusers folder / hub id -> PixArt in eval mode.
    Keyword arguments override config fields the weights cannot tell (num_heads, input_size, ...)."""
    path = local_folder(path, ["transformer/*", "model_index.json"])
    if (path / "pixart.safetensors").exists():                          # this project's own model folders
        path = path / "pixart.safetensors"
    if path.is_dir():
        folder = path / "transformer" if (path / "transformer").is_dir() else path
        files = sorted(folder.glob("diffusion_pytorch_model*.safetensors")) or sorted(folder.glob("*.bin"))
        if not files or not (folder / "config.json").exists():
            raise FileNotFoundError(f"{folder} has no config.json and diffusion_pytorch_model.safetensors")
        sd = {k: v for f in files for k, v in read_weights(f)[0].items()}
        index = folder.parent / "model_index.json"                      # a whole pipeline's: which one?
        sigma = index.is_file() and "PixArtSigmaPipeline" in index.read_text()
        stored = config_from_diffusers(json.loads((folder / "config.json").read_text()), sigma)
    else:
        sd, stored = read_weights(path)
    diffusers = "pos_embed.proj.weight" in sd
    sd = from_diffusers(sd) if diffusers else sd
    names = {f.name for f in fields(PixArtConfig)}
    if unknown := config.keys() - names:
        raise TypeError(f"unknown config fields {sorted(unknown)}; PixArtConfig has {sorted(names)}")
    cfg = {**(stored or config_from_weights(sd)), **config}
    if cfg.get("num_heads") is None:                                     # a guess would load, and draw noise
        raise ValueError(f"{path} does not tell the head count of its {cfg['hidden_size']}-wide model: pass num_heads")
    if "input_size" not in cfg:
        raise ValueError(f"{path} does not tell the training resolution: pass input_size (latent side, 128 at 1024 px)")
    cfg.setdefault("pe_interpolation", pe_interpolation(cfg["input_size"], cfg["model_max_length"]))
    if len(sd.get("y_embedder.y_embedding", ())) not in (0, cfg["model_max_length"]):
        raise ValueError(f"{path} holds a null caption of {len(sd['y_embedder.y_embedding'])} tokens (PixArt-alpha: "
                         f"120, PixArt-Sigma: 300), the config asks for {cfg['model_max_length']}: drop that override")
    model = PixArt(PixArtConfig(**cfg))
    if "pos_embed" in sd and sd["pos_embed"].shape != model.pos_embed.shape:
        raise ValueError(f"pos_embed is {tuple(sd['pos_embed'].shape)} in {path}, but input_size "
                         f"{cfg['input_size']} gives {tuple(model.pos_embed.shape)}")
    sd["pos_embed"] = model.pos_embed                                    # a fixed sin-cos table: recomputed
    if diffusers or (stored and "y_embedder.y_embedding" not in sd):    # no null caption: diffusers drops it, and
        model.has_null_caption = False                                   # so does save_pixart for such a model
        sd["y_embedder.y_embedding"] = model.y_embedder.y_embedding
    load_strict(model, sd, str(path))
    return model.to(device, dtype).eval()


def save_pixart(model, path):
    """Official keys in a .safetensors file, with the config in its metadata so load_pixart needs nothing else.
    A model loaded from diffusers weights is saved without y_embedding: its random one is no null caption."""
    from safetensors.torch import save_file
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()
          if model.has_null_caption or k != "y_embedder.y_embedding"}
    save_file(sd, str(path), metadata={"pixart_config": json.dumps(asdict(model.config))})


# ==================== sample()'s arguments, checked ==========================

def check_sample_args(model, noise, y, mask, null_y, null_mask, steps, cfg_scale, sampler, generator, start, known):
    """sample()'s arguments, checked before any work, each mistake by name. Returns steps and start as ints."""
    if sampler not in ("dpm-solver", "ddim", "ddpm", "lcm"):
        raise ValueError(f"unknown sampler {sampler!r}: choose dpm-solver, ddim, ddpm or lcm")
    if sampler == "lcm" and (cfg_scale != 1 or start != T - 1 or not 1 <= steps <= 50):
        raise ValueError(f"lcm takes no guidance (its teacher's is distilled in: cfg_scale=1), starts from pure noise "
                         f"and takes 1 to 50 steps; got cfg_scale={cfg_scale}, start={start}, steps={steps}")
    if not (int(start) == start and 1 <= start < T):
        raise ValueError(f"start must be a step from 1 to {T - 1}, got {start!r}")
    if not (int(steps) == steps and 1 <= steps <= start):  # more steps than that would visit one t twice
        raise ValueError(f"steps must be an integer from 1 to {start}, got {steps!r}")
    if model.training:
        raise ValueError("sample needs model.eval(): in training mode the model drops captions at random")
    if isinstance(generator, list) and len(generator) != len(noise):
        raise ValueError(f"{len(generator)} generators for {len(noise)} pictures: give one per picture, or one")
    if sampler == "ddpm" and not model.config.learn_sigma:
        raise ValueError("ddpm draws with the learned variance, and this model does not learn sigma: "
                         "use dpm-solver or ddim")
    if not math.isfinite(cfg_scale) or cfg_scale < 0:
        raise ValueError(f"guidance scale must be a finite number >= 0, got {cfg_scale!r}")
    if known is not None and not (known[0].shape == noise.shape and known[1].dtype == torch.bool and known[1].dim()
                                  == noise.dim() and all(k in (1, n) for k, n in zip(known[1].shape, noise.shape))):
        raise ValueError(f"known=(latents, keep) needs latents of the noise's shape {tuple(noise.shape)} and a "
                         f"bool keep that broadcasts to it, got {tuple(known[0].shape)} and {known[1].dtype} "
                         f"{tuple(known[1].shape)}")
    if y.dim() == 3 and y.shape[1] > model.config.model_max_length:   # alpha: 120 tokens, Sigma: 300 (a DiT: labels)
        raise ValueError(f"captions of {y.shape[1]} tokens, but this model reads at most "
                         f"{model.config.model_max_length}: encode them to that length (T5TextEncoder's max_length)")
    if null_y is None and not model.has_null_caption and cfg_scale != 1:
        raise ValueError("this model's weights carry no null caption (diffusers format): pass null_y and "
                         "null_mask, the features of the negative prompt ('' by default)")
    if null_y is not None and (null_mask is None) != (mask is None):
        raise ValueError("give null_mask with null_y (and mask with y), or neither: masks say which tokens are real")
    if null_y is not None and len(null_y) != len(y):
        raise ValueError(f"{len(null_y)} null captions for {len(y)} captions: give one per caption")
    return int(steps), int(start)
