"""One training loop for every setting: the shapes world on a laptop CPU, precomputed real data on a GPU,
many GPUs with torchrun. The paper's recipe (§2.2 and its appendix): hybrid loss, AdamW, warm-up, gradient
clipping, 10% null captions, EMA, bf16 on GPUs.

  python train.py                                          # toy world, CPU, defaults: a text-to-image model
  python train.py --cond class --out runs/stage1           # stage 1: class-conditional DiT (pixel dependency)
  python train.py --init-dit runs/stage1/last.pt --out runs/stage2    # re-parameterise, then dense captions
  python train.py --init runs/stage2/last.pt --image-size 64 --out runs/stage3   # stage 3: higher resolution
  python train.py --resume runs/stage2/last.pt             # continue a killed run, step for step
  python train.py --timesteps uniform                      # the paper's t; the default's and others: docs/options.md
  python train.py --distill-lcm checkpoints/toy --out runs/lcm   # LCM distillation: 4 steps, no guidance (docs/lcm.md)
  python train.py --score runs/lcm/last.pt --eval-sampler lcm     # score it with its own sampler (4 steps, cfg 1)
  python train.py --init checkpoints/toy --lora 1 --concept white --out runs/white   # LoRA: a new word (docs/lora.md)
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
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

import lcm
import lora
import pixart_min as pm
import shapes
from data import TOY, TOY_DIT, FolderData, ShapesData, build_toy_text, precompute, toy_text
from dit import DiT, dit_from_weights, reparameterize, save_dit


def main(argv=None):
    """The paper's recipe in five steps: settings, processes, data, model, loop."""
    args, resumed = settings(argv)
    run = processes(args)
    if args.score:                                         # no training: score a finished model and stop
        return score(args, run)
    data = make_data(args, run)
    teacher = load_teacher(args.distill_lcm, data, run) if args.distill_lcm else None   # frozen
    model, ema, opt, step = make_model(args, data, run, resumed, teacher)
    target = lcm_target(model, resumed) if teacher else None               # the EMA student that the loss aims at
    train(model, ema, opt, step, data, args, run, teacher, target)
    if run.ddp:
        show_replicas_agree(model, run)
        dist.destroy_process_group()
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(0)              # gloo's threads can abort the interpreter's own exit (about 1 run in 10 on a CPU)


def train(model, ema, opt, step, data, args, run, teacher=None, target=None):
    """The loop. Each step's randomness comes from (seed, step) alone, so a resumed run repeats exactly the batches,
    timesteps, noise and null captions it would have had; every rank draws the global batch and keeps its own
    slice, so 2 processes with batch B/2 each compute what 1 process computes with batch B. With a teacher
    (--distill-lcm) the loss is LCM distillation's, against a target network: the student's own fast EMA
    (lcm.TARGET_DECAY). The slow EMA, as in any run, is what is scored and saved."""
    net = nn.parallel.DistributedDataParallel(model) if run.ddp else model
    net = torch.compile(net) if args.compile else net
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if run.device.startswith("cuda") else nullcontext()
    out, b = Path(args.out), args.batch_size // run.world
    mine = slice(run.rank * b, (run.rank + 1) * b)                 # this rank's share of the global batch
    bar = tqdm(total=args.steps, initial=step, disable=not run.master, desc="train")
    t_start, seen = time.time(), 0
    while step < args.steps:
        rng = np.random.default_rng([args.seed, step])
        g = torch.Generator().manual_seed(int(rng.integers(2 ** 62)))
        batch = data.batch(rng, args.batch_size)                   # x0, y, mask (and hw, ar for real data)
        t = draw_timesteps(args.batch_size, g, "lcm" if teacher else args.timesteps)
        noise = torch.randn(batch["x0"].shape, generator=g)
        drop = torch.rand(args.batch_size, generator=g) < args.null_prob   # these captions become the null caption
        lr = learning_rate(step, args)
        for group in opt.param_groups:
            group["lr"] = lr
        local = {k: None if v is None else v[mine].to(run.device) for k, v in batch.items()}
        student = lambda *a: net(*a, force_drop_ids=drop[mine].to(run.device))
        inputs = (local["x0"], local["y"], local["mask"], local.get("hw"), local.get("ar"))
        draws = dict(t=t[mine].to(run.device), noise=noise[mine].to(run.device), prediction=model.config.prediction)
        with autocast:
            loss = (pm.training_loss(student, *inputs, **draws) if teacher is None else
                    lcm.lcm_loss(student, teacher, target, *inputs, **draws, cfg=args.teacher_cfg, huber_c=args.huber_c,
                                 skip=args.lcm_skip))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = nn.utils.clip_grad_norm_(model.parameters(), args.clip)   # DDP has averaged the gradients: the
        avg = loss.detach()                                              # same norm on every rank
        if run.ddp:
            dist.all_reduce(avg, op=dist.ReduceOp.AVG)
        if not (torch.isfinite(avg) and torch.isfinite(norm)):   # stop before the bad step touches the weights
            stop_before_bad_step(avg, norm, step, out, run)
        opt.step()
        step += 1
        decay = min(args.ema, (1 + step) / (10 + step))   # a short run's EMA must not keep the random start
        with torch.no_grad():
            for averages, d in [(ema, decay), (target, lcm.TARGET_DECAY)][:2 if target else 1]:
                for e, p in zip(averages.parameters(), model.parameters()):
                    e.lerp_(p, 1 - d)
        seen += args.batch_size
        bar.update(1)
        bar.set_postfix(loss=f"{avg.item():.4f}", img_s=f"{seen / (time.time() - t_start):.0f}")
        if run.master:
            with open(out / "loss.csv", "a") as f:
                f.write(f"{step},{avg.item():.6f}\n")
            if args.eval_every and args.data == "shapes" and (step % args.eval_every == 0 or step == args.steps):
                log_scores(ema, data, args, dict(step=step, loss=avg.item(), lr=lr), t_start, out, bar, run.device)
            if step % args.save_every == 0 or step == args.steps:
                save_run(out, model, ema, opt, step, args, target)
    bar.close()


