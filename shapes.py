"""The shapes world: a toy text-to-image dataset drawn on the fly, and an evaluator that reads images back.

A scene is one or two flat shapes on a black background, each with a colour from a fixed palette, a size
and a position; two objects also have a spatial relation. `sample_batch` draws a batch of images with a
dense caption ("a small blue square above a large yellow triangle"), a sparse LAION-like caption ("blue
thing, 4k"), a class label (object 0's shape) and the scene spec. `evaluate` segments generated images by
palette colour and scores count, colour, shape, size and relation against the specs: our small
T2I-CompBench. Plain numpy, no downloads, thousands of images per second on one core.
"""
import itertools
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

# ==================== The world's vocabulary ====================

SHAPES = ("circle", "square", "triangle")  # a diamond was tried: blurred at 32 px, small ones read as circles
NUM_CLASSES = len(SHAPES)  # class labels for the class-conditional stage 1: object 0's shape
COLORS = {  # every channel fully on or off: any two colours differ by a whole channel
    "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255),
    "yellow": (255, 255, 0), "magenta": (255, 0, 255), "cyan": (0, 255, 255),
}
# Colours the world can draw and read back but never puts in its scenes nor in its tokenizer's corpus: a concept
# to teach a finished model (notebook 07: a LoRA learns "white", which the toy tokenizer reads as <unk>).
NEW_COLORS = {"white": (255, 255, 255)}
BACKGROUND = (0, 0, 0)  # black: a colour blurred into black keeps its hue, so blurry edges still read right
SIZES = ("small", "large")
RELATIONS = ("left of", "right of", "above", "below")

# Side of an object's bounding box as a fraction of the image side. Two objects are drawn a little
# smaller so that they fit side by side; with as many objects, small and large differ >= 2.5x in area, and
# every small side (<= 0.30) is well below every large one (>= 0.40), so the evaluator needs one threshold.
SIDE = {1: {"small": 0.30, "large": 0.50}, 2: {"small": 0.25, "large": 0.40}}
MARGIN = 0.05  # the least free space between an object and the border, as a fraction of the side
GAP = 0.06     # the least free space between two objects along their relation's axis

# (colour, shape) pairs never drawn in training, to test composition: each colour and each shape still
# appears in training with other partners (the evaluation prompts use held_out=True).
HELD_OUT = (("red", "triangle"), ("green", "circle"), ("blue", "square"))
ALL_PAIRS = [(c, s) for c in COLORS for s in SHAPES]
TRAIN_PAIRS = [p for p in ALL_PAIRS if p not in HELD_OUT]


# ==================== Scenes ====================

@dataclass
class Obj:
    """One object: shape, colour and size names, and its centre (x, y) in [0, 1] image coordinates, y down."""
    shape: str
    color: str
    size: str
    x: float
    y: float


@dataclass
class Scene:
    """A scene spec: 1 or 2 objects and, for two, the relation of object 0 to object 1 ("left of", ...)."""
    objects: list = field(default_factory=list)
    relation: str = None


def spec_to_dict(spec):
    """A Scene as plain dicts and lists (JSON-able)."""
    return asdict(spec)


def spec_from_dict(d):
    """The inverse of spec_to_dict."""
    return Scene([Obj(**o) for o in d["objects"]], d["relation"])


def _pick(rng, options):
    """One element of a tuple or list, chosen by rng."""
    return options[rng.integers(len(options))]


