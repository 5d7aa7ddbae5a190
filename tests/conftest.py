"""Shared test helpers: tiny, seeded stand-ins for every hub download.

Nothing here touches the network. Each reference model (diffusers' PixArt transformer, VAE and
scheduler; transformers' T5 encoder and tokenizer) is built small, with random but seeded weights,
and saved in the same folder layout as the hub repositories, so that our loaders read exactly what
they would read from a real download.

Helpers that test files may import (`from conftest import ...`) or reach through the fixtures below:

    train_spm(folder, sentences=SENTENCES, vocab_size=96) -> Path of folder/spiece.model
    tiny_t5(vocab_size, seed=0)                         -> transformers.T5EncoderModel (d_model 32)
    write_t5_dir(folder)                                -> folder with spiece.model + T5 weights
    hf_t5_tokenizer(folder)                             -> transformers.T5Tokenizer (needs protobuf)
    randomize_(module, seed)                            -> module, every weight random and non-zero
    diffusers_pixart(seed=0, **cfg)                     -> diffusers.PixArtTransformer2DModel
    diffusers_vae(seed=0, **cfg)                        -> diffusers.AutoencoderKL (tiny)
    pixart_scheduler()                                  -> DPMSolverMultistepScheduler, hub settings
    make_pipeline_dir(folder, transformer_cfg=None, micro=False) -> folder, a whole diffusers pipeline

Fixtures (session scope, built once): t5_dir, pipeline_dir, pipeline_dir_micro.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: import pixart_min, vae, ...

import io
import json
import warnings

import pytest
import torch
from torch import nn

# ----------------------------------------------------------------------------------------------------
# Text: a sentencepiece model and a T5 encoder, both tiny
# ----------------------------------------------------------------------------------------------------

# A few dozen sentences: the shapes world's words, some plain English, digits and punctuation, so that
# a trained vocabulary has whole words, sub-word pieces and single characters to choose from.
SENTENCES = [
    "a large red circle above a small blue triangle",
    "a small green square to the left of a big yellow star",
    "a purple hexagon below an orange circle",
    "a tiny pink triangle to the right of a huge cyan square",
    "two shapes: a red square and a blue circle",
    "one white star on a black background",
    "a medium gray pentagon in the top left corner",
    "a brown diamond in the bottom right corner",
    "red thing",
    "shapes",
    "some blue stuff, maybe a circle?",
    "a picture of colourful shapes",
    "the quick brown fox jumps over the lazy dog.",
    "A photo of an astronaut riding a horse on the moon!",
    "an oil painting of a lighthouse at sunset, highly detailed",
    "a cute corgi wearing sunglasses (digital art)",
    "Portrait of a woman with red hair; soft light, 85mm lens.",
    "a bowl of fruit: apples, pears and 3 bananas",
    "New York City skyline at night, 4k, trending on artstation",
    "a cat sitting on a wooden table next to a cup of coffee",
    "watercolor sketch of mountains and a river in spring",
    "an old man reading a book by the fireplace",
    "a robot playing chess against a child in a park",
    "the number 42 written in chalk on a blackboard",
    "a red car parked in front of a blue house",
    "close-up of a butterfly on a yellow flower",
    "a snowy forest at dawn, with fog between the trees",
    "a bright kitchen with white walls and green plants",
    "\"Hello world\" written on a sign",
    "a dog and a cat, both asleep on a sofa",
    "three small circles in a row: red, green and blue",
    "a large square inside a larger circle",
]

SPM_VOCAB_SIZE = 96


def train_spm(folder, sentences=SENTENCES, vocab_size=SPM_VOCAB_SIZE):
    """Train a small unigram sentencepiece model with T5's conventions and write folder/spiece.model.

    T5's ids: <pad> 0, </s> 1, <unk> 2, no <s>. Training runs on one thread from an in-memory iterator,
    so the same sentences give the same bytes every time. Returns the path of the model file.
    """
    import sentencepiece as spm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(sentences)),
        model_writer=buf,
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # a few dozen sentences may not fill vocab_size: take what there is
        character_coverage=1.0,  # keep every character seen; unseen ones (e.g. CJK) become <unk>
        normalization_rule_name="nmt_nfkc",  # T5's
        pad_id=0, pad_piece="<pad>",
        eos_id=1, eos_piece="</s>",
        unk_id=2, unk_piece="<unk>",
        bos_id=-1,
        num_threads=1,
        minloglevel=2,  # quiet
    )
    path = folder / "spiece.model"
    path.write_bytes(buf.getvalue())
    return path


def spm_vocab_size(model_file):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(model_file)).get_piece_size()


def tiny_t5(vocab_size, seed=0):
    """A 2-layer T5 v1.1-style encoder (gated-GELU, like t5-v1_1-xxl) with d_model 32, seeded."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval()