# ==================== The steps main takes: processes, data, model ====================

@dataclass
class Processes:
    """Who this process is: one of `world` under torchrun (DDP), or the only one."""
    ddp: bool
    rank: int
    world: int
    device: str

    @property
    def master(self):
        return self.rank == 0

    def log(self, *a, **k):
        if self.master:
            print(*a, **k)


def processes(args):
    """DDP when torchrun launched us (NCCL on GPUs, gloo on CPUs), else one process on the GPU or the CPU."""
    if "RANK" not in os.environ:
        run = Processes(False, 0, 1, "cuda" if torch.cuda.is_available() else "cpu")
    else:
        # rank 0 alone precomputes a new data folder's cache while the others wait at a barrier: hours for a large
        # folder, where NCCL's default timeout would end the run after 10 minutes
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(hours=12))
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}" if torch.cuda.is_available() else "cpu"
        if device != "cpu":
            torch.cuda.set_device(device)
        run = Processes(True, dist.get_rank(), dist.get_world_size(), device)
    if args.batch_size % run.world:
        raise SystemExit(f"train.py: --batch-size {args.batch_size} does not split over {run.world} processes")
    return run


def make_data(args, run):
    """The shapes world (with the toy text encoder unless stage 1), or a folder of images with its features,
    computed by rank 0 the first time."""
    if args.data == "shapes":
        text = None
        if args.cond == "text":
            if not (TOY / "text_encoder").exists() and run.master:
                build_toy_text(TOY)
            if run.ddp:
                dist.barrier()
            text = toy_text()
        return ShapesData(text, args.image_size, args.two_objects, args.cond, args.captions, args.concept)
    cache = Path(args.cache or Path(args.data) / ".pixart_cache")
    try:
        if not (cache / "index.json").exists():
            if not (args.t5 and args.vae):
                raise SystemExit(f"train.py: {args.data} has no precomputed features yet: give --t5 and --vae")
            if run.master:
                precompute(args.data, cache, args.t5, args.vae, args.image_size, run.device)
            if run.ddp:
                dist.barrier()
        data = FolderData(cache)
    except (FileNotFoundError, ValueError) as e:          # e.g. a --t5 or --vae that is neither here nor on the hub
        raise SystemExit(f"train.py: {e}") from None
    if data.image_size not in (None, args.image_size):
        raise SystemExit(f"train.py: {cache} was precomputed at --image-size {data.image_size}, not "
                         f"{args.image_size}: give another --cache, or delete that one")
    return data


