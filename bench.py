"""Speed and memory of pixart-min against diffusers, on identical random weights and inputs, in one process.

    python bench.py                      # CPU: the toy model and PixArt-XL-2 at 256 px (about 20 minutes)
    python bench.py --sizes toy          # a quick look
    python bench.py --device cuda        # GPU, bf16: 256, 512 and 1024 px, with TFLOP/s and share of peak
    python bench.py --compile            # both models torch.compile'd first (the warm-up pays for compiling)

Three jobs per size: (a) one transformer forward on a guided batch of 2, (b) the whole 20-step DPM-Solver++
loop with guidance (diffusers: PixArtAlphaPipeline on prompt embeddings, returning latents), (c) one training
step (the hybrid loss, backward, AdamW) on a batch of 2 on the CPU, and on a GPU of 16 384 image tokens (SIZES).
Times are medians over --repeats after a warm-up; our calls and diffusers' take turns, except in XL training
steps: two optimisers' state do not fit side by side in this machine's 23 GB, so one side runs after the other,
in the order ours, theirs, theirs, ours, and each side's time is the mean of its two medians. "ratio"
is ours / diffusers, so below 1 means we are faster. Peak memory is the most one call needs on top of what was
allocated before it, measured in one extra, untimed call (for the loops a 3-step loop, the shortest with a
second-order step, which holds as much as a 20-step one): on a GPU what torch's allocator reports, on the CPU
the most bytes of tensors the call has made that are alive at once (TensorBytes; not measured for compiled
models, whose buffers it cannot see).
Needs diffusers (requirements-test.txt); pixart-min itself never imports it.
"""
import argparse
import gc
import json
import re
import statistics
import time
import weakref
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import pixart_min as pm

# bf16 dense peaks in TFLOP/s, from the vendors' data sheets (without sparsity); None: a card not listed here
PEAK_BF16 = {"H100 PCIe": 756, "H100 NVL": None, "H100": 989, "H200": 989, "A100": 312, "L40S": 362, "A10": 125,
             "4090": 165}

SIZES = {  # name -> (config, latent side, caption tokens, training batch on a GPU)
    "toy": (pm.PRESETS["toy"], 32, 24, 256),
    "XL-256": (pm.PRESETS["PixArt-XL-2-256"], 32, 120, 64),      # 16 384 image tokens a step at every size; the
    "XL-512": (pm.PRESETS["PixArt-XL-2-512"], 64, 120, 16),      # paper's per-GPU batches were 178, 40 and 12
    "XL-1024": (pm.PRESETS["PixArt-XL-2-1024-MS"], 128, 120, 4),
}
CPU_TRAIN_BATCH = 2


