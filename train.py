"""One training loop for every setting: the shapes world on a laptop CPU, precomputed real data on a GPU,
many GPUs with torchrun. The paper's recipe (§2.2 and its appendix): hybrid loss, AdamW, warm-up, gradient
clipping, 10% null captions, EMA, bf16 on GPUs.

  python train.py                                          # toy world, CPU, defaults: a text-to-image model
  python train.py --cond class --out runs/stage1           # stage 1: class-conditional DiT (pixel dependency)
  python train.py --init-dit runs/stage1/last.pt --out runs/stage2    # re-parameterise, then dense captions
  python train.py --init runs/stage2/last.pt --image-size 64 --out runs/stage3   # stage 3: higher resolution
  python train.py --resume runs/stage2/last.pt             # continue a killed run, step for step
  python train.py --lr-decay cosine --timesteps logit-normal   # beyond the paper's recipe: see the README
  python train.py --score checkpoints/toy --eval-n 200     # no training: score a model on 4 x 200 seeded prompts
  python train.py --score checkpoints/toy --eval-n 200 --eval-seed 4242   # the same on another seeded draw
  python train.py --data my_images/ --t5 T5 --vae VAE --preset PixArt-XL-2-256 --image-size 256   # real data
  torchrun --nproc_per_node 8 train.py ...                 # DDP across GPUs (gloo on CPUs)
"""
import argparse
import json
import math
import os
import sys
import textwrap
import time
from contextlib import nullcontext
from copy import deepcopy
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from einops import rearrange
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

import pixart_min as pm
import shapes

from sample import TOY as TOY_TEXT  # checkpoints/toy: the toy world's tokenizer and frozen T5 live here


# ==================== Stage 1: a class-conditional DiT (Peebles & Xie), official key names ====================

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