def random_spec(rng, n_objects=None, held_out=False):
    """A random scene. held_out=False: no object uses a HELD_OUT pair; True: at least one object does.

    Two objects always have different colours, are separated by at least GAP along the relation's axis,
    and their centres differ less than half as much along the other axis: the relation is never ambiguous.
    """
    n = int(rng.integers(1, 3)) if n_objects is None else n_objects
    if n not in (1, 2):
        raise ValueError(f"a scene has 1 or 2 objects, not {n}")
    pairs = [_pick(rng, HELD_OUT if held_out else TRAIN_PAIRS)]
    if n == 2:
        other = _pick(rng, ALL_PAIRS if held_out else TRAIN_PAIRS)
        while other[0] == pairs[0][0]:  # two objects never share a colour
            other = _pick(rng, ALL_PAIRS if held_out else TRAIN_PAIRS)
        pairs.append(other)
        if rng.random() < 0.5:  # the held-out object may be either one
            pairs.reverse()
    sizes = [_pick(rng, SIZES) for _ in range(n)]
    sides = [SIDE[n][s] for s in sizes]
    if n == 1:
        lo, hi = MARGIN + sides[0] / 2, 1 - MARGIN - sides[0] / 2
        x, y = rng.uniform(lo, hi, size=2)
        return Scene([Obj(pairs[0][1], pairs[0][0], sizes[0], float(x), float(y))])

    relation = _pick(rng, RELATIONS)
    first, second = (0, 1) if relation in ("left of", "above") else (1, 0)  # first = the smaller coordinate
    lo = MARGIN + sides[first] / 2                 # least coordinate of the first object's centre
    hi = 1 - MARGIN - sides[second] / 2            # largest coordinate of the second's
    sep = rng.uniform((sides[0] + sides[1]) / 2 + GAP, hi - lo)   # distance between centres along the axis
    a = rng.uniform(lo, hi - sep)
    along = {first: a, second: a + sep}
    c0 = rng.uniform(MARGIN + sides[0] / 2, 1 - MARGIN - sides[0] / 2)   # across the axis: inside the
    c1 = rng.uniform(max(MARGIN + sides[1] / 2, c0 - 0.4 * sep),        # margins, and at most 0.4 of
                     min(1 - MARGIN - sides[1] / 2, c0 + 0.4 * sep))    # the distance along
    across = [c0, c1]
    horizontal = relation in ("left of", "right of")
    objs = []
    for i in range(2):
        x, y = (along[i], across[i]) if horizontal else (across[i], along[i])
        objs.append(Obj(pairs[i][1], pairs[i][0], sizes[i], float(x), float(y)))
    return Scene(objs, relation)


# ==================== Drawing ====================

def _mask(obj, side, size):
    """(size, size) bool: the pixels whose centres lie inside the object (no anti-aliasing)."""
    u = (np.arange(size) + 0.5) / size                       # pixel centres in [0, 1]
    dx, dy = u[None, :] - obj.x, u[:, None] - obj.y           # (1, size), (size, 1): broadcast to a grid
    h = side / 2
    if obj.shape == "circle":
        return dx * dx + dy * dy <= h * h
    if obj.shape == "square":
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if obj.shape == "triangle":                               # apex up; base and height both = side
        return (dy <= h) & (np.abs(dx) <= (dy + h) / 2)
    raise ValueError(f"unknown shape {obj.shape!r}; expected one of {SHAPES}")


def draw(spec, size=32):
    """The scene as a (size, size, 3) uint8 image: pure palette colours on the background."""
    img = np.empty((size, size, 3), np.uint8)
    img[:] = BACKGROUND
    for obj in spec.objects:
        img[_mask(obj, SIDE[len(spec.objects)][obj.size], size)] = {**COLORS, **NEW_COLORS}[obj.color]
    return img


# ==================== Captions and labels ====================

VAGUE_NOUNS = ("thing", "shape", "object", "stuff")
SIZE_WORDS = {"small": ("small", "tiny", "little"), "large": ("large", "big")}
GROUP_WORDS = ("two shapes", "shapes", "two things", "some objects")
FILLERS = ("high quality", "4k", "hd", "simple", "minimal", "digital art", "clipart", "image", "picture",
           "graphic", "on black")
SYLLABLES = tuple(c + v for c in "bdfgklmnprstvz" for v in "aeiou")   # 70: names like "zorbeka", mostly unique


def _phrase(obj):
    """'a large red circle'."""
    return f"a {obj.size} {obj.color} {obj.shape}"


def dense_caption(spec):
    """Every attribute of every object, and the relation: 'a small blue square above a large red circle'."""
    if len(spec.objects) == 1:
        return _phrase(spec.objects[0])
    return f"{_phrase(spec.objects[0])} {spec.relation} {_phrase(spec.objects[1])}"


def _brand(rng):
    """An invented brand-like name of 2 or 3 syllables: with 350,000 of them, most are seen once or never."""
    return "".join(_pick(rng, SYLLABLES) for _ in range(rng.integers(2, 4)))


def _typo(rng, word):
    """The word with one letter dropped or two neighbouring letters swapped ('cirle', 'sqaure')."""
    i = int(rng.integers(len(word) - 1))
    return word[:i] + word[i + 1:] if rng.random() < 0.5 else word[:i] + word[i + 1] + word[i] + word[i + 2:]