def forward_flops(c, h, w, text_len):
    """FLOPs of one transformer forward for one latent of h x w and text_len caption tokens (2 per multiply-add).
    Per block, with N = h*w/p^2 image tokens, D the width and L the caption length:
      self-attention  4 N D^2 (q, k, v, out) + 2 N^2 D (scores, weighted sum)
      cross-attention 2 N D^2 (q, out) + 2 L D^2 (k, v) + 2 N L D
      MLP             2 r N D^2 (r = mlp_ratio, 4)
    plus the patch embedding, the caption projection, the final linear and the timestep MLPs outside the blocks.
    Padded caption tokens are counted, as diffusers computes them and masks them afterwards; our sampling loop
    drops the padding that every caption masks, so for it our TFLOP/s count a few percent of work it skips."""
    p, D, r = c.patch_size, c.hidden_size, c.mlp_ratio
    N, L = (h // p) * (w // p), text_len
    block = 4 * N * D * D + 2 * N * N * D + 2 * N * D * D + 2 * L * D * D + 2 * N * L * D + 2 * r * N * D * D
    c_out = 2 * c.in_channels if c.learn_sigma else c.in_channels
    outside = (N * p * p * c.in_channels * D                        # patch embedding
               + L * (c.caption_channels * D + D * D)              # caption projection (2 linears)
               + N * D * p * p * c_out                             # final linear
               + 256 * D + D * D + D * 6 * D)                      # timestep MLP and adaLN-single's t_block
    return 2 * (c.depth * block + outside)


def to_diffusers(sd):
    """The official keys -> diffusers' (pixart_min.from_diffusers backwards). pos_embed and y_embedding are left out:
    diffusers recomputes the one and does not keep the other."""
    out = {}
    for k, v in sd.items():
        if k in ("pos_embed", "y_embedder.y_embedding"):
            continue
        for fused, attn, names in ((".attn.qkv.", "attn1", "qkv"), (".cross_attn.kv_linear.", "attn2", "kv")):
            if fused in k:                                           # split the fused projections
                a, b = k.replace("blocks.", "transformer_blocks.").split(fused)
                out.update({f"{a}.{attn}.to_{n}.{b}": part for n, part in zip(names, v.chunk(len(names)))})
                break
        else:
            k = "scale_shift_table" if k == "final_layer.scale_shift_table" else k
            for theirs, ours in pm.DIFFUSERS_NAMES:
                k = k.replace(ours, theirs)
            out[k] = v
    return out


def diffusers_config(c):
    """PixArtTransformer2DModel's config.json for a PixArtConfig (pixart_min.config_from_diffusers backwards)."""
    return dict(sample_size=c.input_size, patch_size=c.patch_size, in_channels=c.in_channels,
                out_channels=2 * c.in_channels if c.learn_sigma else c.in_channels, num_layers=c.depth,
                num_attention_heads=c.num_heads, attention_head_dim=c.hidden_size // c.num_heads,
                cross_attention_dim=c.hidden_size, caption_channels=c.caption_channels, norm_type="ada_norm_single",
                num_embeds_ada_norm=1000, use_additional_conditions=c.micro_condition,
                interpolation_scale=c.pe_interpolation)


def twins(config, seed=0):
    """(ours, theirs): our PixArt and diffusers' PixArtTransformer2DModel holding the same random weights."""
    from diffusers import PixArtTransformer2DModel
    torch.manual_seed(seed)
    theirs = PixArtTransformer2DModel(**diffusers_config(config))
    with torch.no_grad():
        for p in theirs.parameters():                 # random everywhere: zero-initialised layers hide mistakes
            p.normal_(0, 0.02)
    ours = pm.PixArt(replace(config, class_dropout_prob=0.0))   # diffusers' model has no caption dropout
    sd = pm.from_diffusers(theirs.state_dict())
    sd["pos_embed"], sd["y_embedder.y_embedding"] = ours.pos_embed, ours.y_embedder.y_embedding
    pm.load_strict(ours, sd, "diffusers' random weights")
    return ours.eval(), theirs.eval()


def diffusers_call(theirs):
    """diffusers' transformer behind our forward's signature."""
    def call(x, t, y, mask=None, hw=None, ar=None):
        extra = dict(resolution=hw, aspect_ratio=ar) if theirs.config.use_additional_conditions else {}
        return theirs(x, encoder_hidden_states=y, timestep=t, encoder_attention_mask=mask,
                      added_cond_kwargs=extra).sample
    return call


def inputs(config, side, text_len, batch, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, side, side, generator=g)
    y = torch.randn(batch, text_len, config.caption_channels, generator=g)
    mask = torch.ones(batch, text_len, dtype=torch.long)
    mask[:, text_len // 2:] = 0                                     # half the caption is padding, as usual
    t = torch.randint(0, pm.T, (batch,), generator=g)
    hw = torch.tensor([[side * 8.0, side * 8.0]]).repeat(batch, 1)
    ar = torch.ones(batch, 1)
    to = lambda v, float_=True: v.to(device, dtype) if float_ else v.to(device)
    return dict(x=to(x), y=to(y), mask=to(mask, False), t=to(t, False), hw=to(hw), ar=to(ar))


class TensorBytes(TorchDispatchMode):
    """Counts, op by op, the bytes of the tensors made inside it, from each new storage's creation until it is
    freed, and keeps the most alive at once: on the CPU the counterpart of torch.cuda.max_memory_allocated
    (less what kernels allocate for themselves inside). Views and in-place results reuse a storage: not new."""
    def __enter__(self):
        self.now, self.peak, self.live = 0, 0, {}
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        before = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key, size = storage.data_ptr(), storage.nbytes()
                if size and key not in before and key not in self.live:   # a new storage: counted from now
                    self.live[key] = weakref.ref(storage, lambda _, key=key, size=size: self.free(key, size))
                    self.now += size
                    self.peak = max(self.peak, self.now)
        return out

    def free(self, key, size):
        """Called by the weakref when that storage is freed."""
        del self.live[key]
        self.now -= size


def peak_bytes(fn, device):
    """The most memory one call of fn adds on top of what was held before it: on a GPU what torch's allocator
    reports, on the CPU what TensorBytes counts."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    with TensorBytes() as counted:
        fn()
    return counted.peak


def median_times(fns, repeats, device, warmup=None):
    """[(median wall time, peak memory)] of each fn in fns over repeats. One call of warmup(fn) (default fn
    itself) each first pays for one-time costs: allocations, kernel choice, caches; one more, untimed, measures
    the memory (peak_bytes). The timed calls take turns (ours, theirs, theirs, ours, ...), so a machine that
    slows down for a while slows both sides alike."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    untimed = [warmup(fn) if warmup else fn for fn in fns]
    for fn in untimed:
        fn()
    peaks = [peak_bytes(fn, device) for fn in untimed]
    times = [[] for _ in fns]
    for r in range(repeats):
        for i in (range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))):
            sync()
            start = time.perf_counter()
            fns[i]()
            sync()
            times[i].append(time.perf_counter() - start)
    return [(statistics.median(t), m) for t, m in zip(times, peaks)]