def make_model(args, data, run, resumed, teacher=None):
    """The model in training mode, its EMA copy, the optimiser and the step to start at: a new model, one
    fine-tuned (--init), re-parameterised from a stage-1 DiT (--init-dit), a copy of the teacher (--distill-lcm),
    or a resumed run."""
    torch.manual_seed(args.seed)                           # the same start for the same seed
    if resumed:
        model = model_from(resumed, "state_dict", args.resume)
    elif teacher is not None:                              # the student starts as the teacher, as does its EMA
        model = deepcopy(teacher).requires_grad_(True)
    elif args.init_dit:
        model = from_dit(args.init_dit, data, args.no_reparam)
    elif args.init:
        model = from_init(args.init, args, data)
    else:
        config = pm.PixArtConfig(**{**asdict(pm.PRESETS[args.preset]), "input_size": args.image_size // data.downscale,
                                    "in_channels": data.channels, "caption_channels": data.caption_channels,
                                    "model_max_length": data.length,
                                    **({"prediction": args.prediction} if args.prediction else {})})
        model = DiT(config, shapes.NUM_CLASSES) if args.cond == "class" else pm.PixArt(config)
    if args.lora and not resumed:                         # fresh adapters; the rest of the model is frozen
        try:
            lora.add_lora(model, args.lora, targets=(args.lora_targets or ",".join(lora.ATTENTION_MLP)).split(","))
        except ValueError as e:
            raise SystemExit(f"train.py: --lora-targets: {e}") from None
    model.config.class_dropout_prob = args.null_prob
    model = model.to(run.device).train()
    model.grad_checkpointing = args.grad_checkpointing
    ema = deepcopy(model).eval().requires_grad_(False)
    trained = [p for p in model.parameters() if p.requires_grad]      # with --lora: the adapters alone
    opt = torch.optim.AdamW(trained, lr=args.lr, weight_decay=args.weight_decay, eps=1e-10)
    step = 0
    if resumed:
        ema.load_state_dict(resumed["state_dict_ema"])
        opt.load_state_dict(resumed["optimizer"])
        step = resumed["step"]
    n_params = sum(p.numel() for p in model.parameters())
    run.log(f"{type(model).__name__} {n_params / 1e6:.2f}M parameters" +
            (f" ({sum(p.numel() for p in trained):,} of them in LoRA adapters, trained)" if args.lora else "") +
            f", {run.world} process(es) on {run.device}, step {step} -> {args.steps}")
    out = Path(args.out)
    if run.master:
        out.mkdir(parents=True, exist_ok=True)
        if resumed:                                        # the logs after the checkpoint are written again
            forget_after(out / "loss.csv", step, lambda line: int(line.split(",")[0]))
            forget_after(out / "metrics.jsonl", step, lambda line: json.loads(line)["step"])
    return model, ema, opt, step


def load_teacher(path, data, run):
    """--distill-lcm's teacher, frozen: a PixArt folder or file, or a last.pt of this script (its EMA weights)."""
    try:
        teacher = load_model(path, "state_dict_ema")
    except (OSError, ValueError) as e:
        raise SystemExit(f"train.py: --distill-lcm: {e}") from None
    if isinstance(teacher, DiT):
        raise SystemExit(f"train.py: --distill-lcm {path} is a class-conditional DiT: distil a text-to-image PixArt")
    if not teacher.has_null_caption:                       # its guidance needs the null caption it was trained with
        raise SystemExit(f"train.py: --distill-lcm {path} carries no null caption (diffusers weights): the teacher's "
                         "guidance needs one; give its .pth or a checkpoint of this script")
    check_fits(teacher, data, path)
    return teacher.to(run.device).eval().requires_grad_(False)


def lcm_target(model, resumed):
    """--distill-lcm's target network: a frozen copy of the student (which starts as the teacher), or the resumed
    run's."""
    target = deepcopy(model).eval().requires_grad_(False)
    if resumed:
        target.load_state_dict(resumed["state_dict_target"])
    return target


def from_dit(path, data, no_reparam=False):
    """Stage 2's start: a stage-1 DiT re-parameterised into a PixArt at t = 500 (§2.3), or not (the ablation)."""
    dit = load_model(path)
    if not isinstance(dit, DiT):
        raise SystemExit(f"train.py: --init-dit {path} is a PixArt, not a class-conditional DiT: continue from it "
                         "with --init")
    check_fits(dit, data, path)
    return reparameterize(dit.eval(), t=None if no_reparam else 500)


def from_init(path, args, data):
    """Weights to fine-tune: of the same kind as --cond asks for; a PixArt given larger pictures (stage 3) keeps
    its positions' span, as PixArt's pe_interpolation does."""
    model = load_model(path)
    if isinstance(model, DiT) != (args.cond == "class"):
        raise SystemExit(f"train.py: --init {path} is " + ("a class-conditional DiT (stage 1): start stage 2 from it "
                         "with --init-dit" if isinstance(model, DiT) else "a PixArt: --cond class needs a DiT"))
    check_fits(model, data, path)
    size = args.image_size // data.downscale
    if isinstance(model, DiT) or model.config.input_size == size:
        return model
    grow = size / model.config.input_size
    sd = model.state_dict()
    model = pm.PixArt(pm.PixArtConfig(**{**asdict(model.config), "input_size": size,
                                         "pe_interpolation": model.config.pe_interpolation * grow}))
    sd["pos_embed"] = model.pos_embed                      # the larger grid's table
    pm.load_strict(model, sd, path)
    return model


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
    if ckpt.get("lora"):                                   # a --lora run's: its adapters, then their weights
        lora.add_lora(model, ckpt["lora"]["r"], ckpt["lora"]["lora_alpha"], ckpt["lora"]["target_modules"])
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