def sparse_caption(spec, rng, tail=True):
    """A LAION-like caption: partial, vague, noisy ('red thing', 'circle', 'two shapes, 4k'); no relation.
    tail: LAION's long tail of rare words too, typos of the shape names and invented brand names ('a sqaure,
    zorbeka'). The toy tokenizer has never seen them (tail=False builds its corpus): they read as <unk>."""
    objs = spec.objects
    r = rng.random()
    if r < 0.1:                                       # noise: says nothing about the scene
        text = _pick(rng, FILLERS)
    elif len(objs) == 2 and r < 0.4:                  # the pair, without its relation
        kind = rng.integers(3)
        if kind == 0:
            text = _pick(rng, GROUP_WORDS)
        elif kind == 1:
            text = f"{objs[0].color} and {objs[1].color}"
        else:
            text = f"a {objs[0].shape} and a {objs[1].shape}"
    else:                                             # one object (either one), partly described
        obj = objs[rng.integers(len(objs))]
        words = [_pick(rng, SIZE_WORDS[obj.size])] if rng.random() < 0.2 else []
        if rng.random() < 0.6:
            words.append(obj.color)
        noun = obj.shape if rng.random() < 0.6 else _pick(rng, VAGUE_NOUNS)
        words.append(_typo(rng, noun) if tail and noun in SHAPES and rng.random() < 0.15 else noun)
        if rng.random() < 0.4:
            words.insert(0, "a")
        text = " ".join(words)
    if rng.random() < 0.3:
        text += ", " + (_brand(rng) if tail and rng.random() < 0.5 else _pick(rng, FILLERS))
    return text


def class_label(spec):
    """Object 0's shape as an index into SHAPES."""
    return SHAPES.index(spec.objects[0].shape)


def vocab_sentences(n=400, seed=0):
    """A caption corpus for training the toy tokenizer: every word that a caption can use, at about the
    frequency it appears in training (random dense and sparse captions), plus one line of rare words."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        spec = random_spec(rng)
        out += [dense_caption(spec), sparse_caption(spec, rng, tail=False)]
    words = (*SHAPES, *COLORS, *SIZE_WORDS["small"], *SIZE_WORDS["large"], *RELATIONS, *VAGUE_NOUNS,
             *GROUP_WORDS, *FILLERS, "a", "and")
    return out + [", ".join(words)]


VOCAB_SENTENCES = vocab_sentences()


# ==================== Batches ====================

def sample_batch(n, rng, size=32, n_objects=None, held_out=False, two_share=None, concept=None, concept_share=0.5):
    """n random scenes: (images (n, 3, size, size) float in [-1, 1], dense captions, sparse captions,
    class labels (n,) long, specs). rng is a numpy Generator; the same seed gives the same batch.
    n_objects: 1 or 2 for every scene, or None for either alike; two_share instead: the chance of two.
    concept: a NEW_COLORS name that object 0 takes in a concept_share of the scenes (a new concept to teach)."""
    if two_share is not None and n_objects is not None:
        raise ValueError("give n_objects or two_share, not both")
    counts = [n_objects] * n if two_share is None else [1 + int(rng.random() < two_share) for _ in range(n)]
    specs = [random_spec(rng, k, held_out) for k in counts]
    for spec in specs if concept else []:
        if rng.random() < concept_share:
            spec.objects[0].color = concept
    images = np.stack([draw(s, size) for s in specs])                        # (n, size, size, 3) uint8
    images = torch.from_numpy(images).permute(0, 3, 1, 2).float().contiguous() / 127.5 - 1  # (n, 3, H, W)
    dense = [dense_caption(s) for s in specs]
    sparse = [sparse_caption(s, rng) for s in specs]
    labels = torch.tensor([class_label(s) for s in specs], dtype=torch.long)
    return images, dense, sparse, labels, specs


# ==================== The evaluator: read an image back into objects ====================

PALETTE = np.array(list({**COLORS, **NEW_COLORS}.values()), np.float32) / 255  # (K, 3) in [0, 1]
MIN_BRIGHT = 0.5     # a pixel is background unless its brightest channel is over half way to full colour
MAX_HUE_DIST = 0.5   # ...and unreadable if its hue is this far from every palette hue (they are >= 1 apart)
MIN_AREA = 0.01      # connected regions smaller than 1% of the image are specks, not objects
MAX_AREA = 0.5       # ...and those over half of it a wash (a grey or white frame): the largest object covers 1/4
# What each shape measures, drawn at 32 px: (fill: area / bounding box, reach: extent along the diagonals /
# box side, bottom: (bottom-half area - top-half area) / area). Ideal shapes give circle (0.79, 1, 0),
# square (1, 1.41, 0), triangle (0.5, 1.06, 0.5); small blurred triangles lose their tip, so theirs sit
# between sharp and blurred ones. Each object gets the shape whose measures are nearest.
SHAPE_MEASURES = {"circle": (0.8, 1.05, 0.0), "square": (1.0, 1.41, 0.0), "triangle": (0.65, 1.09, 0.3)}
IDEAL_FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}
SIZE_SPLIT = 0.35    # side of the shape with the object's area: small (<= 0.30 drawn), large (>= 0.40)


def _to_numpy(images):
    """(N, 3, H, W) float in [0, 1], from a (N, 3, H, W) tensor in [-1, 1] or uint8 (H, W, 3) arrays."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise TypeError(f"images: a (N, 3, H, W) float tensor in [-1, 1]; got {images.dtype} {tuple(images.shape)}")
        if images.numel() and images.abs().max() > 10:               # noise beyond [-1, 1] is fine; 0..255 is not
            raise ValueError(f"images: values in [-1, 1] expected, got up to {images.abs().max().item():.3g}")
        if images.numel() and images.min() >= 0:         # the background is -1: a blank grey picture, or [0, 1]?
            warnings.warn("images: no value below 0; if they are in [0, 1], scale them to [-1, 1] (x * 2 - 1)")
        return ((images.detach().cpu().float().numpy() + 1) / 2).clip(0, 1)
    arr = np.stack([np.asarray(im) for im in images])
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise TypeError("images: a (N, 3, H, W) tensor in [-1, 1], or uint8 (H, W, 3) arrays; got "
                        f"{arr.dtype} {arr.shape}")
    return arr.transpose(0, 3, 1, 2).astype(np.float32) / 255


