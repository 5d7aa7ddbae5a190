"""Stage 1 of PixArt-alpha's training (§2.2): a class-conditional DiT (Peebles & Xie 2023) that learns to draw,
built from pixart_min's pieces under the official DiT key names, so DiT-XL-2-256.pt loads strictly; and the
re-parameterisation (§2.3) that turns it into a PixArt computing the same thing at t = 500.
"""
import json
from dataclasses import asdict

import torch
import torch.nn as nn
from einops import rearrange

import pixart_min as pm


class DiTBlock(nn.Module):
    """A DiT block: adaLN-Zero from its own MLP on (timestep + class), self-attention, MLP; no text."""
    def __init__(self, dim, num_heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = pm.SelfAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = pm.Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))   # the per-block MLP PixArt drops

    def forward(self, x, c):                                           # x (B, N, D), c (B, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c)[:, None].chunk(6, -1)
        x = x + gate_msa * self.attn(pm.modulate(self.norm1(x), shift_msa, scale_msa))    # (B, N, D)
        return x + gate_mlp * self.mlp(pm.modulate(self.norm2(x), shift_mlp, scale_mlp))  # (B, N, D)


class DiTFinalLayer(nn.Module):
    """adaLN from its own MLP on (timestep + class), then a linear back to patch pixels."""
    def __init__(self, dim, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):                                           # x (B, N, D), c (B, D)
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, -1)  # each (B, 1, D)
        return self.linear(pm.modulate(self.norm_final(x), shift, scale))   # (B, N, p*p*C_out)


class DiT(nn.Module):
    """Class-conditional DiT with PixArt's patch, position and timestep embedders; `y` is a (B,) class label."""
    def __init__(self, config: pm.PixArtConfig, num_classes):
        super().__init__()
        c, D = config, config.hidden_size
        self.config, self.num_classes, self.grad_checkpointing = c, num_classes, False
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv2d(c.in_channels, D, c.patch_size, stride=c.patch_size)
        self.t_embedder = pm.TimestepEmbedder(D)
        self.y_embedder = nn.Module()
        self.y_embedder.embedding_table = nn.Embedding(num_classes + 1, D)   # the last row: the null class
        self.blocks = nn.ModuleList(DiTBlock(D, c.num_heads, c.mlp_ratio) for _ in range(c.depth))
        self.final_layer = DiTFinalLayer(D, c.patch_size, 2 * c.in_channels if c.learn_sigma else c.in_channels)
        grid = c.input_size // c.patch_size
        self.register_buffer("pos_embed", pm.sincos_pos_embed(D, grid, grid, grid, c.pe_interpolation)[None])
        # DiT's init: xavier for every linear and the patchify conv, normal(0.02) for the embedders, and zeros for
        # every adaLN MLP's output (adaLN-Zero: each block starts as the identity) and for the final linear
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(m.weight.view(len(m.weight), -1)), nn.init.zeros_(m.bias)
        for w in (self.y_embedder.embedding_table.weight, self.t_embedder.mlp[0].weight, self.t_embedder.mlp[2].weight):
            nn.init.normal_(w, std=0.02)
        for m in [*(b.adaLN_modulation[1] for b in self.blocks), self.final_layer.adaLN_modulation[1],
                  self.final_layer.linear]:
            nn.init.zeros_(m.weight), nn.init.zeros_(m.bias)

    def forward(self, x, t, y, mask=None, hw=None, ar=None, force_drop_ids=None):
        """x (B, C, H, W), t (B,) timesteps, y (B,) class labels (num_classes: the null class). PixArt's other
        arguments are taken and ignored, so the same training loss and sampler serve both."""
        (B, _, H, W), p = x.shape, self.config.patch_size
        x = rearrange(self.x_embedder.proj(x), "b d h w -> b (h w) d").contiguous()  # (B, N, D)
        if H == W == self.config.input_size:
            x = x + self.pos_embed                                     # (B, N, D)
        else:                                                          # another grid: PixArt's table for it
            base = self.config.input_size // p
            x = x + pm.sincos_pos_embed(x.shape[-1], H // p, W // p, base, self.config.pe_interpolation)[None].to(x)
        if force_drop_ids is not None or self.training:                # 10% null class, for guidance
            drop = torch.rand(B, device=y.device) < self.config.class_dropout_prob if force_drop_ids is None \
                else force_drop_ids.bool()
            y = torch.where(drop, self.num_classes, y)
        c = self.t_embedder(t) + self.y_embedder.embedding_table(y)   # (B, D)
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, c, use_reentrant=False)   # recompute in backward
            else:
                x = block(x, c)                                        # (B, N, D)
        x = self.final_layer(x, c)                                     # (B, N, p*p*C_out)
        return rearrange(x, "b (h w) (p q c) -> b c (h p) (w q)", h=H // p, p=p, q=p)      # (B, C_out, H, W)


def dit_from_weights(sd, source, config=None):
    """A DiT from a state dict in the official DiT layout (e.g. DiT-XL-2-256.pt, or save_dit's file), with its
    config as stored or, if none is, as the tensors' shapes tell it."""
    config = pm.PixArtConfig(**(config or pm.config_from_weights(sd, captions=False)))
    model = DiT(config, num_classes=sd["y_embedder.embedding_table.weight"].shape[0] - 1)
    pm.load_strict(model, {k: v.float() for k, v in sd.items()}, source)
    return model


def save_dit(model, path):
    """The weights in fp16 under the official DiT keys, in a .safetensors file with the config in its metadata."""
    from safetensors.torch import save_file
    sd = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(path), metadata={"pixart_config": json.dumps(asdict(model.config))})


@torch.no_grad()
def reparameterize(dit, t=500):
    """Paper §2.3: a PixArt that computes what the DiT computed for the null class at step t. t_block takes
    block 0's adaLN MLP, E(i) absorbs the difference for each block, and the zeroed cross-attention output
    projections make the text invisible until training teaches the model to read it. t=None: the ablation without
    it: only the weights the two models share are copied; t_block and the tables keep PixArt's initialisation."""
    pixart = pm.PixArt(dit.config)
    sd, dit_sd = pixart.state_dict(), dit.state_dict()
    sd.update({k: v for k, v in dit_sd.items() if k in sd and k != "y_embedder.y_embedding"})
    if t is None:
        pm.load_strict(pixart, sd, "DiT's shared weights")
        return pixart
    sd["t_block.1.weight"] = dit_sd["blocks.0.adaLN_modulation.1.weight"]
    sd["t_block.1.bias"] = dit_sd["blocks.0.adaLN_modulation.1.bias"]
    t_emb = dit.t_embedder(torch.tensor([t], device=dit.pos_embed.device))            # (1, D)
    c = t_emb + dit.y_embedder.embedding_table.weight[-1:]                           # null class
    t0 = nn.functional.linear(nn.functional.silu(t_emb), sd["t_block.1.weight"], sd["t_block.1.bias"])  # (1, 6D)
    for i, block in enumerate(dit.blocks):
        sd[f"blocks.{i}.scale_shift_table"] = (block.adaLN_modulation(c) - t0).reshape(6, -1)
    sd["final_layer.scale_shift_table"] = dit.final_layer.adaLN_modulation(c).reshape(2, -1) - t_emb
    pm.load_strict(pixart, sd, "re-parameterised DiT")
    return pixart