def jobs(ours, theirs, config, side, text_len, device, dtype, steps, train_batch):
    """name -> (our job, diffusers' job, FLOPs of one job). A job is a function of no arguments, except that
    the loops take a number of steps (their warm-up is three steps) and the training steps are built first
    (each builds its own optimiser)."""
    from diffusers import PixArtAlphaPipeline
    from tests.conftest import pixart_scheduler
    g = inputs(config, side, text_len, 2, device, dtype)           # a guided batch: null caption + caption
    b = inputs(config, side, text_len, train_batch, device, dtype)  # a training batch
    one = {k: v[:1] for k, v in g.items()}
    micro = lambda d: dict(hw=d["hw"], ar=d["ar"]) if config.micro_condition else {}   # 1024-MS only
    fwd = forward_flops(config, side, side, text_len)

    def forward(model):
        return lambda: model(g["x"], g["t"], g["y"], g["mask"], **micro(g))

    pipe = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=theirs,
                               scheduler=pixart_scheduler("v_prediction" if config.prediction == "v" else "epsilon"))
    pipe.set_progress_bar_config(disable=True)
    noise = one["x"]

    def our_loop(n=steps):
        return pm.sample(ours, noise, one["y"], one["mask"], null_y=g["y"][1:], null_mask=g["mask"][1:],
                         steps=n, **micro(one))

    def their_loop(n=steps):
        return pipe(negative_prompt=None, prompt_embeds=one["y"], prompt_attention_mask=one["mask"],
                    negative_prompt_embeds=g["y"][1:],
                    negative_prompt_attention_mask=g["mask"][1:], latents=noise, num_inference_steps=n,
                    height=side * 8, width=side * 8, use_resolution_binning=False, output_type="latent",
                    guidance_scale=4.5).images

    def train_step(model, call):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.03, eps=1e-10)
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda")
                    else torch.autocast("cpu", enabled=False))
        def step():
            with autocast:
                loss = pm.training_loss(call, b["x"].float(), b["y"], b["mask"], t=b["t"], **micro(b),
                                        prediction=ours.config.prediction)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)   # nothing held between steps: each call's gradients count as its own
        return step

    return {"forward": (forward(ours), forward(diffusers_call(theirs)), 2 * fwd),
            f"{steps}-step loop": (our_loop, their_loop, steps * 2 * fwd),
            "train step": (lambda: train_step(ours, ours), lambda: train_step(theirs, diffusers_call(theirs)),
                           3 * train_batch * fwd)}


def peak_tflops(device):
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16, key=len, reverse=True):           # "H100 PCIe" before "H100"
        if re.search(rf"\b{key}\b", name):                           # a whole word: "A100" is not "A1000"
            return PEAK_BF16[key]
    return None


