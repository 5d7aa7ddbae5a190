"""lora.py against PEFT as the oracle: PEFT's adapter files (the format of the official PixArt LoRA and LCM-LoRA) load
onto our fused-qkv PixArt and compute what PEFT computes on diffusers' model, and ours load back into PEFT; a saved
adapter reloads exactly, merging changes nothing, a fresh adapter changes nothing, only adapters train; bad input.

Facts (PixArt-alpha/PixArt-alpha at cac2fd3): train_scripts/train_pixart_lcm_lora.py wraps diffusers' transformer with
peft's get_peft_model(LoraConfig(r=config.lora_rank, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in",
"proj_out", "ff.net.0.proj", "ff.net.2", "proj", "linear", "linear_1", "linear_2"])) and saves with save_pretrained;
configs/pixart_config/PixArt_xl2_img1024_lcm.py sets lora_rank = 32, and lora_alpha is left at PEFT's default, 8.
app/app_lcm.py loads PixArt-alpha/PixArt-LCM-LoRA-XL-2-1024-MS with PeftModel.from_pretrained. On PixArt that list
picks every linear and the patchify conv (pos_embed.proj); lora.LCM_LORA is it without proj_in, which picks nothing.
"""
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import lora
import pixart_min as pm
from conftest import diffusers_pixart, report
from test_pixart import inputs, reference

QV = ["to_q", "to_v"]   # the LoRA paper's choice: two of the three slices of attn.qkv, one of cross_attn.kv_linear
CASES = {               # name -> (diffusers model options, PEFT LoraConfig)
    "q and v": (dict(), dict(r=4, lora_alpha=6, target_modules=QV)),
    "attention and MLP": (dict(), dict(r=3, lora_alpha=8, target_modules=lora.ATTENTION_MLP)),
    "LCM-LoRA targets, 1024-MS, rsLoRA": (dict(use_additional_conditions=True),
                                          dict(r=4, lora_alpha=8, target_modules=lora.LCM_LORA, use_rslora=True)),
}


def twins(tmp_path, seed=1, **cfg):
    """diffusers' tiny PixArt with random weights, and ours loaded from its save_pretrained folder."""
    ref = diffusers_pixart(seed, **cfg)
    ref.save_pretrained(tmp_path / "transformer")
    return ref, pm.load_pixart(tmp_path / "transformer")


@torch.no_grad()
def randomize_lora_(named_params, seed):
    """Random A and B (PEFT's B starts at zero: a comparison through it would prove nothing), about as large as
    the weights they adapt, so that the update matters but attention logits stay moderate."""
    g = torch.Generator().manual_seed(seed)
    for _, p in sorted(named_params, key=lambda np: np[0]):
        p.copy_(torch.randn(p.shape, generator=g) * 0.5 / p[0].numel() ** 0.5)


def outputs(model, micro, seed=0):
    """Ours (a PixArt) or diffusers' (with or without PEFT's layers) on the same inputs, (3, 8, 8, 8)."""
    x, t, y, mask, hw, ar = inputs(B=3, H=8, W=8, L=7, caption_channels=32, seed=seed)
    hw, ar = (hw, ar) if micro else (None, None)
    if isinstance(model, pm.PixArt):
        with torch.no_grad():
            return model(x, t, y, mask, hw, ar)
    return reference(model, x, t, y, mask, hw, ar)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def our_lora_params(model):
    return [(n, p) for n, p in model.named_parameters() if ".lora_" in n]


# ----------------------------------------------------------------------------------------------------
# 1, 2. Parity with PEFT, both ways
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_a_peft_adapter_loads_onto_our_fused_model(case, tmp_path):
    cfg, lora_cfg = CASES[case]
    ref, ours = twins(tmp_path, **cfg)
    micro, base = bool(cfg), outputs(ours, bool(cfg))
    peft_model = get_peft_model(ref, LoraConfig(**lora_cfg))                 # adapts ref itself, in place
    randomize_lora_([(n, p) for n, p in peft_model.named_parameters() if "lora_" in n], seed=2)
    peft_model.save_pretrained(tmp_path / "adapter")
    keys = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert "base_model.model.transformer_blocks.0.attn1.to_q.lora_A.weight" in keys   # the naming lora.py reads
    params = lora.load_lora(ours, tmp_path / "adapter")
    assert len(params) == len(keys)                                           # one parameter per stored A and B
    mine, theirs = outputs(ours, micro), outputs(ref, micro)
    report(f"LoRA from PEFT: {case}", (mine - theirs).abs().max().item())
    assert rel_err(mine, theirs) < 1e-5
    assert rel_err(base, theirs) > 0.05                                       # the adapter matters