def load_model(path, weights="state_dict"):
    """A model to start from or to score: a checkpoint of this script (its raw or its EMA weights), a stage-1 DiT
    (an official .pt, or save_dit's file or the folder holding it, as checkpoints/toy_dit), or PixArt weights."""
    path = Path(path) / "dit.safetensors" if (Path(path) / "dit.safetensors").is_file() else path
    if str(path).endswith(".pt"):
        ckpt = read_checkpoint(path)
        if "kind" in ckpt:                                                 # stage 1, 2 or 3 of this script
            return model_from(ckpt, weights, path)
        if "y_embedder.embedding_table.weight" in ckpt:                  # official DiT, e.g. DiT-XL-2-256.pt
            return dit_from_weights(ckpt, path)
    if str(path).endswith(".safetensors"):
        sd, config = pm.read_weights(Path(path))
        if "y_embedder.embedding_table.weight" in sd:                    # save_dit's file
            return dit_from_weights(sd, path, config)
    return pm.load_pixart(path).train()


# ==================== Evaluation: sample fixed prompts, read the pictures back ====================

def score(args, run):
    """--score: sample seeded prompts with a finished model, read the pictures back, write score.json."""
    try:                                          # a last.pt: its EMA weights, as its own evaluations use
        model = load_model(args.score, "state_dict_ema").to(run.device).eval()
    except (OSError, ValueError) as e:
        raise SystemExit(f"train.py: --score: {e}") from None
    args.cond = "class" if isinstance(model, DiT) else "text"   # stage 1 is scored on the shapes it draws
    args.image_size = args.image_size or model.config.input_size   # the shapes world's latents are its pixels
    data = make_data(args, run)
    check_fits(model, data, args.score)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scores = evaluate(model, data, args, args.eval_n, run.device, out / "score_samples.png", progress=True)
    (out / "score.json").write_text(json.dumps(dict(model=str(args.score), prompts_per_group=args.eval_n,
                                                    seed=args.eval_seed, cfg=args.cfg, steps=args.eval_steps,
                                                    sampler=args.eval_sampler,
                                                    **scores), indent=1))
    for group, s in scores.items():
        run.log(f"{group:10s} " + "  ".join(f"{k} {v:.1%}" for k, v in s.items() if v == v))   # v == v: not NaN
    return scores


def log_scores(ema, data, args, now, t_start, out, bar, device):
    """Score the EMA model during training: a sample grid, a line of metrics.jsonl (its minutes count every
    evaluation so far) and one on the screen."""
    step = now["step"]
    scores = evaluate(ema, data, args, args.eval_n, device, out / f"samples_{step:06d}.png")
    row = dict(step=step, minutes=(time.time() - t_start) / 60, loss=now["loss"], lr=now["lr"],
               **{f"{g}_{k}": v for g, s in scores.items() for k, v in s.items()})
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    if args.cond == "class":
        bar.write(f"step {step}: largest object with its class's shape {scores['1obj']['shape']:.0%} (one object)")
    else:
        new = scores.get(f"{args.concept}_1obj")
        bar.write(f"step {step}: all-correct 1 object {scores['1obj']['all']:.0%}, 2 objects "
                  f"{scores['2obj']['all']:.0%} (held-out pairs {scores['held_1obj']['all']:.0%}, "
                  f"{scores['held_2obj']['all']:.0%})" + (f"; {args.concept} 1 object: colour read back "
                  f"{new['color']:.0%}, all correct {new['all']:.0%}" if new else ""))


