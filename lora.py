"""LoRA (Hu et al., arXiv 2106.09685) for pixart_min.PixArt: a frozen weight W learns only a low-rank update,
W x + (alpha / r) B A x with A (r, in) and B (out, r); B starts at zero, so a fresh adapter changes nothing.

Files are PEFT's, as the official PixArt LoRA and LCM-LoRA scripts save them (PixArt-alpha/PixArt-alpha,
train_scripts/train_pixart_lora_hf.py and train_pixart_lcm_lora.py: get_peft_model, then save_pretrained): a folder
with adapter_config.json (peft_type "LORA", r, lora_alpha, target_modules, ...) and adapter_model.safetensors, keys
"base_model.model.<diffusers module>.lora_A.weight" and ".lora_B.weight" over diffusers' PixArtTransformer2DModel.
PEFT picks a module when its name equals a target or ends in "." + target (a string target is a regex).

    params = add_lora(model, rank=8)          # base frozen; train `params`
    save_lora(model, "my_lora")               # PeftModel.from_pretrained(diffusers_transformer, "my_lora") reads it
    load_lora(model, "PixArt-alpha/PixArt-LCM-LoRA-XL-2-1024-MS");  merge_lora(model)   # a plain PixArt again
"""
import json
import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import pixart_min as pm

ATTENTION_MLP = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]   # every block's linears
# The official LCM-LoRA's (train_pixart_lcm_lora.py; also train_pixart_lora_hf.py's): every linear and the patchify
# conv ("proj" picks pos_embed.proj); their list also names "proj_in", which no PixArt layer has. Its config
# (configs/pixart_config/PixArt_xl2_img1024_lcm.py) sets lora_rank = 32; lora_alpha is PEFT's default, 8.
LCM_LORA = ATTENTION_MLP + ["proj_out", "proj", "linear", "linear_1", "linear_2"]
FUSED = {"attn.qkv": ["attn1.to_q", "attn1.to_k", "attn1.to_v"], "cross_attn.kv_linear": ["attn2.to_k", "attn2.to_v"]}
PREFIX = "base_model.model."                  # PeftModel's own prefix on every saved key