class DiT(pm.PixArt):
    """Class-conditional DiT with the same embedders as PixArt; `y` is a (B,) class label. Loads DiT-XL-2-256.pt."""
    def __init__(self, config, num_classes):
        super().__init__(config)
        D, self.num_classes = config.hidden_size, num_classes
        del self.t_block, self.y_embedder                              # DiT has neither
        self.y_embedder = nn.Module()
        self.y_embedder.embedding_table = nn.Embedding(num_classes + 1, D)   # the last row: the null class
        self.blocks = nn.ModuleList(DiTBlock(D, config.num_heads, config.mlp_ratio) for _ in range(config.depth))
        del self.final_layer.scale_shift_table
        self.final_layer.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))
        self.initialize_weights()
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for m in [*(b.adaLN_modulation[1] for b in self.blocks), self.final_layer.adaLN_modulation[1]]:
            nn.init.zeros_(m.weight), nn.init.zeros_(m.bias)          # adaLN-Zero: every block starts as identity

    def forward(self, x, t, y, mask=None, hw=None, ar=None, force_drop_ids=None):
        B, _, H, W = x.shape
        p = self.config.patch_size
        x = self.x_embedder.proj(x).flatten(2).transpose(1, 2) + self.pos_embed_for(H // p, W // p)   # (B, N, D)
        if self.training:                                              # 10% null class, for guidance
            drop = torch.rand(B, device=y.device) < self.config.class_dropout_prob if force_drop_ids is None else force_drop_ids.bool()
            y = torch.where(drop, self.num_classes, y)
        c = self.t_embedder(t) + self.y_embedder.embedding_table(y)   # (B, D)
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, c, use_reentrant=False)   # recompute in backward
            else:
                x = block(x, c)                                        # (B, N, D)
        shift, scale = self.final_layer.adaLN_modulation(c)[:, None].chunk(2, -1)
        x = self.final_layer.linear(pm.modulate(self.final_layer.norm_final(x), shift, scale))  # (B, N, p*p*C_out)
        return rearrange(x, "b (h w) (p q c) -> b c (h p) (w q)", h=H // p, p=p, q=p)      # (B, C_out, H, W)


@torch.no_grad()
def reparameterize(dit, t=500):
    """Paper §2.3: a PixArt that computes what the DiT computed for the null class at step t. t_block takes
    block 0's adaLN MLP, E(i) absorbs the difference for each block, and the zeroed cross-attention output
    projections make the text invisible until training teaches the model to read it."""
    pixart = pm.PixArt(dit.config)
    sd, dit_sd = pixart.state_dict(), dit.state_dict()
    sd.update({k: v for k, v in dit_sd.items() if k in sd and k != "y_embedder.y_embedding"})
    sd["t_block.1.weight"], sd["t_block.1.bias"] = dit_sd["blocks.0.adaLN_modulation.1.weight"], dit_sd["blocks.0.adaLN_modulation.1.bias"]
    t_emb = dit.t_embedder(torch.tensor([t], device=dit.pos_embed.device))            # (1, D)
    c = t_emb + dit.y_embedder.embedding_table.weight[-1:]                           # null class
    t0 = nn.functional.linear(nn.functional.silu(t_emb), sd["t_block.1.weight"], sd["t_block.1.bias"])  # (1, 6D)
    for i, block in enumerate(dit.blocks):
        sd[f"blocks.{i}.scale_shift_table"] = (block.adaLN_modulation(c) - t0).reshape(6, -1)
    sd["final_layer.scale_shift_table"] = dit.final_layer.adaLN_modulation(c).reshape(2, -1) - t_emb
    pm.load_strict(pixart, sd, "re-parameterised DiT")
    return pixart


def read_checkpoint(path):
    """torch.load of a .pt file, stopping with a message that names the file if it cannot be read."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).split(". ")[0]                  # torch's own reason, without its advice
        raise SystemExit(f"train.py: cannot read {path} ({first}): a truncated file, or not a checkpoint?") from None


def model_from(ckpt, weights, source):
    """The model of one of this script's checkpoints (a stage-1 DiT or a PixArt), with its raw ("state_dict") or
    EMA weights."""
    config = pm.PixArtConfig(**ckpt["config"])
    model = DiT(config, ckpt["num_classes"]) if ckpt["kind"] == "dit" else pm.PixArt(config)
    pm.load_strict(model, ckpt[weights], source)
    model.has_null_caption = ckpt.get("has_null_caption", True)   # False: started from diffusers weights
    return model


def check_fits(model, data, source):
    """Stop, naming the file, when a model's latent or caption channels are not the data's."""
    pairs = [("latent", model.config.in_channels, data.channels)]
    if not isinstance(model, DiT):
        pairs.append(("caption", model.config.caption_channels, data.caption_channels))
    for what, theirs, ours in pairs:
        if theirs != ours:
            raise SystemExit(f"train.py: {source} takes {theirs} {what} channels, and this data has {ours}")


def load_model(path):
    """A model to start from: a training checkpoint of this script (its raw weights), or official weights."""
    ckpt = read_checkpoint(path) if str(path).endswith(".pt") else None
    if ckpt is not None and "kind" in ckpt:                                         # stage 1, 2 or 3 of this script
        return model_from(ckpt, "state_dict", path)
    if ckpt is not None and "y_embedder.embedding_table.weight" in ckpt:            # official DiT, e.g. DiT-XL-2-256.pt
        D, c_in, p = ckpt["x_embedder.proj.weight"].shape[:3]
        config = pm.PixArtConfig(input_size=math.isqrt(ckpt["pos_embed"].shape[1]) * p, patch_size=p, in_channels=c_in,
                                 hidden_size=D, depth=len({k.split(".")[1] for k in ckpt if k.startswith("blocks.")}),
                                 num_heads=16 if D == 1152 else max(D // 64, 1))   # as pixart_min.config_from_weights
        model = DiT(config, num_classes=ckpt["y_embedder.embedding_table.weight"].shape[0] - 1)
        pm.load_strict(model, ckpt, path)
        return model
    return pm.load_pixart(path).train()


# ==================== Text: the toy world's tokenizer and frozen T5 ====================

def build_toy_text(folder, d_model=64, seed=0):
    """A sentencepiece tokenizer trained on the toy vocabulary and a tiny T5 encoder, random and frozen (seed 0):
    the same code path as the official T5-XXL, at a size a laptop trains against in minutes."""
    import sentencepiece as spm
    from transformers import T5Config, T5EncoderModel
    (folder / "tokenizer").mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(shapes.VOCAB_SENTENCES), model_prefix=str(folder / "tokenizer" / "spiece"),
                                   vocab_size=len({w for s in shapes.VOCAB_SENTENCES for w in s.split()}) + 8,
                                   model_type="word", hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    (folder / "tokenizer" / "spiece.vocab").unlink()                 # a human-readable copy we do not need
    vocab = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer" / "spiece.model")).vocab_size()
    torch.manual_seed(seed)
    t5 = T5EncoderModel(T5Config(vocab_size=vocab, d_model=d_model, d_kv=16, d_ff=4 * d_model, num_layers=2,
                                 num_heads=4, feed_forward_proj="gated-gelu"))
    # T5 knows word order only through its relative-position biases. At their random initial size they barely move
    # the attention, so "red left of blue" and "blue left of red" come out alike; ten times larger, they do not.
    with torch.no_grad():
        t5.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.mul_(10)
    t5.save_pretrained(folder / "text_encoder")


class CachedText:
    """T5 features of captions, each computed once: the toy world only has a few thousand distinct captions."""
    def __init__(self, encoder):
        self.encoder, self.cache = encoder, {}

    def __call__(self, captions):
        new = sorted({c for c in captions if c not in self.cache})
        if new:
            y, mask = self.encoder(new)
            self.cache.update({c: (y[i].cpu(), mask[i].cpu()) for i, c in enumerate(new)})
        return torch.stack([self.cache[c][0] for c in captions]), torch.stack([self.cache[c][1] for c in captions])


# ==================== Data: a global batch for one step, the same on every rank ====================

class ShapesData:
    """Batches drawn on the fly from the shapes world: pixels are the latents (no VAE), 3 channels."""
    def __init__(self, args, text):
        self.args, self.text, self.channels, self.downscale = args, text, 3, 1
        self.caption_channels, self.length = pm.PRESETS["toy"].caption_channels, pm.PRESETS["toy"].model_max_length

    def batch(self, rng, n):
        images, dense, sparse, labels, specs = shapes.sample_batch(n, rng, self.args.image_size,
                                                                   two_share=self.args.two_objects)
        if self.args.cond == "class":
            return dict(x0=images, y=labels, mask=None)
        y, mask = self.text(dense if self.args.captions == "dense" else sparse)
        return dict(x0=images, y=y, mask=mask)


IMAGE_TYPES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def read_captions(folder):
    """(image path, caption) pairs: from captions.jsonl ({"file": ..., "text": ...} per line) or a .txt beside each image."""
    folder = Path(folder)
    if (folder / "captions.jsonl").exists():
        rows = [json.loads(line) for line in (folder / "captions.jsonl").read_text().splitlines() if line.strip()]
        return [(folder / r["file"], r["text"]) for r in rows]
    return [(f, f.with_suffix(".txt").read_text().strip()) for f in sorted(folder.iterdir())
            if f.suffix.lower() in IMAGE_TYPES and f.with_suffix(".txt").exists()]


@torch.no_grad()
def precompute(folder, cache, t5_path, vae_path, image_size, device):
    """Once, as the official pipeline does: each image resized and cropped to its aspect-ratio bucket and encoded
    by the VAE (latent mean and std), each caption by T5. Unreadable images are skipped and counted."""
    from sample import ASPECT_RATIOS_TRAIN, bucket, resize_and_crop
    from vae import AutoencoderKL
    vae = AutoencoderKL.from_pretrained(vae_path, device=device)
    t5 = pm.T5TextEncoder(t5_path, device=device)
    cache.mkdir(parents=True, exist_ok=True)
    pairs, index, skipped = read_captions(folder), [], 0
    for path, caption in tqdm(pairs, desc="precompute"):
        try:
            with Image.open(path) as im:
                pixels = np.array(im.convert("RGB"))   # a copy torch may write to
        except Exception as e:                             # a corrupt file costs one image, not the run
            skipped += 1
            tqdm.write(f"skipping {path}: {e}")
            continue
        H, W = pixels.shape[:2]
        ratio = min(ASPECT_RATIOS_TRAIN, key=lambda r: abs(r - H / W))
        h, w = bucket(H, W, image_size, 2 * vae.downscale, ASPECT_RATIOS_TRAIN)  # patch 2 divides
        image = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 127.5 - 1          # (1, 3, H, W)
        mean, std = vae.encode(resize_and_crop(image, h, w).to(device))                     # (1, C, h/f, w/f)
        y, mask = t5([caption])
        n = int(mask.sum())                                # keep the real tokens only; padding comes back at batch time
        name = f"{len(index):07d}.pt"
        torch.save(dict(mean=mean[0].half().cpu(), std=std[0].half().cpu(), y=y[0, :n].half().cpu(),
                        hw=(H, W), ar=ratio), cache / name)
        index.append(dict(file=name, bucket=f"{h}x{w}"))
    if not index:
        raise SystemExit(f"train.py: no readable image with a caption in {folder} ({skipped} unreadable)")
    (cache / "index.json").write_text(json.dumps(dict(items=index, skipped=skipped, max_length=t5.max_length,
                                                      scaling_factor=vae.scaling_factor, channels=mean.shape[1],
                                                      downscale=vae.downscale, caption_channels=y.shape[-1],
                                                      image_size=image_size)))
    print(f"precomputed {len(index)} images into {cache}; skipped {skipped} unreadable")


class FolderData:
    """Precomputed real data. Each batch comes from one aspect-ratio bucket, chosen in proportion to its size;
    latents are drawn from the stored mean and std every time, as the official training does."""
    def __init__(self, cache):
        meta = json.loads((cache / "index.json").read_text())
        self.cache, self.length, self.scale, self.channels = cache, meta["max_length"], meta["scaling_factor"], meta["channels"]
        self.downscale, self.caption_channels = meta["downscale"], meta["caption_channels"]
        self.image_size = meta.get("image_size")          # None: a cache from before it was recorded
        self.buckets = {}
        for item in meta["items"]:
            self.buckets.setdefault(item["bucket"], []).append(item["file"])
        if not self.buckets:
            raise SystemExit(f"train.py: no usable images in {cache}")
        self.names = sorted(self.buckets)

    def batch(self, rng, n):
        sizes = np.array([len(self.buckets[b]) for b in self.names])
        files = self.buckets[self.names[rng.choice(len(sizes), p=sizes / sizes.sum())]]
        items = [torch.load(self.cache / files[i], weights_only=True) for i in rng.integers(len(files), size=n)]
        mean, std = torch.stack([it["mean"] for it in items]).float(), torch.stack([it["std"] for it in items]).float()
        eps = torch.from_numpy(rng.standard_normal(mean.shape, dtype=np.float32))
        y = torch.zeros(n, self.length, items[0]["y"].shape[-1])
        mask = torch.zeros(n, self.length, dtype=torch.long)
        for i, it in enumerate(items):
            y[i, :len(it["y"])], mask[i, :len(it["y"])] = it["y"].float(), 1
        return dict(x0=(mean + std * eps) * self.scale, y=y, mask=mask,
                    hw=torch.tensor([it["hw"] for it in items], dtype=torch.float32),
                    ar=torch.tensor([[it["ar"]] for it in items], dtype=torch.float32))


# ==================== Evaluation: sample fixed prompts, read the pictures back ====================

@torch.no_grad()
def evaluate(model, data, args, n_per_group, device, grid_path=None, progress=False):
    """Scores of the EMA model on fixed prompts (seeded): one and two objects, seen and held-out colour-shape
    pairs. A class-conditional model knows only its class, object 0's shape: it is scored on how often the
    largest object of a one-object scene has that shape."""
    rng, S = np.random.default_rng(args.eval_seed), args.image_size
    specs = [shapes.random_spec(rng, k, held) for held in (False, True) for k in (1, 2) for _ in range(n_per_group)]
    noise = torch.randn(len(specs), data.channels, S, S, generator=torch.Generator().manual_seed(args.eval_seed))
    if args.cond == "class":                        # scored on one object: draw only those, with the same noise
        keep = [i for i, s in enumerate(specs) if len(s.objects) == 1]
        specs, noise = [specs[i] for i in keep], noise[keep]
        y, mask = torch.tensor([shapes.class_label(s) for s in specs]), None
        null_y = torch.full_like(y, model.num_classes)
    else:
        (y, mask), null_y = data.text([shapes.dense_caption(s) for s in specs]), None
    part = lambda v, i: None if v is None else v[i:i + 64].to(device)
    images = torch.cat([pm.sample(model, part(noise, i), part(y, i), part(mask, i), null_y=part(null_y, i),
                                  null_mask=part(mask, i) if null_y is not None else None,
                                  steps=args.eval_steps, cfg_scale=args.cfg).clamp(-1, 1).cpu()
                        for i in tqdm(range(0, len(specs), 64), desc="score", disable=not progress)])
    if grid_path:
        pick = slice(None, None, max(1, len(images) // 32))
        captions = [shapes.dense_caption(s) if args.cond == "text" else s.objects[0].shape for s in specs[pick]]
        save_grid(images[pick][:32], grid_path, captions=captions)
    if args.cond == "class":   # the largest object's shape, not the best of several: the colour cannot pick a match
        pairs = [(s.objects[0].shape, found[0].shape if found else None) for s, found in zip(specs, shapes.detect(images))]
        share = lambda ps: float(np.mean([asked == read for asked, read in ps])) if ps else float("nan")
        return {"1obj": {"shape": share(pairs), **{k: share([p for p in pairs if p[0] == k]) for k in shapes.SHAPES}}}
    records = shapes.evaluate_each(images, specs)
    held = [any((o.color, o.shape) in shapes.HELD_OUT for o in s.objects) for s in specs]
    return {f"{'held_' if h else ''}{k}obj": shapes.summarize([r for r, s, hs in zip(records, specs, held)
                                                              if len(s.objects) == k and hs == h])
            for h in (False, True) for k in (1, 2)}


def save_grid(images, path, cols=8, scale=4, captions=None):
    """A PNG of images in [-1, 1], upscaled so the small toy pictures can be seen; each with its caption below."""
    n, _, h, w = images.shape
    rows, text_h, gap = math.ceil(n / cols), 40 if captions else 0, 4
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    grid = Image.new("RGB", (cols * (w * scale + gap), rows * (h * scale + text_h + gap)), "white")
    draw = ImageDraw.Draw(grid)
    for i in range(n):
        x, y = (i % cols) * (w * scale + gap), (i // cols) * (h * scale + text_h + gap)
        grid.paste(Image.fromarray(pixels[i]).resize((w * scale, h * scale), Image.NEAREST), (x, y))
        if captions:
            draw.multiline_text((x + 2, y + h * scale + 1), textwrap.fill(captions[i][:80], w * scale // 6), fill="black")
    grid.save(path)


# ==================== The schedule of one run: learning rate and timesteps ====================

def learning_rate(step, args):
    """Linear warm-up to --lr, then constant (the paper). With --lr-decay cosine that rate, warm-up included, is
    multiplied by 0.5 * (1 + cos(pi * step / --steps)), which falls from 1 at step 0 to 0 at --steps."""
    lr = args.lr * min(1.0, (step + 1) / args.warmup)
    if args.lr_decay == "cosine":
        lr *= 0.5 * (1 + math.cos(math.pi * step / args.steps))
    return lr


def draw_timesteps(n, generator, how="uniform"):
    """(n,) training timesteps. uniform over 0..T-1 is the paper's. logit-normal (t/T the sigmoid of a standard
    normal, as in Stable Diffusion 3) spends two thirds of the steps between t=270 and t=730, where notebook 02
    shows the toy model's clean-picture estimate going from mostly right to mostly wrong, and few at the ends."""
    if how == "uniform":
        return torch.randint(0, pm.T, (n,), generator=generator)
    return (torch.sigmoid(torch.randn(n, generator=generator)) * pm.T).long()