def segment(images):
    """(N, H, W) int: each pixel's palette index (COLORS, then NEW_COLORS), or -1 for background or unreadable."""
    x = _to_numpy(images)                                          # (N, 3, H, W)
    bright = x.max(1)                                              # (N, H, W)
    hue = x / np.maximum(bright, 1e-6)[:, None]                    # brightness divided out: max channel 1
    dist2 = np.stack([sum((hue[:, i] - c[i]) ** 2 for i in range(3)) for c in PALETTE])  # (K, N, H, W)
    color = dist2.argmin(0)
    color[(bright < MIN_BRIGHT) | (dist2.min(0) > MAX_HUE_DIST ** 2)] = -1
    return color


def components(color):
    """(N, H, W) int: a label per pixel, the same within each 4-connected region of one colour.

    Each pixel starts with its own flat index as label and repeatedly takes the smallest label among its
    same-coloured neighbours, until nothing changes: a region ends up labelled by its first pixel.
    """
    n, h, w = color.shape
    label = np.arange(n * h * w, dtype=np.int32).reshape(n, h, w)
    fg = color >= 0
    same_v = fg[:, 1:] & (color[:, 1:] == color[:, :-1])           # (N, H-1, W): joins the pixel above
    same_h = fg[:, :, 1:] & (color[:, :, 1:] == color[:, :, :-1])  # (N, H, W-1): joins the pixel on the left
    while True:
        old = label.copy()
        label[:, 1:] = np.where(same_v, np.minimum(label[:, 1:], label[:, :-1]), label[:, 1:])   # from above
        label[:, :-1] = np.where(same_v, np.minimum(label[:, :-1], label[:, 1:]), label[:, :-1])  # from below
        label[:, :, 1:] = np.where(same_h, np.minimum(label[:, :, 1:], label[:, :, :-1]), label[:, :, 1:])
        label[:, :, :-1] = np.where(same_h, np.minimum(label[:, :, :-1], label[:, :, 1:]), label[:, :, :-1])
        label = label.reshape(-1)[label]  # shortcut: take the label of the pixel my label names (same region)
        if np.array_equal(label, old):
            return label