class LoRA(nn.Module):
    """A frozen linear (or the patchify conv) plus scale * B_i A_i on each adapted slice i of its output.

    Our attn.qkv is diffusers' to_q, to_k and to_v stacked into one weight; its output is [q | k | v]
    (cross_attn.kv_linear: to_k, to_v). A PEFT file holds one pair (A, B) per diffusers linear, so this wrapper holds
    one pair per output slice ("0", "1", "2": q, k, v) and adds slice i's update to that slice alone; merged, that is
    W[rows of slice i] += scale * B_i A_i. A plain linear is the case of one slice. Pairs keep PEFT's shapes:
    A (r, in), B (out / slices, r); for the conv, A (r, C, p, p) is a patchify conv itself and B (D, r, 1, 1)."""
    def __init__(self, base, names, rank, scale):
        super().__init__()
        self.base, self.names, self.rank, self.scale = base, names, rank, scale   # names: each slice's diffusers name
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()        # slice "i" -> its A, its B

    weight = property(lambda self: self.base.weight)                    # the model reads t_embedder.mlp[0].weight.dtype

    def add(self, i, pair=None):
        """A pair on slice i: given (a loaded file's), or fresh: A as PEFT and nn.Linear initialise it, B zero."""
        W, ones = self.base.weight, [1] * (self.base.weight.dim() - 2)
        A = nn.init.kaiming_uniform_(W.new_empty(self.rank, *W.shape[1:]), a=5 ** 0.5)   # (r, in) or (r, C, p, p)
        B = W.new_zeros(len(W) // len(self.names), self.rank, *ones)                       # (out/n, r) or (D, r, 1, 1)
        self.lora_A[str(i)], self.lora_B[str(i)] = (nn.Parameter(t.to(W)) for t in (pair or (A, B)))

    def forward(self, x):
        y = self.base(x)
        if isinstance(self.base, nn.Conv2d):                              # x (B, C, H, W): one slice, "0"
            h = F.conv2d(x, self.lora_A["0"], stride=self.base.stride, padding=self.base.padding)   # (B, r, H/p, W/p)
            return y + self.scale * F.conv2d(h, self.lora_B["0"])                                    # (B, D, H/p, W/p)
        parts = list(y.chunk(len(self.names), dim=-1))                    # [q | k | v] -> q, k, v, each (..., out/n)
        for i, A in self.lora_A.items():                                  # (..., in) -> (..., r) -> (..., out/n)
            parts[int(i)] = parts[int(i)] + self.scale * F.linear(F.linear(x, A), self.lora_B[i])
        return torch.cat(parts, dim=-1)                                   # (..., out)

    @torch.no_grad()
    def merged(self):
        """The base layer with every update folded into its weight."""
        rows = self.base.weight.chunk(len(self.names))                   # views: adding to them changes the weight
        for i, A in self.lora_A.items():                                  # W[rows of i] += scale * B_i A_i
            rows[int(i)].add_(self.scale * (self.lora_B[i].flatten(1) @ A.flatten(1)).view_as(rows[int(i)]))
        return self.base


def diffusers_names(model):
    """{diffusers module name: (our module name, output slice, slices)} for every linear and conv of a PixArt: the
    fused ones give one name per slice, the others are renamed by pixart_min.DIFFUSERS_NAMES, read backwards."""
    if any(isinstance(m, LoRA) for m in model.modules()):
        raise ValueError("this model has LoRA adapters already: merge_lora(model) first, or start from a fresh model")
    table = {}
    for ours, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            fused = next((k for k in FUSED if ours.endswith("." + k)), None)
            pieces = [ours[:-len(fused)] + p for p in FUSED[fused]] if fused else [ours]   # "blocks.0." + "attn1.to_q"
            for i, name in enumerate(pieces):
                name += "."                                               # DIFFUSERS_NAMES' pieces end in a dot
                for theirs, our_piece in reversed(pm.DIFFUSERS_NAMES):
                    name = name.replace(our_piece, theirs)
                table[name[:-1]] = (ours, i, len(pieces))
    return table


def matches(name, targets):
    """PEFT's rule: a list names modules by their name or its ending after a dot; a string is a regex of the name."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def attach(model, table, pairs, config):
    """Wrap the layers behind pairs' diffusers names in LoRA, a pair per name (None: fresh); freeze the rest."""
    model.requires_grad_(False)
    r, alpha = config["r"], config["lora_alpha"]
    scale = alpha / r ** 0.5 if config["use_rslora"] else alpha / r   # rsLoRA (PEFT's use_rslora): alpha / sqrt(r)
    for name, pair in pairs.items():
        ours, i, _ = table[name]
        layer = model.get_submodule(ours)
        if not isinstance(layer, LoRA):
            slices = [theirs for theirs, (o, _, _) in table.items() if o == ours]   # in slice order: q, k, v
            parent, _, child = ours.rpartition(".")
            setattr(model.get_submodule(parent), child, layer := LoRA(layer, slices, r, scale))
        layer.add(i, pair)
    model.lora_config = config                                        # what save_lora writes
    return lora_parameters(model)


def lora_parameters(model):
    """The adapter's A and B matrices: the only parameters to train."""
    return [p for m in model.modules() if isinstance(m, LoRA) for p in [*m.lora_A.values(), *m.lora_B.values()]]


def add_lora(model, rank=8, alpha=None, targets=ATTENTION_MLP):
    """Fresh adapters of rank r on the layers that targets, a list of diffusers names, pick (PEFT's rule, see matches);
    alpha / rank scales the update (alpha=None: alpha = rank, scale 1). Returns the parameters to train."""
    if not (isinstance(rank, int) and rank >= 1):
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    table, targets = diffusers_names(model), [targets] if isinstance(targets, str) else list(targets)
    if unknown := [t for t in targets if not any(matches(name, [t]) for name in table)]:
        raise ValueError(f"targets {unknown} name no layer of this PixArt; its layers are named as in diffusers, "
                         f"e.g. {sorted({n.split('.', 2)[-1] for n in table})}")
    config = dict(r=rank, lora_alpha=alpha or rank, target_modules=targets, use_rslora=False)
    return attach(model, table, {n: None for n in table if matches(n, targets)}, config)


def save_lora(model, folder):
    """The adapters as PEFT saves them: folder/adapter_config.json and folder/adapter_model.safetensors."""
    from safetensors.torch import save_file
    layers = [m for m in model.modules() if isinstance(m, LoRA)]
    if not layers:
        raise ValueError("this model has no LoRA adapters to save: add_lora or load_lora first")
    tensors = {f"{PREFIX}{m.names[int(i)]}.lora_{ab}.weight": p[i].detach().contiguous()
               for m in layers for i in m.lora_A for ab, p in [("A", m.lora_A), ("B", m.lora_B)]}
    config = dict(peft_type="LORA", **model.lora_config, lora_dropout=0.0, bias="none", use_dora=False,
                  fan_in_fan_out=False, inference_mode=True, base_model_name_or_path=None, task_type=None)
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, str(Path(folder) / "adapter_model.safetensors"), metadata={"format": "pt"})