@pytest.mark.parametrize("case", ["q and v", "LCM-LoRA targets, 1024-MS, rsLoRA"])
def test_our_adapter_loads_into_peft(case, tmp_path):
    cfg, lora_cfg = CASES[case]
    ref, ours = twins(tmp_path, **cfg)
    lora.add_lora(ours, rank=lora_cfg["r"], alpha=lora_cfg["lora_alpha"], targets=lora_cfg["target_modules"])
    randomize_lora_(our_lora_params(ours), seed=3)
    lora.save_lora(ours, tmp_path / "ours")
    peft_model = PeftModel.from_pretrained(ref, tmp_path / "ours")
    loaded = {k.replace(".default", "") for k, _ in peft_model.named_parameters() if "lora_" in k}
    assert set(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == loaded   # every pair, no more
    micro = bool(cfg)
    assert rel_err(outputs(ours, micro), outputs(ref, micro)) < 1e-5


def test_every_layer_has_its_diffusers_name(tmp_path):
    """The name table (pixart_min.DIFFUSERS_NAMES read backwards, q/k/v split) gives exactly diffusers' layers."""
    ref, ours = twins(tmp_path, use_additional_conditions=True)
    theirs = {n for n, m in ref.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    table = lora.diffusers_names(ours)
    assert set(table) == theirs
    assert table["transformer_blocks.1.attn1.to_v"] == ("blocks.1.attn.qkv", 2, 3)
    assert table["transformer_blocks.1.attn2.to_k"] == ("blocks.1.cross_attn.kv_linear", 0, 2)
    assert table["pos_embed.proj"] == ("x_embedder.proj", 0, 1)


# ----------------------------------------------------------------------------------------------------
# 3, 4. Fresh, saved, reloaded, merged; what trains
# ----------------------------------------------------------------------------------------------------

def test_fresh_saved_reloaded_and_merged(tmp_path):
    _, ours = twins(tmp_path)
    _, again = twins(tmp_path)
    keys, base = set(ours.state_dict()), outputs(ours, False)
    lora.add_lora(ours, rank=4, targets=lora.LCM_LORA)
    assert torch.equal(outputs(ours, False), base)                        # B = 0: a fresh adapter changes nothing
    randomize_lora_(our_lora_params(ours), seed=4)
    adapted = outputs(ours, False)
    lora.save_lora(ours, tmp_path / "a")
    lora.load_lora(again, tmp_path / "a")
    assert torch.equal(outputs(again, False), adapted)                    # reloads to the same numbers
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["target_modules"] == lora.LCM_LORA
    assert lora.merge_lora(again) is again
    assert not any(isinstance(m, lora.LoRA) for m in again.modules()) and not hasattr(again, "lora_config")
    assert set(again.state_dict()) == keys                                # a plain PixArt: the official keys
    assert rel_err(outputs(again, False), adapted) < 1e-5                 # folded in: only float rounding changes
    assert rel_err(adapted, base) > 0.05


def test_only_the_adapters_train(tmp_path):
    _, ours = twins(tmp_path)
    params = lora.add_lora(ours, rank=2, targets=QV)
    trainable = [(n, p) for n, p in ours.named_parameters() if p.requires_grad]
    assert [p for _, p in trainable] == params == lora.lora_parameters(ours)
    # to_q: attn.qkv slice 0 and cross_attn.q_linear; to_v: attn.qkv slice 2 and cross_attn.kv_linear slice 1
    assert sorted(n for n, _ in trainable if n.startswith("blocks.0.")) == sorted(
        f"blocks.0.{layer}.lora_{ab}.{i}" for ab in "AB"
        for layer, i in [("attn.qkv", 0), ("attn.qkv", 2), ("cross_attn.kv_linear", 1), ("cross_attn.q_linear", 0)])
    assert len(params) == 2 * 4 * ours.config.depth                       # (A, B) x 4 slices x blocks
    x, t, y, mask, _, _ = inputs(B=2, H=8, W=8, L=7, caption_channels=32)
    before = outputs(ours.eval(), False)
    opt = torch.optim.SGD(params, lr=0.1)
    ours(x, t, y, mask).square().mean().backward()
    assert all(p.grad is not None for p in params)
    assert all(p.grad is None for p in ours.parameters() if not p.requires_grad)
    opt.step()
    assert rel_err(outputs(ours, False), before) > 1e-4                   # B moved off zero: the output changes


# ----------------------------------------------------------------------------------------------------
# 5. Bad input, each named
# ----------------------------------------------------------------------------------------------------

@pytest.fixture
def saved(tmp_path):
    """A tiny PixArt and a folder holding an adapter of rank 2 on q and v, saved by lora.py."""
    _, ours = twins(tmp_path)
    _, other = twins(tmp_path)
    lora.add_lora(other, rank=2, targets=QV)
    lora.save_lora(other, tmp_path / "adapter")
    return ours, tmp_path / "adapter"


def edit_config(folder, **changes):
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, **changes}))


