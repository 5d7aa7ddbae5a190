"""Text side: our sentencepiece tokenisation and T5 features against transformers' as the oracle.

The PixArt pipeline tokenises with T5Tokenizer(prompts, max_length=120, padding="max_length",
truncation=True, add_special_tokens=True) and encodes with T5EncoderModel(ids, attention_mask).
Our code calls sentencepiece directly; these tests show it gives the same ids, mask and features.
Everything is tiny and made in conftest.py (a sentencepiece model trained on a few dozen sentences,
a 2-layer T5 encoder), so nothing is downloaded.
"""

import warnings
from pathlib import Path

import pytest
import sentencepiece
import torch

import pixart_min
from conftest import hf_t5_tokenizer, report

LONG = ", ".join(["a large red circle above a small blue triangle next to a green square"] * 12)

PROMPTS = [
    "a red circle",                                                # short
    "A photo of an astronaut riding a horse on the moon!",         # capitals, punctuation
    "Portrait; soft light (85mm lens), 4k -- \"trending\"?",       # more punctuation, digits, quotes
    "café crème brûlée, naïve façade — 日本語 ☃ ＡＢＣ ﬁne",          # accents, CJK/symbols (<unk>), NFKC forms
    "  a   blue\tsquare \n above  a star  ",                       # runs of whitespace, tab, newline
]


def reference_ids(folder, prompts, max_length=120):
    """ids and mask as the diffusers PixArt pipeline gets them from transformers' T5Tokenizer."""
    tok = hf_t5_tokenizer(folder)
    out = tok(prompts, max_length=max_length, padding="max_length", truncation=True,
              add_special_tokens=True, return_tensors="pt")
    return out.input_ids, out.attention_mask


@pytest.fixture(scope="module")
def sp(t5_dir):
    return sentencepiece.SentencePieceProcessor(model_file=str(Path(t5_dir) / "spiece.model"))


# ----------------------------------------------------------------------------------------------------
# tokenize
# ----------------------------------------------------------------------------------------------------

def test_tokenize_matches_t5_tokenizer(sp, t5_dir):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids, mask = pixart_min.tokenize(sp, PROMPTS, max_length=120)
    assert not [w for w in caught if "truncated" in str(w.message)], "no prompt here is over 120 tokens"
    ref_ids, ref_mask = reference_ids(t5_dir, PROMPTS)
    assert ids.dtype == torch.long and mask.dtype == torch.long
    assert ids.shape == mask.shape == (len(PROMPTS), 120)
    assert torch.equal(ids, ref_ids)
    assert torch.equal(mask, ref_mask)
    # the layout, spelled out: pieces, then </s> (1), then padding (0); mask 1 up to and including </s>
    lengths = mask.sum(1)
    for i, n in enumerate(lengths.tolist()):
        assert ids[i, n - 1] == 1 and (ids[i, n:] == 0).all() and (mask[i, :n] == 1).all()
    assert (ids[3] == 2).any(), "the unicode prompt should contain <unk> pieces (unseen characters)"


def test_tokenize_empty_prompt_is_just_eos(sp, t5_dir):
    # "" is the pipeline's default negative prompt: its features are the null caption
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an empty prompt may deserve a warning elsewhere; not the point here
        ids, mask = pixart_min.tokenize(sp, [""])
    ref_ids, ref_mask = reference_ids(t5_dir, [""])
    assert torch.equal(ids, ref_ids) and torch.equal(mask, ref_mask)
    assert ids[0, 0] == 1 and mask.sum() == 1


def test_one_prompt_as_a_string_is_one_prompt(sp):
    ids, mask = pixart_min.tokenize(sp, PROMPTS[0])
    assert ids.shape == (1, 120) and torch.equal(ids, pixart_min.tokenize(sp, PROMPTS[:1])[0])


def test_long_prompt_is_truncated_like_t5_tokenizer_and_warns(sp, t5_dir):
    pieces = sp.encode(LONG)
    assert len(pieces) + 1 > 120, "the long prompt must really be over 120 tokens"
    with pytest.warns(UserWarning, match="truncated"):
        ids, mask = pixart_min.tokenize(sp, [PROMPTS[0], LONG], max_length=120)
    ref_ids, ref_mask = reference_ids(t5_dir, [PROMPTS[0], LONG])
    assert torch.equal(ids, ref_ids)
    assert torch.equal(mask, ref_mask)
    # the first 119 pieces, then </s>; every position is real
    assert ids[1, :119].tolist() == pieces[:119] and ids[1, 119] == 1 and mask[1].all()


def test_other_max_length_matches_t5_tokenizer(sp, t5_dir):
    prompts = PROMPTS[:2] + [LONG]
    with pytest.warns(UserWarning, match="truncated"):
        ids, mask = pixart_min.tokenize(sp, prompts, max_length=16)
    ref_ids, ref_mask = reference_ids(t5_dir, prompts, max_length=16)
    assert ids.shape == (3, 16)
    assert torch.equal(ids, ref_ids) and torch.equal(mask, ref_mask)


# ----------------------------------------------------------------------------------------------------
# T5TextEncoder
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["t5_folder", "pipeline_folder"])
def test_text_encoder_matches_transformers(layout, t5_dir, pipeline_dir):
    from transformers import T5EncoderModel

    if layout == "t5_folder":
        path, model_dir, tok_dir = t5_dir, t5_dir, t5_dir
    else:
        path = pipeline_dir
        model_dir, tok_dir = Path(pipeline_dir) / "text_encoder", Path(pipeline_dir) / "tokenizer"

    enc = pixart_min.T5TextEncoder(path, device="cpu", dtype=torch.float32, max_length=120)
    prompts = PROMPTS[:3]
    ids, mask = enc.tokenize(prompts)
    ref_ids, ref_mask = reference_ids(tok_dir, prompts)
    assert torch.equal(ids, ref_ids) and torch.equal(mask, ref_mask)

    features, mask2 = enc(prompts)
    ref_model = T5EncoderModel.from_pretrained(model_dir).eval()
    with torch.no_grad():
        ref = ref_model(input_ids=ref_ids, attention_mask=ref_mask).last_hidden_state
    assert features.shape == (3, 120, ref_model.config.d_model)
    assert features.dtype == torch.float32
    assert torch.equal(mask2.cpu(), ref_mask)
    err = report(f"T5TextEncoder, {layout}", (features - ref).abs().max().item())
    assert err <= 1e-6, f"max abs error {err}"
    assert ref.abs().max() > 0.1, "features this small would make the comparison meaningless"


def test_text_encoder_missing_folder_names_the_path(tmp_path):
    missing = tmp_path / "no_such_t5"
    with pytest.raises(FileNotFoundError, match="no_such_t5") as info:
        pixart_min.T5TextEncoder(missing)
    assert str(missing) in str(info.value)


def test_text_encoder_folder_without_spiece_model(tmp_path):
    (tmp_path / "empty_t5").mkdir()
    with pytest.raises(FileNotFoundError, match="spiece.model"):
        pixart_min.T5TextEncoder(tmp_path / "empty_t5")
