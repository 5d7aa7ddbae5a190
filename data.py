"""Where batches come from: the shapes world drawn on the fly (with the toy tokenizer and T5), or a folder of real
images with their T5 and VAE features computed once; and the 1024-MS aspect-ratio buckets both training and
sampling use. train.py and sample.py import it.
"""
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

import pixart_min as pm
import shapes
from vae import VAE_FILES, AutoencoderKL

TOY = Path(__file__).parent / "checkpoints" / "toy"   # the bundled model: pixart.safetensors, text_encoder/, tokenizer/
TOY_DIT = TOY.parent / "toy_dit"                      # the bundled stage 1: dit.safetensors, a class-conditional DiT


# ==================== Aspect-ratio buckets (1024-MS) ====================

# The 33 aspect-ratio buckets PixArt-alpha 1024-MS samples at, h/w -> (height, width) in pixels; for a model
# trained at 512 or 256 px the sizes scale by 512/1024 or 256/1024. (Official code; diffusers ASPECT_RATIO_1024_BIN.)
ASPECT_RATIOS = {
    0.25: (512, 2048), 0.28: (512, 1856), 0.32: (576, 1792), 0.33: (576, 1728), 0.35: (576, 1664),
    0.4: (640, 1600), 0.42: (640, 1536), 0.48: (704, 1472), 0.5: (704, 1408), 0.52: (704, 1344),
    0.57: (768, 1344), 0.6: (768, 1280), 0.68: (832, 1216), 0.72: (832, 1152), 0.78: (896, 1152),
    0.82: (896, 1088), 0.88: (960, 1088), 0.94: (960, 1024), 1.0: (1024, 1024), 1.07: (1024, 960),
    1.13: (1088, 960), 1.21: (1088, 896), 1.29: (1152, 896), 1.38: (1152, 832), 1.46: (1216, 832),
    1.67: (1280, 768), 1.75: (1344, 768), 2.0: (1408, 704), 2.09: (1472, 704), 2.4: (1536, 640),
    2.5: (1600, 640), 3.0: (1728, 576), 4.0: (2048, 512),
}

# training uses 7 more, the most extreme ratios (the inference table skips them); PixArt-Sigma's 2K model samples at
# all 40, with sizes x 2 (diffusers ASPECT_RATIO_2048_BIN, as a test checks)
ASPECT_RATIOS_TRAIN = {**ASPECT_RATIOS, 0.26: (512, 1984), 0.27: (512, 1920), 2.89: (1664, 576), 3.11: (1792, 576),
                       3.62: (1856, 512), 3.75: (1920, 512), 3.88: (1984, 512)}


def bucket(h, w, native, multiple, table=ASPECT_RATIOS):
    """The bucket whose aspect ratio is closest to h/w, at the model's native size (diffusers'
    classify_height_width_bin), rounded to a size the model can take (a no-op for the official models)."""
    ratio = min(table, key=lambda r: abs(r - h / w))
    return tuple(max(multiple, round(v * native / 1024 / multiple) * multiple) for v in table[ratio])


def read_picture(path):
    """A picture file as (1, 3, H, W) floats in [-1, 1]."""
    with Image.open(path) as im:
        pixels = np.array(im.convert("RGB"))               # a copy torch may write to
    return torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 127.5 - 1


def resize_and_crop(images, h, w):
    """Scale (B, 3, H, W) images to cover h x w, then cut out the centre (diffusers' resize_and_crop_tensor)."""
    H, W = images.shape[-2:]
    if (H, W) == (h, w):
        return images
    s = max(h / H, w / W)
    rh, rw = max(h, int(H * s)), max(w, int(W * s))
    images = F.interpolate(images, size=(rh, rw), mode="bilinear", align_corners=False)
    top, left = (rh - h) // 2, (rw - w) // 2
    return images[:, :, top:top + h, left:left + w]                   # (B, 3, h, w)


# ==================== The shapes world: toy text and batches ====================