def test_bad_targets_and_ranks_are_named(tmp_path):
    _, ours = twins(tmp_path)
    with pytest.raises(ValueError, match=r"targets \['to_qq'\] name no layer.*attn1.to_q"):
        lora.add_lora(ours, targets=["to_q", "to_qq"])
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        lora.add_lora(ours, rank=0)
    with pytest.raises(ValueError, match="no LoRA adapters to save"):
        lora.save_lora(ours, tmp_path / "nothing")
    lora.add_lora(ours, targets=QV)
    with pytest.raises(ValueError, match="has LoRA adapters already"):
        lora.add_lora(ours)


def test_files_that_are_no_peft_lora_are_named(saved, tmp_path):
    ours, folder = saved
    with pytest.raises(ValueError, match="is not a PEFT adapter"):
        lora.load_lora(ours, tmp_path / "transformer")                    # a model folder, not an adapter
    with pytest.raises(FileNotFoundError, match="no such file"):
        lora.load_lora(ours, tmp_path / "missing")
    for change, message in [(dict(peft_type="LOHA"), "peft_type 'LOHA'"), (dict(use_dora=True), "'use_dora': True"),
                            (dict(target_modules=None), "target_modules None")]:
        edit_config(folder, **change)
        with pytest.raises(ValueError, match=message):
            lora.load_lora(ours, folder)
        edit_config(folder, peft_type="LORA", use_dora=False, target_modules=QV)
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="is no JSON"):
        lora.load_lora(ours, folder)


def test_weights_that_do_not_fit_are_named(saved, tmp_path):
    ours, folder = saved
    edit_config(folder, r=8)                                              # the config says 8, the weights 2
    with pytest.raises(ValueError, match=r"transformer_blocks.0.attn1.to_q: lora_A \(2, 32\).*rank r = 8"):
        lora.load_lora(ours, folder)
    edit_config(folder, r=2, target_modules=["to_q"])                     # weights for to_v too
    with pytest.raises(ValueError, match="attn1.to_v.*which its target_modules do not name"):
        lora.load_lora(ours, folder)
    edit_config(folder, target_modules=QV)
    weights = folder / "adapter_model.safetensors"
    sd = load_file(weights)
    save_file({k: v for k, v in sd.items() if k != "base_model.model.proj_out.lora_B.weight"} | {
        "base_model.model.proj_out.lora_A.weight": torch.zeros(2, 32)}, weights)
    with pytest.raises(ValueError, match="not all .lora_A, lora_B. pairs.*proj_out.lora_B.weight"):
        lora.load_lora(ours, folder)
    save_file(sd | {"base_model.model.transformer_blocks.5.attn1.to_q.lora_A.weight": torch.zeros(2, 32),
                    "base_model.model.transformer_blocks.5.attn1.to_q.lora_B.weight": torch.zeros(32, 2)}, weights)
    with pytest.raises(ValueError, match=r"adapts layers this PixArt does not have: \['transformer_blocks.5"):
        lora.load_lora(ours, folder)
    _, wide = twins(tmp_path / "wide", attention_head_dim=24)             # hidden 48: every A is too narrow
    save_file(sd, weights)
    with pytest.raises(ValueError, match=r"do not fit .* layer's weight \(144, 48\)"):
        lora.load_lora(wide, folder)