def read_adapter(path):
    """(config, {diffusers module: (A, B)}) of a PEFT LoRA folder or hub id, each departure from the format named."""
    folder = pm.local_folder(path, ["adapter_config.json", "adapter_model.*"])
    files = [folder / f for f in ("adapter_model.safetensors", "adapter_model.bin")] if folder.is_dir() else []
    weights = next((f for f in files if f.exists()), None)
    if weights is None or not (folder / "adapter_config.json").exists():
        raise ValueError(f"{path} is not a PEFT adapter: that is a folder with adapter_config.json and "
                         "adapter_model.safetensors (or .bin)")
    try:
        cfg = json.loads((folder / "adapter_config.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{folder / 'adapter_config.json'} is no JSON: {e}") from None
    wrong = {k: cfg[k] for k in ("use_dora", "bias", "fan_in_fan_out", "rank_pattern", "alpha_pattern",
                                 "modules_to_save") if cfg.get(k) not in (None, False, {}, [], "none")}
    if cfg.get("peft_type") != "LORA" or wrong or not isinstance(cfg.get("r"), int) or \
            not isinstance(cfg.get("target_modules"), (list, str)):
        raise ValueError(f"{folder} is no plain PEFT LoRA: peft_type {cfg.get('peft_type')!r} (want 'LORA'), r "
                         f"{cfg.get('r')!r}, target_modules {cfg.get('target_modules')!r}, unsupported options {wrong}")
    sd = {k.removeprefix(PREFIX): v for k, v in pm.read_weights(weights)[0].items()}
    layers = {k.rsplit(".", 2)[0] for k in sd}                            # "<module>.lora_A.weight" -> "<module>"
    if odd := sorted(sd.keys() ^ {f"{n}.lora_{ab}.weight" for n in layers for ab in "AB"}):
        raise ValueError(f"{weights} is not all (lora_A, lora_B) pairs; extra or missing: {odd[:5]}")
    return cfg, {n: (sd[f"{n}.lora_A.weight"], sd[f"{n}.lora_B.weight"]) for n in sorted(layers)}


def load_lora(model, path):
    """A PEFT LoRA adapter (folder or hub id) onto a PixArt, as trainable adapters; returns their parameters. Its
    lora_dropout, a training option, is not applied."""
    cfg, pairs = read_adapter(path)
    table, r = diffusers_names(model), cfg["r"]
    if missing := [n for n in pairs if n not in table]:
        raise ValueError(f"{path} adapts layers this PixArt does not have: {missing[:5]} (a PixArt of another size, or "
                         f"another model's adapter?)")
    if untargeted := [n for n in pairs if not matches(n, cfg["target_modules"])]:
        raise ValueError(f"{path} holds weights for {untargeted[:5]}, which its target_modules do not name")
    for name, (A, B) in pairs.items():
        W = model.get_submodule(table[name][0]).weight
        want_A, want_B = (r, *W.shape[1:]), (len(W) // table[name][2], r, *[1] * (W.dim() - 2))
        if A.shape != want_A or B.shape != want_B:
            raise ValueError(f"{name}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} do not fit rank r = {r} "
                             f"(the config's) and the layer's weight {tuple(W.shape)}: want {want_A} and {want_B}")
    config = dict(r=r, lora_alpha=cfg.get("lora_alpha", 8), target_modules=cfg["target_modules"],   # PEFT's alpha: 8
                  use_rslora=bool(cfg.get("use_rslora")))
    return attach(model, table, pairs, config)


def merge_lora(model):
    """Fold every adapter into its base weight and remove the wrappers: a plain PixArt (still frozen) with the official
    keys, which computes what the adapted model computed. Returns the model."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRA):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, m.merged())
    model.__dict__.pop("lora_config", None)
    return model