@torch.no_grad()
def evaluate(model, data, args, n_per_group, device, grid_path=None, progress=False):
    """Scores of the EMA model on fixed prompts (seeded): one and two objects, seen and held-out colour-shape
    pairs; with --concept also one object of the new colour (group "<colour>_1obj", drawn after the others). A
    class-conditional model knows only its class, object 0's shape: it is scored on how often the largest object of
    a one-object scene has that shape."""
    rng, S = np.random.default_rng(args.eval_seed), args.image_size
    specs = [shapes.random_spec(rng, k, held) for held in (False, True) for k in (1, 2) for _ in range(n_per_group)]
    noise = torch.randn(len(specs), data.channels, S, S, generator=torch.Generator().manual_seed(args.eval_seed))
    if args.concept:
        new = [shapes.random_spec(rng, 1) for _ in range(n_per_group)]
        for spec in new:
            spec.objects[0].color = args.concept
        specs += new
        noise = torch.cat([noise, torch.randn(len(new), data.channels, S, S,
                                              generator=torch.Generator().manual_seed(args.eval_seed + 1))])
    if args.cond == "class":                        # scored on one object: draw only those, with the same noise
        keep = [i for i, s in enumerate(specs) if len(s.objects) == 1]
        specs, noise = [specs[i] for i in keep], noise[keep]
        y, mask = torch.tensor([shapes.class_label(s) for s in specs]), None
        null_y = torch.full_like(y, model.num_classes)
    else:
        (y, mask), null_y = data.text([shapes.dense_caption(s) for s in specs]), None
    n = len(specs) - (n_per_group if args.concept else 0)     # batches of 64, the concept's group apart
    batches = [(i, min(i + 64, end)) for begin, end in [(0, n), (n, len(specs))] for i in range(begin, end, 64)]
    part = lambda v, i, j: None if v is None else v[i:j].to(device)
    images = torch.cat([pm.sample(model, part(noise, i, j), part(y, i, j), part(mask, i, j), null_y=part(null_y, i, j),
                                  null_mask=part(mask, i, j) if null_y is not None else None, steps=args.eval_steps,
                                  cfg_scale=args.cfg, sampler=args.eval_sampler,   # lcm, ddpm: seeded fresh noise
                                  generator=torch.Generator().manual_seed(args.eval_seed + 1 + i)).clamp(-1, 1).cpu()
                        for i, j in tqdm(batches, desc="score", disable=not progress)])
    if grid_path:
        pick = slice(None, None, max(1, len(images) // 32))
        captions = [shapes.dense_caption(s) if args.cond == "text" else s.objects[0].shape for s in specs[pick]]
        save_grid(images[pick][:32], grid_path, captions=captions)
    if args.cond == "class":   # the largest object's shape, not the best of several: the colour cannot pick a match
        pairs = [(s.objects[0].shape, found[0].shape if found else None)
                 for s, found in zip(specs, shapes.detect(images))]
        share = lambda ps: float(np.mean([asked == read for asked, read in ps])) if ps else float("nan")
        return {"1obj": {"shape": share(pairs), **{k: share([p for p in pairs if p[0] == k]) for k in shapes.SHAPES}}}
    records = shapes.evaluate_each(images, specs)
    held = [any((o.color, o.shape) in shapes.HELD_OUT for o in s.objects) for s in specs[:n]]
    scores = {f"{'held_' if h else ''}{k}obj": shapes.summarize([r for r, s, hs in zip(records, specs, held)
                                                                if len(s.objects) == k and hs == h])
              for h in (False, True) for k in (1, 2)}
    return {**scores, **({f"{args.concept}_1obj": shapes.summarize(records[n:])} if args.concept else {})}


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
            label = textwrap.fill(captions[i][:80], w * scale // 6)
            draw.multiline_text((x + 2, y + h * scale + 1), label, fill="black")
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
    shows the toy model's clean-picture estimate going from mostly right to mostly wrong, and few at the ends.
    lcm: LCM distillation's, 19, 39, ..., 999, the 50-step grid its teacher steps along (lcm.py)."""
    if how == "lcm":
        return lcm.grid_timesteps(n, generator)
    if how == "uniform":
        return torch.randint(0, pm.T, (n,), generator=generator)
    return (torch.sigmoid(torch.randn(n, generator=generator)) * pm.T).long()


# ==================== Checkpoints: everything needed to continue, written atomically ====================

def save_checkpoint(path, model, ema, opt, step, args, target=None):
    """Write to a temporary file, then rename: a run killed mid-write never leaves a half-written checkpoint."""
    ckpt = dict(kind="dit" if isinstance(model, DiT) else "pixart", config=asdict(model.config),
                num_classes=getattr(model, "num_classes", None),
                has_null_caption=getattr(model, "has_null_caption", True), lora=getattr(model, "lora_config", None),
                state_dict=model.state_dict(), state_dict_ema=ema.state_dict(), optimizer=opt.state_dict(), step=step,
                args=vars(args), **({} if target is None else {"state_dict_target": target.state_dict()}))
    tmp = Path(str(path) + ".tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def save_run(out, model, ema, opt, step, args, target=None):
    """last.pt, and the EMA weights on their own: pixart.safetensors, ready for sample.py, or a stage-1 DiT's
    dit.safetensors (fp16), ready for --init-dit (checkpoints/toy_dit holds one). A --lora run's EMA adapters also
    go to lora/ (PEFT's format), and pixart.safetensors holds them merged."""
    save_checkpoint(out / "last.pt", model, ema, opt, step, args, target)
    if args.lora:
        lora.save_lora(ema, out / "lora")
        ema = lora.merge_lora(deepcopy(ema))
    name = "dit.safetensors" if isinstance(model, DiT) else "pixart.safetensors"
    (save_dit if isinstance(model, DiT) else pm.save_pixart)(ema, out / f"{name}.tmp")
    os.replace(out / f"{name}.tmp", out / name)


def stop_before_bad_step(avg, norm, step, out, run):
    """A NaN or infinite loss or gradient: stop, say so, and point at the last good checkpoint."""
    last = torch.load(out / "last.pt", weights_only=True)["step"] if (out / "last.pt").exists() else None
    run.log(f"\ntrain.py: the loss is {avg.item()} and the gradients' norm {norm.item()} at step {step}: "
            "stopping before they reach the weights. "
            + (f"The last good checkpoint is {out / 'last.pt'} (step {last}): --resume it with a lower --lr or a "
               "longer --warmup." if last is not None else "No checkpoint was written yet: lower --lr and start "
               "again."))
    sys.exit(1)


def show_replicas_agree(model, run):
    """DDP keeps the replicas equal: show it."""
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    lo, hi = flat.clone(), flat.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN), dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    run.log(f"the {run.world} replicas' weights differ by at most {(hi - lo).max().item():.1e}")


def forget_after(path, step, step_of):
    """Drop a log's lines after `step`: a run resumed from there writes them again."""
    if path.exists():
        path.write_text("".join(line for line in path.read_text().splitlines(True) if step_of(line) <= step))


# ==================== Settings: the command line ====================

TWO_OBJECTS = 0.25          # the default share of two-object scenes: the target is one-object prompts (README)
BEFORE_THE_OPTION = dict(timesteps="uniform", lr_decay="none", no_reparam=False, from_scratch=False)   # in old runs
RESUME_MAY_CHANGE = {"resume", "steps", "lr", "warmup", "clip", "eval_every", "save_every"}   # the rest: the run's own
# --distill-lcm's defaults, where the command line does not name them: the official config's (no null captions,
# weight decay 0, clip 0.01, guidance w = 4.5, i.e. 5.5 on sample's scale; the target network's EMA is
# lcm.TARGET_DECAY), and, measured on the toy (docs/lcm.md), a rate, a length and a 100-step teacher step; the loss
# is the squared difference (the config's loss_type "l2") unless --huber-c asks for the config's pseudo-Huber
LCM_DISTILL = dict(null_prob=0.0, weight_decay=0.0, clip=0.01, lr=1e-4, lr_decay="cosine", steps=2000,
                   teacher_cfg=5.5, lcm_skip=100, eval_sampler="lcm")
LCM_SAMPLING = dict(eval_steps=4, cfg=1.0)          # --eval-sampler lcm's: 4 steps without guidance, as PixArt-LCM


def settings(argv):
    """The run's settings and, with --resume, the checkpoint it goes on from (else None). A resumed run keeps its
    own settings, except a longer --steps or a gentler --lr, --warmup, --clip."""
    args, resumed = parse_args(argv), None
    if args.resume:
        resumed = read_checkpoint(args.resume)
        named = parse_args(argv, named_only=True)
        if ignored := sorted(set(named) - RESUME_MAY_CHANGE):
            print("train.py: --resume keeps the run's own " + ", ".join("--" + k.replace("_", "-") for k in ignored))
        args = argparse.Namespace(**{**vars(parse_args([])), **BEFORE_THE_OPTION, **resumed["args"],
                                     **{k: v for k, v in named.items() if k in RESUME_MAY_CHANGE}})
        args.out = str(Path(args.resume).parent)                     # the run goes on beside its checkpoint
    elif not args.score and (last := Path(args.out) / "last.pt").exists():   # a new run must not overwrite an old one
        raise SystemExit(f"train.py: {last.parent} already holds a run: --resume {last} to go on with it, or choose "
                         "another --out")
    return args, resumed


def parse_args(argv=None, named_only=False):
    """The command line, checked. named_only: only the options it names, as a dict (for --resume)."""
    p = parser()
    if named_only:                     # the options the command line names: argparse leaves the others None
        named = p.parse_args(argv, argparse.Namespace(**dict.fromkeys(vars(p.parse_args([])))))
        return {k: v for k, v in vars(named).items() if v is not None}
    args = p.parse_args(argv)
    started = args.from_scratch or args.init or args.init_dit or args.resume or args.score or args.distill_lcm
    if not started and args.data == "shapes" and args.cond == "text" and args.preset == "toy" \
            and args.image_size in (None, 32):
        args.init_dit = str(TOY_DIT)                  # the default: the paper's stage 2, from the bundled stage 1
    if args.distill_lcm or args.eval_sampler == "lcm":   # their own defaults, for the options not named
        named = parse_args(argv, named_only=True)
        for k, v in {**(LCM_DISTILL if args.distill_lcm else {}), **LCM_SAMPLING}.items():
            setattr(args, k, named.get(k, v))
    check_args(args, p.error)
    if args.image_size is None and not args.score:
        args.image_size = 32
    return args


def parser():
    """train.py's options; checked by check_args."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/toy", help="folder for checkpoints, samples and metrics")
    p.add_argument("--data", default="shapes", help="'shapes' (drawn on the fly) or a folder of images with captions")
    p.add_argument("--cache", help="real data: where the precomputed features go (default DATA/.pixart_cache)")
    p.add_argument("--t5", help="real data: the T5 folder or hub id to precompute caption features with")
    p.add_argument("--vae", help="real data: the VAE folder or hub id to precompute latents with")
    p.add_argument("--cond", choices=["text", "class"], default="text", help="class: stage 1's class-conditional DiT")
    p.add_argument("--captions", choices=["dense", "sparse"], default="dense", help="shapes world: caption style")
    p.add_argument("--two-objects", type=float, default=TWO_OBJECTS, help="shapes world: share of two-object scenes")
    p.add_argument("--image-size", type=int, help="pixels (default 32; with --score, the model's own)")
    p.add_argument("--preset", default="toy", choices=list(pm.PRESETS), help="model size")
    p.add_argument("--init", help="start from these weights (a checkpoint of this script, or official ones)")
    p.add_argument("--init-dit", help="start from a class-conditional DiT, re-parameterised at t=500 (§2.3); the "
                   "default for a toy text-to-image run: checkpoints/toy_dit")
    p.add_argument("--no-reparam", action="store_true", help="with --init-dit: copy only the weights PixArt shares "
                   "with the DiT, and leave t_block and the adaLN tables at PixArt's init (notebook 03's ablation)")
    p.add_argument("--from-scratch", action="store_true", help="a toy text-to-image run from random weights, not "
                   "from checkpoints/toy_dit")
    p.add_argument("--resume", help="continue this checkpoint's run exactly, with its own settings; of the others only "
                   "--steps, --lr, --warmup, --clip, --eval-every and --save-every may be given anew")
    p.add_argument("--score", help="no training: score this model (folder, .safetensors, or a stage-1 last.pt) "
                                   "on --eval-n prompts a group")
    p.add_argument("--distill-lcm", metavar="TEACHER", help="LCM distillation (PixArt-delta): a student, starting as "
                   "a copy of this PixArt (folder, file or last.pt), learns to draw in 4 unguided steps what the "
                   "teacher draws guided; its own defaults: " + ", ".join(f"--{k.replace('_', '-')} {v}"
                                                                          for k, v in LCM_DISTILL.items()))
    p.add_argument("--teacher-cfg", type=float, help="with --distill-lcm: the teacher's guidance scale, as --cfg "
                   "(the official config's cfg_scale 4.5 is the LCM paper's w: 5.5 on this scale)")
    p.add_argument("--lcm-skip", type=int, help="with --distill-lcm: the teacher's DDIM step, in timesteps (the "
                   "official 20: one step of its 50-step grid; the toy's default 100)")
    p.add_argument("--huber-c", type=float, help="with --distill-lcm: the official pseudo-Huber loss with this c (a "
                   "difference below c counts as its square, above it as its size; official 0.001) in place of the "
                   "toy's squared difference")
    p.add_argument("--lora", type=int, metavar="RANK", help="train only low-rank adapters of this rank on --init's "
                   "model (lora.py); the run also saves them in PEFT's format (lora/) and merged (pixart.safetensors)")
    p.add_argument("--lora-targets", help="with --lora: the layers to adapt, diffusers' names, comma-separated "
                   f"(PEFT's rule: a name or its ending); default {','.join(lora.ATTENTION_MLP)}")
    p.add_argument("--concept", choices=list(shapes.NEW_COLORS), help="shapes world: object 0 takes this new colour "
                   "in half the scenes, and the evaluation adds a group of one object of it (notebook 07)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=16, help="global batch, split over the processes")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--lr-decay", choices=["none", "cosine"], default="none",
                   help="cosine: multiply the lr by a half cosine, from 1 at step 0 to 0 at --steps (a resumed run "
                        "given a longer --steps stretches it)")
    p.add_argument("--timesteps", choices=["uniform", "logit-normal"], default="logit-normal",
                   help="how training draws t: uniform (the paper), or logit-normal, most often near t=500")
    p.add_argument("--prediction", choices=["epsilon", "v"],
                   help="a new model's target: the noise (the paper's) or v (default: the preset's, v for the toy)")
    p.add_argument("--weight-decay", type=float, default=0.03)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--ema", type=float, default=0.9999)
    p.add_argument("--null-prob", type=float, default=0.1, help="share of captions replaced by the null caption")
    p.add_argument("--cfg", type=float, default=4.5, help="guidance scale of the evaluation samples")
    p.add_argument("--eval-steps", type=int, default=20, help="sampler steps of the evaluation samples")
    p.add_argument("--eval-sampler", choices=["dpm-solver", "ddim", "ddpm", "lcm"], default="dpm-solver",
                   help="sampler of the evaluation samples; lcm (a --distill-lcm student's) defaults to --eval-steps 4 "
                        "--cfg 1")
    p.add_argument("--eval-every", type=int, default=1000,
                   help="shapes world: score the EMA model every so often; 0: never")
    p.add_argument("--eval-n", type=int, default=64, help="prompts per group (1/2 objects, seen/held-out)")
    p.add_argument("--eval-seed", type=int, default=1234, help="picks the evaluation's prompts and noise")
    p.add_argument("--save-every", type=int, default=250)
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--seed", type=int, default=0)
    return p


def check_args(args, error):
    """Every mistake in the options that can be seen before any work, as `train.py: error: ...` (exit code 2)."""
    for name in ("resume", "init_dit", "data", "score", "distill_lcm"):   # local paths; --init may also be a hub id
        path = getattr(args, name)
        if path and path != "shapes" and not Path(path).exists():
            error(f"--{name.replace('_', '-')}: no such file or folder: {path}")
    if args.steps < 1 or args.batch_size < 1 or args.lr <= 0:
        error("--steps, --batch-size and --lr must be positive")
    if not 1 <= args.eval_steps < pm.T:                            # caught now, not at the first evaluation
        error(f"--eval-steps must be from 1 to {pm.T - 1}, got {args.eval_steps}")
    if args.two_objects is not None and not 0 <= args.two_objects <= 1:
        error(f"--two-objects is a share, from 0 to 1, got {args.two_objects}")
    if args.eval_seed < 0:
        error(f"--eval-seed must be 0 or more, got {args.eval_seed}")
    if args.save_every < 1 or args.eval_n < 1 or args.eval_every < 0:
        error("--save-every and --eval-n must be at least 1, --eval-every 0 (never) or more")
    if not (math.isfinite(args.cfg) and args.cfg >= 0):
        error(f"--cfg must be a finite number >= 0, got {args.cfg}")
    if args.data != "shapes" and (args.cond == "class" or args.captions != "dense" or args.two_objects != TWO_OBJECTS):
        error("--cond class, --captions sparse and --two-objects are for the shapes world: "
                "a folder has its own captions")
    if args.score and args.data != "shapes":
        error("--score reads pictures back with the shapes world's evaluator: leave out --data")
    patch = pm.PRESETS[args.preset].patch_size
    if args.data != "shapes" and patch != 2 and not (args.init or args.init_dit or args.resume):
        error(f"--preset {args.preset} has {patch}x{patch} patches; a folder's aspect-ratio buckets are cut for "
                "patches of 2, as the official ones are: choose a PixArt-XL preset, or tiny")
    if args.prediction and (args.init or args.init_dit or args.resume or args.score):
        error("--prediction is for a new model (with the toy, add --from-scratch): one started from weights keeps the "
              "target it was trained on")
    if args.warmup < 1:
        error("--warmup must be at least 1 (the number of steps the lr takes to rise to --lr)")
    if not (0 <= args.ema < 1 and 0 <= args.null_prob <= 1 and args.clip > 0):
        error(f"--ema must be from 0 to below 1, --null-prob from 0 to 1 and --clip above 0; got {args.ema}, "
                f"{args.null_prob} and {args.clip}")
    if args.from_scratch and (args.init or args.init_dit or args.resume or args.score):
        error("--from-scratch starts from random weights: leave out --init, --init-dit, --resume and --score")
    if args.no_reparam and not args.init_dit:
        error("--no-reparam changes how --init-dit starts stage 2: give --init-dit (the toy's default) too")
    if args.init_dit and args.cond == "class":
        error("--init-dit starts stage 2, which reads captions: leave out --cond class")
    check_lcm_args(args, error)
    check_lora_args(args, error)


def check_lcm_args(args, error):
    """The mistakes of --distill-lcm and of the lcm sampler."""
    if args.distill_lcm:
        clash = [flag for flag, value in [("--init", args.init), ("--init-dit", args.init_dit), ("--score", args.score),
                                          ("--from-scratch", args.from_scratch), ("--prediction", args.prediction),
                                          ("--lora", args.lora)] if value]
        if clash:
            error(f"--distill-lcm starts the student as a copy of its teacher: leave out {', '.join(clash)}")
        if args.cond == "class":
            error("--distill-lcm distils a text-to-image PixArt, which reads captions: leave out --cond class")
        if not (math.isfinite(args.teacher_cfg) and args.teacher_cfg >= 0):
            error(f"--teacher-cfg must be a finite number >= 0, got {args.teacher_cfg}")
        if not ((args.huber_c is None or args.huber_c > 0) and 1 <= args.lcm_skip < pm.T):
            error(f"--huber-c must be above 0 and --lcm-skip from 1 to {pm.T - 1}, got {args.huber_c} and "
                  f"{args.lcm_skip}")
    elif not all(getattr(args, k) is None for k in ("teacher_cfg", "huber_c", "lcm_skip")):
        error("--teacher-cfg, --huber-c and --lcm-skip are --distill-lcm's: give --distill-lcm too")
    if args.eval_sampler == "lcm" and (args.cfg != 1 or args.eval_steps > lcm.GRID):
        error(f"--eval-sampler lcm takes --cfg 1 (the teacher's guidance is distilled in) and at most {lcm.GRID} "
              f"--eval-steps; got --cfg {args.cfg}, --eval-steps {args.eval_steps}")


def check_lora_args(args, error):
    """The mistakes of --lora and --concept."""
    if args.lora is not None:
        if args.lora < 1:
            error(f"--lora is the adapters' rank, a whole number >= 1; got {args.lora}")
        if not args.init:
            error("--lora adapts a finished PixArt: name it with --init (e.g. --init checkpoints/toy)")
        if args.cond == "class":
            error("--lora adapts a text-to-image PixArt: leave out --cond class")
    elif args.lora_targets:
        error("--lora-targets names the layers that --lora adapts: give --lora RANK too")
    if args.concept and (args.data != "shapes" or args.cond != "text"):
        error("--concept is a colour of the shapes world's captions: leave out --data and --cond class")


if __name__ == "__main__":
    main()
