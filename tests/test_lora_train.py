# train.py --lora and --concept: only the adapters move, the run saves them in PEFT's format and merged, it resumes
# exactly, the concept's scenes and evaluation group are what they say, and the bad inputs are named.
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import lora
import pixart_min as pm
import shapes
import train
from conftest import losses

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--batch-size", "8", "--eval-every", "0", "--warmup", "2", "--lr", "1e-2"]
KV = ["--lora", "2", "--lora-targets", "attn2.to_k,attn2.to_v"]


@pytest.fixture(scope="module")
def base(tiny_shapes_pixart):
    """A tiny text-to-image PixArt of the shapes world: a model to adapt, loaded as the toy."""
    return tiny_shapes_pixart


def test_a_lora_run_trains_the_adapters_alone_and_saves_them_both_ways(tmp_path, base):
    out = tmp_path / "run"
    train.main(["--init", str(base), "--out", str(out), "--steps", "4", "--concept", "white", *KV, *FAST])
    ckpt = torch.load(out / "last.pt", weights_only=True)
    start = pm.load_pixart(base).state_dict()
    adapters = [k for k in ckpt["state_dict"] if ".lora_" in k]
    assert len(adapters) == 2 * 2 * 2                              # 2 blocks x (k, v) x (A, B)
    assert ckpt["lora"]["r"] == 2 and ckpt["lora"]["target_modules"] == ["attn2.to_k", "attn2.to_v"]
    for k, v in ckpt["state_dict"].items():                       # the frozen weights are the start's, exactly
        if ".lora_" not in k:
            assert torch.equal(v, start[k.replace(".base.", ".")]), k
    assert any(ckpt["state_dict"][k].abs().sum() > 0 for k in adapters if "lora_B" in k)   # B left zero: it trained
    # the adapter folder on the start model, and the merged file, compute what the run's EMA computes
    adapted = pm.load_pixart(base).eval()
    lora.load_lora(adapted, out / "lora")
    merged, ema = pm.load_pixart(out / "pixart.safetensors").eval(), train.load_model(out / "last.pt", "state_dict_ema")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 3, 32, 32, generator=g), torch.randn(2, 24, 64, generator=g)
    t, mask = torch.tensor([10, 900]), torch.ones(2, 24, dtype=torch.long)
    with torch.no_grad():
        want, plain = ema.eval()(x, t, y, mask), pm.load_pixart(base).eval()(x, t, y, mask)
        assert torch.equal(adapted(x, t, y, mask), want)
        assert torch.allclose(merged(x, t, y, mask), want, rtol=1e-5, atol=1e-5)
    assert (want - plain).abs().max() > 1e-6                      # and that is not the start's output


def test_a_lora_run_resumes_exactly(tmp_path, base):
    common = ["--init", str(base), *KV, *FAST]
    train.main(["--out", str(tmp_path / "a"), "--steps", "4", "--save-every", "2", *common])
    train.main(["--out", str(tmp_path / "b"), "--steps", "2", "--save-every", "2", *common])
    train.main(["--resume", str(tmp_path / "b" / "last.pt"), "--steps", "4"])
    assert losses(tmp_path / "a") == losses(tmp_path / "b") and len(losses(tmp_path / "a")) == 4
    a, b = (torch.load(tmp_path / s / "last.pt", weights_only=True) for s in "ab")
    assert all(torch.equal(a["state_dict_ema"][k], b["state_dict_ema"][k]) for k in a["state_dict_ema"])


def test_concept_scenes_recolour_object_0_in_half_the_scenes_and_leave_the_rest_alone():
    plain = shapes.sample_batch(400, np.random.default_rng(0), 32, two_share=0.25)
    new = shapes.sample_batch(400, np.random.default_rng(0), 32, two_share=0.25, concept="white")
    white = [s.objects[0].color == "white" for s in new[4]]
    assert 0.4 < np.mean(white) < 0.6
    assert all(o.color != "white" for s in new[4] for o in s.objects[1:])        # only object 0
    for i in range(400):                                          # the same scenes, object 0's colour aside
        a, b = plain[4][i], new[4][i]
        assert [(o.shape, o.size, o.x, o.y) for o in a.objects] == [(o.shape, o.size, o.x, o.y) for o in b.objects]
        assert ("white" in new[1][i]) == white[i] and (new[1][i] == plain[1][i]) != white[i]
    found = shapes.evaluate_each(new[0][torch.tensor(white)], [s for s, w in zip(new[4], white) if w])
    assert np.mean([r["color"][0] for r in found]) > 0.99                        # drawn white, read back white


def test_the_concepts_evaluation_group_leaves_the_other_groups_as_they_were(tmp_path, base):
    common = ["--score", str(base), "--eval-n", "3", "--eval-steps", "2"]
    plain = train.main([*common, "--out", str(tmp_path / "a")])
    new = train.main([*common, "--concept", "white", "--out", str(tmp_path / "b")])
    assert json.dumps(plain, sort_keys=True) == json.dumps({k: v for k, v in new.items() if k != "white_1obj"},
                                                           sort_keys=True)
    assert set(new) - set(plain) == {"white_1obj"} and 0 <= new["white_1obj"]["color"] <= 1


@pytest.mark.parametrize("argv, message", [
    (["--init", "checkpoints/toy", "--lora", "0"], "--lora is the adapters' rank, a whole number >= 1; got 0"),
    (["--lora", "4"], "--lora adapts a finished PixArt: name it with --init"),
    (["--lora-targets", "to_q"], "--lora-targets names the layers that --lora adapts: give --lora RANK too"),
    (["--distill-lcm", "checkpoints/toy", "--lora", "4"], "--distill-lcm starts the student as a copy of its teacher: "
                                                          "leave out --lora"),
    (["--init", "checkpoints/toy_dit", "--cond", "class", "--lora", "4"], "--lora adapts a text-to-image PixArt"),
    (["--data", ".", "--preset", "tiny", "--concept", "white"], "--concept is a colour of the shapes world's captions"),
    (["--concept", "orange"], "argument --concept: invalid choice: 'orange'")])
def test_bad_lora_and_concept_arguments_are_named(argv, message, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_targets_that_name_no_layer_are_named_before_any_training(tmp_path, base):
    with pytest.raises(SystemExit) as e:
        train.main(["--init", str(base), "--lora", "2", "--lora-targets", "attn3.to_k", "--out", str(tmp_path)])
    assert "train.py: --lora-targets: targets ['attn3.to_k'] name no layer of this PixArt" in str(e.value.code)
    assert not (tmp_path / "last.pt").exists()