def write_t5_dir(folder):
    """A hub-like T5 folder: spiece.model next to config.json and model.safetensors."""
    folder = Path(folder)
    model_file = train_spm(folder)
    tiny_t5(spm_vocab_size(model_file)).save_pretrained(folder)
    return folder


def write_hub_tokenizer_configs(folder):
    """The small json files that sit next to spiece.model in the hub's tokenizer/ folder.

    Written by hand (not by transformers' save_pretrained, which would add a tokenizer.json) so that the
    folder has the hub's layout: transformers then builds its fast tokenizer from spiece.model, as it does
    for the real PixArt repository.
    """
    folder = Path(folder)
    special = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    config = {"tokenizer_class": "T5Tokenizer", "extra_ids": 100, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def hf_t5_tokenizer(folder):
    """transformers' T5Tokenizer read from a folder holding spiece.model (the oracle for our tokenizer).

    transformers 5 converts spiece.model into its fast tokenizer with protobuf. Without protobuf,
    `from_pretrained` fails with a misleading tiktoken error, and `T5Tokenizer(vocab_file=...)` silently
    builds a near-empty vocabulary, so we insist on protobuf here with a clear message.
    """
    try:
        import google.protobuf  # noqa: F401
    except ImportError:
        pytest.fail("transformers' T5Tokenizer needs protobuf to read spiece.model: pip install protobuf")
    from transformers import T5Tokenizer

    return T5Tokenizer.from_pretrained(str(folder))


# ----------------------------------------------------------------------------------------------------
# Weights: random and non-zero
# ----------------------------------------------------------------------------------------------------

def _is_norm(module):
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)) or "Norm" in type(
        module
    ).__name__


@torch.no_grad()
def randomize_(module, seed):
    """Overwrite every parameter and persistent floating buffer of `module` with seeded random values.

    Reference implementations zero-initialise some weights (diffusers' PixArt: the output projections;
    the official code: cross-attention proj and final linear), and a parity test through a zero weight
    proves nothing. So:
      - weights with 2+ dims: normal with std 1/sqrt(fan_in), so activations stay O(1) and attention
        logits are big enough that a wrong scale or mask changes the answer;
      - weights of norm layers: 1 + normal(0, 0.1); every other 1-D tensor (biases, ...): normal(0, 0.1).
    Non-persistent buffers (diffusers' sin-cos position embedding) are functions, not weights: they are
    not saved with the model, so they are left as they are. Returns the module.
    """
    g = torch.Generator().manual_seed(seed)
    modules = dict(module.named_modules())
    persistent = set(module.state_dict().keys())

    def fill(name, t):
        owner = modules.get(name.rpartition(".")[0], module)
        noise = torch.randn(t.shape, generator=g, dtype=torch.float32)
        if t.dim() >= 2:
            value = noise / (t[0].numel() ** 0.5)
        elif _is_norm(owner) and name.endswith("weight"):
            value = 1 + 0.1 * noise
        else:
            value = 0.1 * noise
        t.copy_(value.to(t.dtype))

    for name, p in module.named_parameters():
        fill(name, p)
    for name, b in module.named_buffers():
        if name in persistent and b.is_floating_point():
            fill(name, b)
    return module


# ----------------------------------------------------------------------------------------------------
# diffusers reference models
# ----------------------------------------------------------------------------------------------------

def diffusers_pixart(seed=0, **cfg):
    """diffusers' PixArtTransformer2DModel, tiny by default, every weight random (see randomize_).

    Defaults: 8x8 latents, patch 2, 4 -> 8 channels (learned sigma), 2 layers, 2 heads of 16 (hidden
    32), captions of 32 channels (the tiny T5's d_model). Any keyword overrides a constructor argument.
    With use_additional_conditions=True (the 1024-MS micro-conditions) the hidden size must divide by 3
    (diffusers gives size and aspect ratio hidden//3 channels each), so the default head dim becomes 24
    (hidden 48). cross_attention_dim follows the hidden size unless given: the caption projection maps
    T5 features to the hidden size before cross-attention.
    """
    from diffusers import PixArtTransformer2DModel

    cfg = dict(cfg)
    micro = bool(cfg.get("use_additional_conditions", False))
    config = dict(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=24 if micro else 16,
        caption_channels=32,
        norm_type="ada_norm_single",
        num_embeds_ada_norm=1000,
        use_additional_conditions=False,
        interpolation_scale=None,  # None: diffusers uses max(sample_size // 64, 1)
    )
    config.update(cfg)
    config.setdefault("cross_attention_dim", config["num_attention_heads"] * config["attention_head_dim"])
    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(**config)
    return randomize_(model, seed).eval()


