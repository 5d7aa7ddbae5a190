"""Text -> PNG with PixArt-alpha: T5 encodes the prompts, the transformer denoises latents, the VAE decodes them.

    python sample.py "a small red circle above a large blue square"           # the bundled toy model (32 px)
    python sample.py "an astronaut riding a horse" --model PixArt-alpha/PixArt-XL-2-1024-MS --dtype bf16
    python sample.py "a large red circle" --init-image in.png --strength 0.6     # edit a picture (SDEdit)
    python sample.py "a large red circle" --init-image in.png --mask mask.png    # repaint the mask's white part
    python sample.py -h                                                        # every option

--model takes a diffusers pipeline folder or hub id; --ckpt an official .pth / .safetensors with --t5 and --vae.
"""
import argparse
import gc
import math
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import lora
from data import ASPECT_RATIOS, ASPECT_RATIOS_TRAIN, TOY, bucket, read_picture, resize_and_crop
from pixart_min import T, T5_FILES, T5TextEncoder, load_pixart, local_folder, q_sample, sample
from vae import VAE_FILES, AutoencoderKL, Pixels

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PIPELINE = ["transformer", "text_encoder", "tokenizer", "vae"]  # the folders of a diffusers pipeline we read


def load_components(args, dtype):
    """(a function that loads the text encoder, the transformer, the VAE), the last two on the CPU for now."""
    if args.model:
        root, model = args.model, with_lora(load_pixart(args.model, dtype=dtype), args.lora)
        vae = AutoencoderKL.from_pretrained(root, dtype=dtype) if (root / "vae").is_dir() else Pixels()
        return lambda: T5TextEncoder(root, args.device, dtype, model.config.model_max_length), model, vae
    if args.ckpt:                                  # a .pth holds no config, and its weights do not tell the heads
        model = load_pixart(args.ckpt, dtype=dtype, **({"num_heads": args.num_heads} if args.num_heads else {}))
        return lambda: T5TextEncoder(args.t5, args.device, dtype, model.config.model_max_length), \
            with_lora(model, args.lora), AutoencoderKL.from_pretrained(args.vae, dtype=dtype)
    raise FileNotFoundError(f"no --model or --ckpt given, and no bundled model in {TOY}: restore it with git, "
                            "or train one with train.py")