def build_toy_text(folder, d_model=64, seed=0):
    """A sentencepiece tokenizer trained on the toy vocabulary and a tiny T5 encoder, random and frozen (seed 0):
    the same code path as the official T5-XXL, at a size a laptop trains against in minutes."""
    import sentencepiece as spm
    from transformers import T5Config, T5EncoderModel
    (folder / "tokenizer").mkdir(parents=True, exist_ok=True)
    words = {w for s in shapes.VOCAB_SENTENCES for w in s.split()}
    spm.SentencePieceTrainer.train(sentence_iterator=iter(shapes.VOCAB_SENTENCES),
                                   model_prefix=str(folder / "tokenizer" / "spiece"), vocab_size=len(words) + 8,
                                   model_type="word", hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   minloglevel=2)
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


def toy_text():
    """The toy world's frozen text encoder (checkpoints/toy), its features cached per caption."""
    return CachedText(pm.T5TextEncoder(TOY, max_length=pm.PRESETS["toy"].model_max_length))


class ShapesData:
    """Batches drawn on the fly from the shapes world: pixels are the latents (no VAE), 3 channels. cond "class"
    gives object 0's shape as a label (stage 1); "text" the dense or sparse captions' T5 features. concept: a
    colour of shapes.NEW_COLORS that half the scenes' object 0 takes (a new concept to teach, --concept)."""
    channels, downscale = 3, 1
    caption_channels, length = pm.PRESETS["toy"].caption_channels, pm.PRESETS["toy"].model_max_length

    def __init__(self, text, image_size=32, two_share=None, cond="text", captions="dense", concept=None):
        self.text, self.image_size, self.two_share = text, image_size, two_share
        self.cond, self.captions, self.concept = cond, captions, concept

    def batch(self, rng, n):
        images, dense, sparse, labels, specs = shapes.sample_batch(n, rng, self.image_size, two_share=self.two_share,
                                                                   concept=self.concept)
        if self.cond == "class":
            return dict(x0=images, y=labels, mask=None)
        y, mask = self.text(dense if self.captions == "dense" else sparse)
        return dict(x0=images, y=y, mask=mask)


# ==================== Real images: a folder, its features computed once ====================

IMAGE_TYPES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def read_captions(folder):
    """(image path, caption) pairs: from captions.jsonl ({"file": ..., "text": ...} per line) or a .txt beside
    each image."""
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
    vae = AutoencoderKL.from_pretrained(pm.local_folder(vae_path, VAE_FILES), device=device)
    t5 = pm.T5TextEncoder(t5_path, device=device)
    cache.mkdir(parents=True, exist_ok=True)
    pairs, index, skipped = read_captions(folder), [], 0
    for path, caption in tqdm(pairs, desc="precompute"):
        try:
            image = read_picture(path)                     # (1, 3, H, W)
        except Exception as e:                             # a corrupt file costs one image, not the run
            skipped += 1
            tqdm.write(f"skipping {path}: {e}")
            continue
        H, W = image.shape[-2:]
        ratio = min(ASPECT_RATIOS_TRAIN, key=lambda r: abs(r - H / W))
        h, w = bucket(H, W, image_size, 2 * vae.downscale, ASPECT_RATIOS_TRAIN)  # patch 2 divides
        mean, std = vae.encode(resize_and_crop(image, h, w).to(device))                     # (1, C, h/f, w/f)
        y, mask = t5([caption])
        n = int(mask.sum())                                # keep the real tokens only; padding comes back at batch time
        name = f"{len(index):07d}.pt"
        torch.save(dict(mean=mean[0].half().cpu(), std=std[0].half().cpu(), y=y[0, :n].half().cpu(),
                        hw=(H, W), ar=ratio), cache / name)
        index.append(dict(file=name, bucket=f"{h}x{w}"))
    if not index:
        raise ValueError(f"no readable image with a caption in {folder} ({skipped} unreadable)")
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
        self.cache, self.length, self.scale = cache, meta["max_length"], meta["scaling_factor"]
        self.channels, self.downscale = meta["channels"], meta["downscale"]
        self.caption_channels = meta["caption_channels"]
        self.image_size = meta.get("image_size")          # None: a cache from before it was recorded
        self.buckets = {}
        for item in meta["items"]:
            self.buckets.setdefault(item["bucket"], []).append(item["file"])
        if not self.buckets:
            raise ValueError(f"no usable images in {cache}")
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