def diffusers_vae(seed=0, **cfg):
    """diffusers' AutoencoderKL, tiny: two blocks of 32 channels, 8 groups, 4 latent channels, random.

    NOTE: with two blocks the encoder downsamples once, so latents are 1/2 of the image side, not the
    SD VAE's 1/8 (a factor of 2 per block after the first). What the tests need is the SD VAE's
    structure and key names with 4 latent channels; the factor follows len(block_out_channels).
    """
    from diffusers import AutoencoderKL

    config = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
        scaling_factor=0.18215,
    )
    config.update(cfg)
    torch.manual_seed(seed)
    return randomize_(AutoencoderKL(**config), seed).eval()


def pixart_scheduler(prediction_type="epsilon"):
    """DPMSolverMultistepScheduler with the settings of the PixArt hub repo (checkpoints.md §2)."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=0.0001,
        beta_end=0.02,
        prediction_type=prediction_type,
        algorithm_type="dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        lower_order_final=True,
        timestep_spacing="linspace",
        use_karras_sigmas=False,
    )


def make_pipeline_dir(folder, transformer_cfg=None, micro=False, sigma=False):
    """Write a complete tiny diffusers-format PixArt-alpha pipeline into folder; return the folder.

    Same layout as the hub repo: transformer/, vae/, text_encoder/, tokenizer/ (spiece.model and its
    json configs), scheduler/, model_index.json. micro=True switches on the 1024-MS micro-conditions
    (use_additional_conditions). transformer_cfg overrides diffusers_pixart's defaults. The transformer's
    class is written under its current diffusers name, PixArtTransformer2DModel (the hub repo, saved
    by an older diffusers, says Transformer2DModel). sigma=True writes a PixArt-Sigma pipeline instead: its
    model_index names PixArtSigmaPipeline, and its VAE has the SDXL VAE's scaling factor.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = dict(transformer_cfg or {})
    if micro:
        cfg.setdefault("use_additional_conditions", True)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # save_pretrained chatter about versions and tied weights
        diffusers_pixart(**cfg).save_pretrained(folder / "transformer")
        vae_cfg = dict(scaling_factor=0.13025, force_upcast=False) if sigma else {}
        diffusers_vae(**vae_cfg).save_pretrained(folder / "vae")
        pixart_scheduler().save_pretrained(folder / "scheduler")
        model_file = train_spm(folder / "tokenizer")
        write_hub_tokenizer_configs(folder / "tokenizer")
        tiny_t5(spm_vocab_size(model_file)).save_pretrained(folder / "text_encoder")

    import diffusers

    index = {
        "_class_name": "PixArtSigmaPipeline" if sigma else "PixArtAlphaPipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
        "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "T5Tokenizer"],
        "transformer": ["diffusers", "PixArtTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder


# ----------------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def t5_dir(tmp_path_factory):
    """A hub-like T5 folder: spiece.model, config.json, model.safetensors (tiny T5EncoderModel)."""
    return write_t5_dir(tmp_path_factory.mktemp("t5"))


@pytest.fixture(scope="session")
def pipeline_dir(tmp_path_factory):
    """The default tiny diffusers-format PixArt pipeline folder (256/512-style, no micro-conditions)."""
    return make_pipeline_dir(tmp_path_factory.mktemp("pipeline"))


@pytest.fixture(scope="session")
def pipeline_dir_micro(tmp_path_factory):
    """A tiny 1024-MS-style pipeline folder: the transformer has the size/aspect-ratio micro-conditions."""
    return make_pipeline_dir(tmp_path_factory.mktemp("pipeline_micro"), micro=True)


@pytest.fixture(scope="session")
def tiny_shapes_pixart(tmp_path_factory):
    """A tiny text-to-image PixArt of the shapes world, trained by train.py for 2 steps: a model that loads as the
    toy's (to distil, adapt or score) in a fraction of a second. Returns its pixart.safetensors."""
    import train
    out = tmp_path_factory.mktemp("tiny_shapes_pixart")
    train.main(["--out", str(out), "--preset", "tiny", "--steps", "2", "--save-every", "2", "--batch-size", "8",
                "--eval-every", "0", "--warmup", "2", "--lr", "1e-2"])   # 1e-2: cross-attention leaves zero
    return out / "pixart.safetensors"


def losses(folder):
    """A train.py run's losses, step by step, from its loss.csv."""
    return [float(line.split(",")[1]) for line in (folder / "loss.csv").read_text().splitlines()]


# ---- the parity table: tests call report(); pytest prints what they measured at the end of the run ----
PARITY = []


def report(label, err):
    """Record one measured max |error| for the summary that README's parity table is copied from."""
    PARITY.append((label, err))
    return err


def pytest_terminal_summary(terminalreporter):
    if PARITY:
        terminalreporter.section("parity: max |ours - reference| (fp32)")
        for label, err in PARITY:
            terminalreporter.write_line(f"{err:9.1e}  {label}")