def with_lora(model, adapter):
    """The model, with a PEFT LoRA adapter (folder or hub id) merged into its weights if one is given."""
    if adapter:
        try:
            lora.load_lora(model, adapter)
        except (OSError, ValueError) as e:
            raise ValueError(f"--lora: {e}") from None
        lora.merge_lora(model)
    return model


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def check_args(args, error):
    """Every mistake we can see before loading a model, as `sample.py: error: ...` (exit code 2)."""
    lcm = args.sampler == "lcm"                                       # PixArt-LCM: 4 steps, no guidance
    if lcm and (args.cfg not in (None, 1) or args.init_image):
        error("--sampler lcm takes no --cfg (its guidance is distilled in) and no --init-image: leave them out")
    args.steps = (4 if lcm else 20) if args.steps is None else args.steps
    args.cfg = (1.0 if lcm else 4.5) if args.cfg is None else args.cfg
    if args.steps < 1 or args.steps >= T:
        error(f"--steps must be from 1 to {T - 1}, got {args.steps}")
    if not math.isfinite(args.cfg) or args.cfg < 0:
        error(f"--cfg must be a finite number >= 0, got {args.cfg}")
    if args.n < 1:
        error(f"--n must be at least 1, got {args.n}")
    if not -2 ** 63 <= args.seed <= 2 ** 64 - args.n:                  # what torch.Generator takes, for seed + k
        error(f"--seed must be from {-2 ** 63} to {2 ** 64 - args.n} (2**64 - n), got {args.seed}")
    try:
        torch.device(args.device)
    except RuntimeError:
        error(f"--device {args.device!r} is not a device: cpu, cuda or cuda:N")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        error(f"--out {args.out} is a file: give a folder for the PNGs")
    for name in ("height", "width"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            error(f"--{name} must be a positive number of pixels, got {getattr(args, name)}")
    if args.ckpt and not (args.t5 and args.vae):
        error("--ckpt needs --t5 (a T5 or pipeline folder) and --vae (a VAE or pipeline folder) too")
    if (args.t5 or args.vae or args.num_heads) and not args.ckpt:
        error("--t5, --vae and --num-heads go with --ckpt; a --model pipeline folder has its own")
    if args.num_heads is not None and args.num_heads < 1:
        error(f"--num-heads must be at least 1, got {args.num_heads}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        error("--device cuda, but torch sees no CUDA device here: use --device cpu")
    check_edit_args(args, error)
    prompts = list(args.prompts)
    if args.prompts_file:
        if not Path(args.prompts_file).is_file():
            error(f"no such file: {args.prompts_file}")
        prompts += [line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
        if not prompts:
            error(f"no prompts in {args.prompts_file}: it has only blank lines")
    for i, p in enumerate(prompts):
        if not p.strip():
            warnings.warn(f"prompt {i} is empty: it is guided by T5's features of no text, which are the null caption "
                          f"only for diffusers weights; an unconditional sample is --cfg 0")
    try:                                                              # a hub id is downloaded once, here
        if args.model:
            args.model = local_folder(args.model, [f"{d}/*" for d in PIPELINE])
            toy = (args.model / "pixart.safetensors").is_file()       # no vae/: its latents are the pixels
            own = ("transformer", "vae") if toy else ()
            missing = [d for d in PIPELINE if not (args.model / d).is_dir() and d not in own]
            if missing:
                error(f"{args.model} is not a PixArt pipeline folder: it has no {', '.join(missing)} folder")
        if args.ckpt and not Path(args.ckpt).is_file():
            error(f"no such checkpoint file: {args.ckpt}")
        if args.ckpt:
            args.t5 = local_folder(args.t5, T5_FILES)
            args.vae = local_folder(args.vae, VAE_FILES)
    except FileNotFoundError as e:
        error(str(e))
    return prompts


def check_edit_args(args, error):
    """--init-image, --strength and --mask: files that open as pictures, of one size, and a strength in (0, 1]."""
    if (args.strength is not None or args.mask) and not args.init_image:
        error("--strength and --mask edit a picture: give it with --init-image")
    if args.strength is not None and not 0 < args.strength <= 1:
        error(f"--strength must be in (0, 1] (1: the picture is all noise, near 0: kept as it is), got {args.strength}")
    sizes = []
    for name in ("init_image", "mask"):
        if getattr(args, name):
            try:
                sizes.append(Image.open(getattr(args, name)).size)
            except OSError as e:                                          # missing, or not a picture
                error(f"--{name.replace('_', '-')} {getattr(args, name)}: {e}")
    if len(sizes) == 2 and sizes[0] != sizes[1]:
        error(f"--mask is {sizes[1][0]}x{sizes[1][1]} pixels, --init-image {sizes[0][0]}x{sizes[0][1]}: "
              "they must be the same size")
    args.init_size = sizes[0][::-1] if sizes else None                   # (height, width)
    if args.init_image and args.strength is None:
        args.strength = 1.0 if args.mask else 0.6


def load_edit(args, vae, h, w, device, dtype):
    """The picture to edit as clean latents (1, C, h/f, w/f), and where to keep it (1, 1, h/f, w/f, bool) or None:
    the mask's black part (below half grey), at the latents' size."""
    picture = resize_and_crop(read_picture(args.init_image), h, w)       # (1, 3, h, w) in [-1, 1]
    with torch.no_grad():
        latents = vae.to(device).encode(picture.to(device, dtype))[0].float().cpu() * vae.scaling_factor
    vae.cpu()
    if not args.mask:
        return latents, None
    mask = torch.from_numpy(np.asarray(Image.open(args.mask).convert("L"), np.float32) / 255)[None, None]
    mask = F.interpolate(resize_and_crop(mask, h, w), size=latents.shape[-2:], mode="area")
    return latents, mask < 0.5


def edit_start(args, noise, edit):
    """(starting latents, start step, steps, known) for sample(): text to image, SDEdit or inpainting."""
    if edit is None:
        return noise, T - 1, args.steps, None
    latents, keep = (None if v is None else v.to(noise.device).expand(len(noise), -1, -1, -1) for v in edit)
    start, steps = max(1, round(args.strength * (T - 1))), max(1, round(args.strength * args.steps))
    if start < T - 1:                    # at T - 1, as in text to image, the noise stands for the noised picture
        noise = q_sample(latents, torch.full((len(noise),), start), noise)
    return noise, start, min(steps, start), None if keep is None else (latents, keep)


def make_parser():
    """sample.py's options; check_args checks them."""
    parser = argparse.ArgumentParser(prog="sample.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompts", nargs="*", help="one picture per prompt (times --n)")
    parser.add_argument("--prompts-file", help="a text file with one prompt per line; blank lines are skipped")
    parser.add_argument("--n", type=int, default=1, help="images per prompt")
    parser.add_argument("--out", default="out", help="folder for the PNGs; existing files are never overwritten")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="diffusers pipeline folder or hub id, e.g. PixArt-alpha/PixArt-XL-2-1024-MS")
    source.add_argument("--ckpt", help="official PixArt .pth or .safetensors file (needs --t5 and --vae)")
    parser.add_argument("--t5", help="with --ckpt: T5 folder (spiece.model + weights) or pipeline folder")
    parser.add_argument("--vae", help="with --ckpt: diffusers VAE folder or pipeline folder")
    parser.add_argument("--num-heads", type=int, help="with --ckpt: the attention heads, which a .pth does not store "
                        "(known only for PixArt-XL: 16)")
    parser.add_argument("--lora", help="a LoRA adapter in PEFT's format (folder or hub id), merged into the model: "
                        "train.py --lora's lora/ folder, or e.g. PixArt-alpha/PixArt-LCM-LoRA-XL-2-1024-MS")
    parser.add_argument("--init-image", help="a picture to edit (SDEdit): noised by --strength, then denoised")
    parser.add_argument("--strength", type=float, help="with --init-image: how much to change, in (0, 1]; "
                        "the sampler runs that share of --steps (default 1, or 0.6 without --mask)")
    parser.add_argument("--mask", help="with --init-image: a picture of its size; white is repainted, black kept")
    parser.add_argument("--negative-prompt", help="its T5 features replace the null caption in guidance")
    parser.add_argument("--seed", type=int, default=0, help="image k of each prompt is drawn from seed+k, whatever --n")
    parser.add_argument("--steps", type=int, help="denoising steps (default 20; 4 with --sampler lcm)")
    parser.add_argument("--cfg", type=float, help="classifier-free guidance scale (default 4.5; 1: none)")
    parser.add_argument("--sampler", choices=["dpm-solver", "ddim", "ddpm", "lcm"], default="dpm-solver",
                        help="lcm: for PixArt-LCM weights (or a distilled toy), no guidance")
    parser.add_argument("--height", type=int, help="pixels (default: the model's native size)")
    parser.add_argument("--width", type=int, help="pixels (default: the model's native size)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--offload", action="store_true",
                        help="load T5, transformer and VAE onto the device one at a time (low GPU memory)")
    parser.add_argument("--latents", action="store_true", help="also save the clean latents as .pt beside each PNG")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the transformer: a slow first step, faster ones after (worth it on GPUs)")
    return parser


def main(argv=None):
    parser = make_parser()
    args = parser.parse_args(argv)
    if not (args.model or args.ckpt) and (TOY / "pixart.safetensors").is_file():
        args.model = str(TOY)                                         # the bundled toy model
    prompts = check_args(args, parser.error) or ["a small red circle above a large blue square"]
    device, dtype = torch.device(args.device), DTYPES[args.dtype]

    # 0. The transformer and the VAE, on the CPU for now: they say which sizes we can sample at.
    try:
        load_text, model, vae = load_components(args, dtype)
    except (OSError, ValueError) as e:
        parser.error(str(e))
    c, f = model.config, vae.downscale
    if vae.latent_channels != c.in_channels:
        parser.error(f"the VAE has {vae.latent_channels} latent channels, the model {c.in_channels}")
    if args.sampler == "ddpm" and not c.learn_sigma:
        parser.error("--sampler ddpm draws with the learned variance, and this model does not learn sigma")
    sigma = c.model_max_length == 300                                 # PixArt-Sigma: 300 caption tokens
    want, hub = ((0.13025, "PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers") if sigma      # the SDXL VAE
                 else (0.18215, "PixArt-alpha/PixArt-XL-2-1024-MS"))                     # the SD VAE
    if c.in_channels == 4 and vae.scaling_factor in (0.13025, 0.18215) and vae.scaling_factor != want:
        parser.error(f"this model's latents are scaled by {want} ({'SDXL' if sigma else 'SD'}'s VAE), the VAE given "
                     f"scales by {vae.scaling_factor}: use the VAE of {hub}")
    native, multiple = c.input_size * f, f * c.patch_size
    H, W = args.height or (args.init_size or [native])[0], args.width or (args.init_size or [0, native])[1]
    buckets = c.micro_condition or sigma                              # the multi-scale models draw at a bucket
    if buckets and H * W > 3 * native ** 2:                         # it draws native-size buckets, then resizes
        parser.error(f"{H}x{W} is {H * W / native ** 2:.1f} times the area this model was trained at ({native}x"
                     f"{native}): ask for at most 3 times that, or use a model trained that large (2048 px: "
                     "PixArt-Sigma-XL-2-2K-MS)")
    table = ASPECT_RATIOS_TRAIN if native == 2048 else ASPECT_RATIOS  # Sigma 2K: all 40 training ratios, x 2
    h, w = bucket(H, W, native, multiple, table) if buckets else (H, W)   # what the model draws
    if h % multiple or w % multiple:
        parser.error(f"--height and --width must be multiples of {multiple} for this model (VAE downscale {f} x "
                     f"patch size {c.patch_size}), got {H}x{W}")
    if (h, w) != (H, W):
        print(f"sampling at the aspect-ratio bucket {h}x{w}, then resizing and cropping to {H}x{W}", file=sys.stderr)

    # 1. Text: T5 features of the prompts, and of the null caption unless the model carries its own.
    try:
        text = load_text()
    except (OSError, ValueError) as e:
        parser.error(str(e))
    y, mask = text(prompts)                                           # (P, L, C_text), (P, L)
    null_y = null_mask = None
    if args.negative_prompt is not None or not model.has_null_caption:  # diffusers weights: "" is the null
        null_y, null_mask = text([args.negative_prompt or ""])          # caption, as in their pipeline
    if y.shape[-1] != c.caption_channels:
        parser.error(f"the text encoder gives {y.shape[-1]} channels, the model expects {c.caption_channels}")
    if args.offload:
        del text, load_text
        free(device)

    # 2. Denoise: image k of every prompt is drawn on the CPU from seed + k: its starting noise, and ddpm's noise.
    edit = load_edit(args, vae, h, w, device, dtype) if args.init_image else None    # the picture to edit
    model.to(device)
    if args.compile:
        model.compile()                                               # in place: model.config etc. stay as they are
    n = args.n
    hw = torch.tensor([[h, w]], device=device, dtype=torch.float32).repeat(n, 1) if c.micro_condition else None
    ar = torch.tensor([[h / w]], device=device, dtype=torch.float32).repeat(n, 1) if c.micro_condition else None
    latents = []
    for j in range(len(prompts)):
        generators = [torch.Generator().manual_seed(s) for s in range(args.seed, args.seed + n)]
        noise = torch.stack([torch.randn(c.in_channels, h // f, w // f, generator=g)
                             for g in generators]).to(device)                       # (n, C, h/f, w/f)
        null = {} if null_y is None else dict(null_y=null_y.expand(n, -1, -1), null_mask=null_mask.expand(n, -1))
        x, start, steps, known = edit_start(args, noise, edit)
        latents.append(sample(model, x, y[j:j + 1].expand(n, -1, -1), mask[j:j + 1].expand(n, -1), **null,
                              steps=steps, cfg_scale=args.cfg, sampler=args.sampler, hw=hw, ar=ar, start=start,
                              known=known, generator=generators, progress=True).cpu())
    if args.offload:
        del model
        free(device)

    # 3. Decode, bring to the asked size, save: never over an existing file.
    save_pictures(vae, prompts, latents, H, W, args, device, dtype)


def save_pictures(vae, prompts, latents, H, W, args, device, dtype):
    """Decode each prompt's latents, resize and crop them to H x W, and save them as numbered PNGs in --out."""
    vae.to(device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    index = 1 + max((int(m[1]) for p in out.iterdir() if (m := re.match(r"(\d+)", p.name))), default=-1)
    for prompt, lat in zip(prompts, latents):
        images = vae.decode((lat / vae.scaling_factor).to(device, dtype)).float()   # (n, 3, h, w)
        images = resize_and_crop(images, H, W).clamp(-1, 1)                         # (n, 3, H, W)
        pixels = ((images + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40] or "empty"
        for k in range(len(lat)):
            path = out / f"{index:05d}-{slug}.png"
            Image.fromarray(np.ascontiguousarray(pixels[k])).save(path)
            print(path)
            if args.latents:
                torch.save(lat[k].clone(), path.with_suffix(".pt"))
                print(path.with_suffix(".pt"))
            index += 1


if __name__ == "__main__":
    main()