# ==================== Checkpoints: everything needed to continue, written atomically ====================

def save_checkpoint(path, model, ema, opt, step, args):
    """Write to a temporary file, then rename: a run killed mid-write never leaves a half-written checkpoint."""
    ckpt = dict(kind="dit" if isinstance(model, DiT) else "pixart", config=asdict(model.config),
                num_classes=getattr(model, "num_classes", None), has_null_caption=model.has_null_caption,
                state_dict=model.state_dict(), state_dict_ema=ema.state_dict(), optimizer=opt.state_dict(), step=step,
                args=vars(args))
    tmp = Path(str(path) + ".tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def forget_after(path, step, step_of):
    """Drop a log's lines after `step`: a run resumed from there writes them again."""
    if path.exists():
        path.write_text("".join(line for line in path.read_text().splitlines(True) if step_of(line) <= step))


RESUME_MAY_CHANGE = {"resume", "steps", "lr", "warmup", "clip", "eval_every", "save_every"}   # the rest: the run's own


def parse_args(argv=None, named_only=False):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/toy", help="folder for checkpoints, samples and metrics")
    p.add_argument("--data", default="shapes", help="'shapes' (drawn on the fly) or a folder of images with captions")
    p.add_argument("--cache", help="real data: where the precomputed features go (default DATA/.pixart_cache)")
    p.add_argument("--t5", help="real data: the T5 folder or hub id to precompute caption features with")
    p.add_argument("--vae", help="real data: the VAE folder or hub id to precompute latents with")
    p.add_argument("--cond", choices=["text", "class"], default="text", help="class: stage 1's class-conditional DiT")
    p.add_argument("--captions", choices=["dense", "sparse"], default="dense", help="shapes world: caption style")
    p.add_argument("--two-objects", type=float, help="shapes world: share of two-object scenes (default: "
                   "one or two objects alike)")
    p.add_argument("--image-size", type=int, help="pixels (default 32; with --score, the model's own)")
    p.add_argument("--preset", default="toy", choices=list(pm.PRESETS), help="model size")
    p.add_argument("--init", help="start from these weights (a checkpoint of this script, or official ones)")
    p.add_argument("--init-dit", help="start from a class-conditional DiT, re-parameterised at t=500 (§2.3)")
    p.add_argument("--resume", help="continue this checkpoint's run exactly, with its own settings; of the others only "
                   "--steps, --lr, --warmup, --clip, --eval-every and --save-every may be given anew")
    p.add_argument("--score", help="no training: score this model (folder, .safetensors, or a stage-1 last.pt) "
                                   "on --eval-n prompts a group")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=64, help="global batch, split over the processes")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--lr-decay", choices=["none", "cosine"], default="none",
                   help="cosine: multiply the lr by a half cosine, from 1 at step 0 to 0 at --steps (a resumed run "
                        "given a longer --steps stretches it)")
    p.add_argument("--timesteps", choices=["uniform", "logit-normal"], default="uniform",
                   help="how training draws t: uniform (the paper), or logit-normal, most often near t=500")
    p.add_argument("--prediction", choices=["epsilon", "v"],
                   help="a new model's target: the noise (the paper's) or v (default: the preset's, v for the toy)")
    p.add_argument("--weight-decay", type=float, default=0.03)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--ema", type=float, default=0.9999)
    p.add_argument("--null-prob", type=float, default=0.1, help="share of captions replaced by the null caption")
    p.add_argument("--cfg", type=float, default=4.5, help="guidance scale of the evaluation samples")
    p.add_argument("--eval-steps", type=int, default=20, help="sampler steps of the evaluation samples")
    p.add_argument("--eval-every", type=int, default=500, help="shapes world: score the EMA model every so often; 0: never")
    p.add_argument("--eval-n", type=int, default=16, help="prompts per group (1/2 objects, seen/held-out)")
    p.add_argument("--eval-seed", type=int, default=1234, help="picks the evaluation's prompts and noise")
    p.add_argument("--save-every", type=int, default=250)
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--seed", type=int, default=0)
    if named_only:                     # the options the command line names: argparse leaves the others as they are, None
        named = p.parse_args(argv, argparse.Namespace(**dict.fromkeys(vars(p.parse_args([])))))
        return {k: v for k, v in vars(named).items() if v is not None}
    args = p.parse_args(argv)
    for name in ("resume", "init_dit", "data", "score"):            # local paths; --init may also be a hub id
        path = getattr(args, name)
        if path and path != "shapes" and not Path(path).exists():
            p.error(f"--{name.replace('_', '-')}: no such file or folder: {path}")
    if args.steps < 1 or args.batch_size < 1 or args.lr <= 0:
        p.error("--steps, --batch-size and --lr must be positive")
    if not 1 <= args.eval_steps < pm.T:                            # caught now, not at the first evaluation
        p.error(f"--eval-steps must be from 1 to {pm.T - 1}, got {args.eval_steps}")
    if args.two_objects is not None and not 0 <= args.two_objects <= 1:
        p.error(f"--two-objects is a share, from 0 to 1, got {args.two_objects}")
    if args.eval_seed < 0:
        p.error(f"--eval-seed must be 0 or more, got {args.eval_seed}")
    if args.save_every < 1 or args.eval_n < 1 or args.eval_every < 0:
        p.error("--save-every and --eval-n must be at least 1, --eval-every 0 (never) or more")
    if not (math.isfinite(args.cfg) and args.cfg >= 0):
        p.error(f"--cfg must be a finite number >= 0, got {args.cfg}")
    if args.data != "shapes" and (args.cond == "class" or args.captions != "dense" or args.two_objects is not None):
        p.error("--cond class, --captions sparse and --two-objects are for the shapes world: "
                "a folder has its own captions")
    if args.score and args.data != "shapes":
        p.error("--score reads pictures back with the shapes world's evaluator: leave out --data")
    patch = pm.PRESETS[args.preset].patch_size
    if args.data != "shapes" and patch != 2 and not (args.init or args.init_dit or args.resume):
        p.error(f"--preset {args.preset} has {patch}x{patch} patches; a folder's aspect-ratio buckets are cut for "
                "patches of 2, as the official ones are: choose a PixArt-XL preset, or tiny")
    if args.prediction and (args.init or args.init_dit or args.resume or args.score):
        p.error("--prediction is for a new model: one started from weights keeps the target it was trained on")
    if args.warmup < 1:
        p.error("--warmup must be at least 1 (the number of steps the lr takes to rise to --lr)")
    if not (0 <= args.ema < 1 and 0 <= args.null_prob <= 1 and args.clip > 0):
        p.error(f"--ema must be from 0 to below 1, --null-prob from 0 to 1 and --clip above 0; got {args.ema}, "
                f"{args.null_prob} and {args.clip}")
    if args.init_dit and args.cond == "class":
        p.error("--init-dit starts stage 2, which reads captions: leave out --cond class")
    if args.image_size is None and not args.score:
        args.image_size = 32
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.resume:                   # the run's own settings, except a longer --steps or a gentler --lr, --warmup, --clip
        saved = read_checkpoint(args.resume)
        named = parse_args(argv, named_only=True)
        if ignored := sorted(set(named) - RESUME_MAY_CHANGE):
            print("train.py: --resume keeps the run's own " + ", ".join("--" + k.replace("_", "-") for k in ignored))
        args = argparse.Namespace(**{**vars(parse_args([])), **saved["args"],   # defaults: options added since the run began
                                     **{k: v for k, v in named.items() if k in RESUME_MAY_CHANGE}})
        args.out = str(Path(args.resume).parent)                     # the run goes on beside its checkpoint
    ddp = "RANK" in os.environ                             # launched by torchrun
    if ddp:
        # rank 0 alone precomputes a new data folder's cache while the others wait at a barrier: hours for a large
        # folder, where NCCL's default timeout would end the run after 10 minutes
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(hours=12))
        rank, world = dist.get_rank(), dist.get_world_size()
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}" if torch.cuda.is_available() else "cpu"
        if device != "cpu":
            torch.cuda.set_device(device)
    else:
        rank, world, device = 0, 1, "cuda" if torch.cuda.is_available() else "cpu"
    if args.batch_size % world:
        raise SystemExit(f"train.py: --batch-size {args.batch_size} does not split over {world} processes")
    master, out = rank == 0, Path(args.out)
    log = print if master else (lambda *a, **k: None)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else nullcontext()
    if not (args.resume or args.score) and (out / "last.pt").exists():   # a new run must not overwrite an old one
        raise SystemExit(f"train.py: {out} already holds a run: --resume {out / 'last.pt'} to go on with it, or "
                         "choose another --out")
    if args.score:                        # read first: the model decides the text, the data and the picture size
        try:
            saved = read_checkpoint(args.score) if args.score.endswith(".pt") else {}
            model = (model_from(saved, "state_dict_ema", args.score) if "kind" in saved   # a last.pt: its EMA, as
                     else pm.load_pixart(args.score)).to(device).eval()                  # its own evaluations use
        except (OSError, ValueError) as e:
            raise SystemExit(f"train.py: --score: {e}") from None
        args.cond = "class" if isinstance(model, DiT) else "text"   # stage 1 is scored on the shapes it draws
        args.image_size = args.image_size or model.config.input_size   # the shapes world's latents are its pixels

    # 1. Text and data.
    text = None
    if args.data == "shapes" and args.cond == "text":
        if not (TOY_TEXT / "text_encoder").exists() and master:
            build_toy_text(TOY_TEXT)
        if ddp:
            dist.barrier()
        text = CachedText(pm.T5TextEncoder(TOY_TEXT, max_length=pm.PRESETS["toy"].model_max_length))
    if args.data == "shapes":
        data = ShapesData(args, text)
    else:
        cache = Path(args.cache or Path(args.data) / ".pixart_cache")
        if not (cache / "index.json").exists():
            if not (args.t5 and args.vae):
                raise SystemExit(f"train.py: {args.data} has no precomputed features yet: give --t5 and --vae")
            if master:
                try:
                    precompute(args.data, cache, args.t5, args.vae, args.image_size, device)
                except FileNotFoundError as e:                 # a --t5 or --vae that is neither here nor on the hub
                    raise SystemExit(f"train.py: {e}") from None
            if ddp:
                dist.barrier()
        data = FolderData(cache)
        if data.image_size not in (None, args.image_size):
            raise SystemExit(f"train.py: {cache} was precomputed at --image-size {data.image_size}, not "
                             f"{args.image_size}: give another --cache, or delete that one")

    if args.score:                                         # no training: score the finished model and stop
        check_fits(model, data, args.score)
        out.mkdir(parents=True, exist_ok=True)
        scores = evaluate(model, data, args, args.eval_n, device, out / "score_samples.png", progress=True)
        (out / "score.json").write_text(json.dumps(dict(model=str(args.score), prompts_per_group=args.eval_n,
                                                        seed=args.eval_seed, cfg=args.cfg, steps=args.eval_steps,
                                                        **scores), indent=1))
        for group, s in scores.items():
            log(f"{group:10s} " + "  ".join(f"{k} {v:.1%}" for k, v in s.items() if v == v))   # v == v: not NaN
        return scores

    # 2. The model: from scratch, fine-tuned, re-parameterised from a DiT, or resumed.
    torch.manual_seed(args.seed)                           # the same start for the same seed
    config = pm.PixArtConfig(**{**asdict(pm.PRESETS[args.preset]), "input_size": args.image_size // data.downscale,
                                "in_channels": data.channels, "caption_channels": data.caption_channels,
                                "model_max_length": data.length,
                                **({"prediction": args.prediction} if args.prediction else {})})
    if args.resume:
        model = load_model(args.resume)
    elif args.init_dit:
        dit = load_model(args.init_dit)
        if not isinstance(dit, DiT):
            raise SystemExit(f"train.py: --init-dit {args.init_dit} is a PixArt, not a class-conditional DiT: "
                             "continue from it with --init")
        check_fits(dit, data, args.init_dit)
        model = reparameterize(dit.eval(), t=500)
    elif args.init:
        model = load_model(args.init)
        if isinstance(model, DiT) != (args.cond == "class"):
            raise SystemExit(f"train.py: --init {args.init} is " + ("a class-conditional DiT (stage 1): start stage 2 "
                             "from it with --init-dit" if isinstance(model, DiT) else "a PixArt: --cond class needs a DiT"))
        check_fits(model, data, args.init)
        if not isinstance(model, DiT) and model.config.input_size != config.input_size:   # stage 3: larger pictures
            grow = config.input_size / model.config.input_size   # positions keep their span: PixArt's pe_interpolation
            sd = model.state_dict()
            model = pm.PixArt(pm.PixArtConfig(**{**asdict(model.config), "input_size": config.input_size,
                                                 "pe_interpolation": model.config.pe_interpolation * grow}))
            sd["pos_embed"] = model.pos_embed                  # the larger grid's table
            pm.load_strict(model, sd, args.init)
    else:
        model = DiT(config, shapes.NUM_CLASSES) if args.cond == "class" else pm.PixArt(config)
    model.config.class_dropout_prob = args.null_prob
    model = model.to(device).train()
    model.grad_checkpointing = args.grad_checkpointing
    ema = deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, eps=1e-10)
    step = 0
    if args.resume:
        ema.load_state_dict(saved["state_dict_ema"])
        opt.load_state_dict(saved["optimizer"])
        step = saved["step"]
    net = nn.parallel.DistributedDataParallel(model) if ddp else model
    net = torch.compile(net) if args.compile else net
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{type(model).__name__} {n_params / 1e6:.2f}M parameters, {world} process(es) on {device}, step {step} -> {args.steps}")
    if master:
        out.mkdir(parents=True, exist_ok=True)
        if args.resume:                                  # the logs after the checkpoint are written again
            forget_after(out / "loss.csv", step, lambda line: int(line.split(",")[0]))
            forget_after(out / "metrics.jsonl", step, lambda line: json.loads(line)["step"])

    # 3. The loop. Each step's randomness comes from (seed, step) alone, so a resumed run repeats exactly the
    # batches, timesteps, noise and null captions it would have had; every rank draws the global batch and
    # keeps its own slice, so 2 processes with batch B/2 each compute what 1 process computes with batch B.
    b = args.batch_size // world
    mine = slice(rank * b, (rank + 1) * b)
    bar = tqdm(total=args.steps, initial=step, disable=not master, desc="train")
    t_start, seen = time.time(), 0
    while step < args.steps:
        rng = np.random.default_rng([args.seed, step])
        g = torch.Generator().manual_seed(int(rng.integers(2 ** 62)))
        batch = data.batch(rng, args.batch_size)
        t = draw_timesteps(args.batch_size, g, args.timesteps)
        noise = torch.randn(batch["x0"].shape, generator=g)
        drop = torch.rand(args.batch_size, generator=g) < args.null_prob
        lr = learning_rate(step, args)
        for group in opt.param_groups:
            group["lr"] = lr
        local = {k: None if v is None else v[mine].to(device) for k, v in batch.items()}
        with autocast:
            loss = pm.training_loss(lambda *a: net(*a, force_drop_ids=drop[mine].to(device)), local["x0"], local["y"],
                                    local["mask"], local.get("hw"), local.get("ar"), t=t[mine].to(device),
                                    noise=noise[mine].to(device), prediction=model.config.prediction)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = nn.utils.clip_grad_norm_(model.parameters(), args.clip)   # DDP has averaged the gradients: the
        avg = loss.detach()                                              # same norm on every rank
        if ddp:
            dist.all_reduce(avg, op=dist.ReduceOp.AVG)
        if not (torch.isfinite(avg) and torch.isfinite(norm)):   # stop before the bad step touches the weights
            last = torch.load(out / "last.pt", weights_only=True)["step"] if (out / "last.pt").exists() else None
            log(f"\ntrain.py: the loss is {avg.item()} and the gradients' norm {norm.item()} at step {step}: "
                "stopping before they reach the weights. "
                + (f"The last good checkpoint is {out / 'last.pt'} (step {last}): --resume it with a lower --lr or a "
                   f"longer --warmup." if last is not None else "No checkpoint was written yet: lower --lr and start again."))
            sys.exit(1)
        opt.step()
        step += 1
        decay = min(args.ema, (1 + step) / (10 + step))   # a short run's EMA must not keep the random start
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 1 - decay)
        seen += args.batch_size
        bar.update(1)
        bar.set_postfix(loss=f"{avg.item():.4f}", img_s=f"{seen / (time.time() - t_start):.0f}")
        if master:
            with open(out / "loss.csv", "a") as f:
                f.write(f"{step},{avg.item():.6f}\n")
        if master and args.eval_every and args.data == "shapes" and (step % args.eval_every == 0 or step == args.steps):
            scores = evaluate(ema, data, args, args.eval_n, device, out / f"samples_{step:06d}.png")
            row = dict(step=step, minutes=(time.time() - t_start) / 60, loss=avg.item(), lr=lr,
                       **{f"{g}_{k}": v for g, s in scores.items() for k, v in s.items()})
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            if args.cond == "class":
                bar.write(f"step {step}: largest object with its class's shape {scores['1obj']['shape']:.0%} (one object)")
            else:
                bar.write(f"step {step}: all-correct 1 object {scores['1obj']['all']:.0%}, 2 objects "
                          f"{scores['2obj']['all']:.0%} (held-out pairs {scores['held_1obj']['all']:.0%}, "
                          f"{scores['held_2obj']['all']:.0%})")
        if master and (step % args.save_every == 0 or step == args.steps):
            save_checkpoint(out / "last.pt", model, ema, opt, step, args)
            if not isinstance(model, DiT):                     # the EMA weights, ready for sample.py
                pm.save_pixart(ema, out / "pixart.safetensors.tmp")
                os.replace(out / "pixart.safetensors.tmp", out / "pixart.safetensors")
    bar.close()
    if ddp:                                                # DDP keeps the replicas equal: show it
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        lo, hi = flat.clone(), flat.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN), dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        log(f"the {world} replicas' weights differ by at most {(hi - lo).max().item():.1e}")
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