def detect(images):
    """The objects found in each image: a list (per image) of Obj, largest first, specks dropped."""
    color = segment(images)                                        # (N, H, W)
    n, h, w = color.shape
    img, ys, xs = np.nonzero(color >= 0)                           # every foreground pixel
    ids, inv = np.unique(components(color)[img, ys, xs], return_inverse=True)  # one id per region
    area = np.bincount(inv)

    def span(v):
        """Per region: the least and the largest value of v over its pixels."""
        lo, hi = np.full(len(ids), 10 ** 6), np.full(len(ids), -10 ** 6)
        np.minimum.at(lo, inv, v)
        np.maximum.at(hi, inv, v)
        return lo, hi

    cy, cx = np.bincount(inv, ys) / area, np.bincount(inv, xs) / area  # centroids, in pixels
    (top, bot), (left, right) = span(ys), span(xs)                 # bounding boxes
    box_h, box_w = bot - top + 1, right - left + 1
    fill = area / (box_h * box_w)
    diag1, diag2 = span(xs + ys), span(xs - ys)                    # a pixel spans 2 along x + y
    reach = (diag1[1] - diag1[0] + diag2[1] - diag2[0] + 4) / 2 / np.sqrt(2) / ((box_h + box_w) / 2)
    mid = ((top + bot) / 2)[inv]                                   # each pixel's region's middle row
    bottom = (np.bincount(inv, ys > mid) - np.bincount(inv, ys < mid)) / area
    names, refs = [*COLORS, *NEW_COLORS], np.array(list(SHAPE_MEASURES.values()))
    found = [[] for _ in range(n)]
    for i in np.argsort(-area, kind="stable"):
        if area[i] < MIN_AREA * h * w:
            break
        if area[i] > MAX_AREA * h * w:
            continue
        shape = list(SHAPE_MEASURES)[np.linalg.norm(refs - (fill[i], reach[i], bottom[i]), axis=1).argmin()]
        side = np.sqrt(area[i] / IDEAL_FILL[shape] / (h * w))      # side of the ideal shape of this area
        found[ids[i] // (h * w)].append(Obj(                       # ids are flat pixel indices: image first
            shape, names[color.flat[ids[i]]], "large" if side > SIZE_SPLIT else "small",
            float((cx[i] + 0.5) / w), float((cy[i] + 0.5) / h)))
    return found


def relation_of(a, b):
    """The relation of object a to object b, along the dominant axis of their centres' difference."""
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) > abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def _score(spec, found):
    """A record of what is right in one image: count, per-object colour/shape/size, relation, all."""
    want = spec.objects

    def points(match):
        """How well found objects (None: missing) match the spec's: colour first, then shape, then size;
        the relation only breaks ties."""
        p = sum(4 * (f.color == o.color) + 2 * (f.shape == o.shape) + (f.size == o.size)
                for o, f in zip(want, match) if f is not None)
        if len(want) == 2 and None not in match:
            p += 0.5 * (relation_of(*match) == spec.relation)
        return p
    candidates = found[:6] + [None] * len(want)                   # the 6 largest are plenty
    match = max(itertools.permutations(candidates, len(want)), key=points)
    rec = {"n_objects": len(want), "count": len(found) == len(want)}
    for attr in ("color", "shape", "size"):
        rec[attr] = [f is not None and getattr(f, attr) == getattr(o, attr) for o, f in zip(want, match)]
    rec["shapes"] = [(o.shape, o.size, None if f is None else f.shape) for o, f in zip(want, match)]
    rec["relation"] = None
    if len(want) == 2:
        rec["relation"] = None not in match and relation_of(*match) == spec.relation
    rec["all"] = (rec["count"] and all(rec["color"] + rec["shape"] + rec["size"])
                  and rec["relation"] is not False)
    return rec


def evaluate_each(images, specs):
    """One record per image: {"n_objects", "count", "color": [bool per object], "shape", "size",
    "shapes": [(shape asked, size asked, shape read or None) per object], "relation" (bool, None for one
    object), "all"}.
    Filter them and pass them to summarize()."""
    assert len(images) == len(specs), f"{len(images)} images but {len(specs)} specs"
    return [_score(spec, found) for spec, found in zip(specs, detect(images))]


def summarize(records):
    """Accuracies in [0, 1]: count, color/shape/size (over objects), relation (two-object scenes; NaN
    if none), all (every attribute of the scene right), and shape per shape asked ("circle": the share of
    circles asked for that were read back as circles; NaN if none): a model that draws every object as the
    same blob scores about 1, 0, 0 there, while its overall shape score sits at chance. "small_shape" and
    "large_shape": the share of small (large) objects asked for whose shape was read back right."""
    out = {k: float(np.mean([r[k] for r in records])) for k in ("count", "all")}
    for k in ("color", "shape", "size"):
        out[k] = float(np.mean([ok for r in records for ok in r[k]]))
    rel = [r["relation"] for r in records if r["relation"] is not None]
    out["relation"] = float(np.mean(rel)) if rel else float("nan")

    def shape_right(keep):          # of the objects asked for that keep(shape, size) picks: the share read right
        right = [read == asked for r in records for asked, size, read in r["shapes"] if keep(asked, size)]
        return float(np.mean(right)) if right else float("nan")
    for s in SHAPES:
        out[s] = shape_right(lambda asked, size: asked == s)
    for z in SIZES:
        out[f"{z}_shape"] = shape_right(lambda asked, size: size == z)
    return out


def evaluate(images, specs):
    """Per-attribute accuracies of images ((N, 3, H, W) in [-1, 1], or uint8 HxWx3) against their specs."""
    return summarize(evaluate_each(images, specs))