def run(size, device, repeats, steps, results, compile_=False):
    config, side, text_len, gpu_batch = SIZES[size]
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    ours, theirs = twins(config)
    if compile_:                                  # in place, as sample.py --compile does: both sides alike
        ours.compile()
        theirs.compile()
    peak = peak_tflops(device) if device.startswith("cuda") else None
    for name, (mine, other, flops) in jobs(ours, theirs, config, side, text_len, device, dtype, steps,
                                              gpu_batch if device.startswith("cuda") else CPU_TRAIN_BATCH).items():
        row = dict(size=size, job=name, device=device, compiled=compile_)
        training = name == "train step"
        for model in (ours, theirs):
            model.to(device, torch.float32 if training else dtype).train(training).requires_grad_(training)
        with torch.set_grad_enabled(training):
            if training and size != "toy":   # XL: two optimisers' state do not fit side by side in 23 GB, so
                runs = [[], []]              # one side at a time; each side runs once early and once late, since
                for i in (0, 1, 1, 0):       # on this CPU the side that ran second was faster
                    runs[i].append(median_times([(mine, other)[i]()], repeats, device)[0])
                timed = [(statistics.mean(t for t, _ in r), max(m for _, m in r)) for r in runs]
            elif training:
                timed = median_times([mine(), other()], repeats, device)
            else:
                warmup = (lambda fn: lambda: fn(3)) if "loop" in name else None
                timed = median_times([mine, other], repeats, device, warmup)
        for model in (ours, theirs):
            model.to("cpu").eval().requires_grad_(False)
        gc.collect()
        for who, (seconds, memory) in zip(("ours", "diffusers"), timed):
            if compile_ and not device.startswith("cuda"):       # compiled code allocates past TensorBytes
                memory = float("nan")
            row[who] = dict(seconds=seconds, peak_mib=memory / 2 ** 20, tflops=flops / seconds / 1e12)
        row["ratio"] = row["ours"]["seconds"] / row["diffusers"]["seconds"]
        row["memory_ratio"] = row["ours"]["peak_mib"] / max(row["diffusers"]["peak_mib"], 1e-9)
        line = (f"{size:8s} {name:14s} ours {row['ours']['seconds'] * 1e3:9.1f} ms  diffusers "
                f"{row['diffusers']['seconds'] * 1e3:9.1f} ms  ratio {row['ratio']:.2f}   peak MiB ours "
                f"{row['ours']['peak_mib']:7.1f} diffusers {row['diffusers']['peak_mib']:7.1f}")
        if peak:
            tflops = row["ours"]["tflops"]
            line += f"   ours {tflops:.0f} TFLOP/s = {100 * tflops / peak:.0f}% of bf16 peak"
        print(line, flush=True)
        results.append(row)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--sizes", nargs="+", choices=list(SIZES),
                   help="default: toy XL-256 on the CPU, XL-256/512/1024 on a GPU")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=20, help="sampling steps of the loop")
    p.add_argument("--compile", action="store_true", help="torch.compile both models (in place) before timing")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if args.repeats < 1 or not 2 <= args.steps < pm.T:
        p.error(f"--repeats must be at least 1 and --steps from 2 to {pm.T - 1} (diffusers' pipeline treats 1 apart)")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device {args.device!r}: cpu, cuda or cuda:N")
    if args.json and not Path(args.json).parent.is_dir():
        p.error(f"--json {args.json}: no folder {Path(args.json).parent}")
    try:
        import diffusers  # noqa: F401
    except ImportError:
        raise SystemExit("bench.py compares against diffusers, which is not installed: bash setup.sh test") from None
    gpu = device.type == "cuda"
    if gpu and not torch.cuda.is_available():
        raise SystemExit("bench.py: --device cuda, but torch sees no GPU")
    if gpu:                                  # the synchronize and memory calls read the current card ("cuda": 0)
        torch.cuda.set_device(device.index or 0)
    sizes = args.sizes or (["XL-256", "XL-512", "XL-1024"] if gpu else ["toy", "XL-256"])
    where = torch.cuda.get_device_name(args.device) if gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}; medians of {args.repeats}; ratio = ours / diffusers"
          + ("; both compiled" if args.compile else ""), flush=True)
    results = []
    for size in sizes:
        run(size, args.device, args.repeats, args.steps, results, args.compile)
        if args.json:                        # after every size: a later one that fails loses nothing before it
            with open(args.json, "w") as f:
                json.dump(dict(device=where, torch=torch.__version__, results=results), f, indent=1)
    return results


if __name__ == "__main__":
    main()
