"""Which of a 4-step LCM student's jumps goes wrong? Score the student with some of its jumps made by the teacher.

    .venv/bin/python docs/lcm/jumps.py STUDENT SSTS --out runs/lcm/jumps_SSTS

The LCM sampler jumps to a clean picture from steps 999, 759, 499 and 259, noising each jump's picture to the next
step. Each letter of the pattern says who makes that jump: S the student (its consistency function, as
sample(..., sampler="lcm") computes it), T the teacher (the bundled model, DPM-Solver with guidance 4.5 from that
step, 20 steps for the whole path). The scores are train.py --score's, on its seeded prompts (docs/lcm.md).
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import lcm  # noqa: E402
import pixart_min as pm  # noqa: E402
import train  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("student", help="a --distill-lcm run's last.pt, or a PixArt folder")
p.add_argument("pattern", help="four letters, S (student) or T (teacher), for the jumps from 999, 759, 499, 259")
p.add_argument("--teacher", default="checkpoints/toy")
p.add_argument("--eval-n", type=int, default=200)
p.add_argument("--out", required=True)
args = p.parse_args()
if len(args.pattern) != 4 or set(args.pattern) - set("ST"):
    p.error(f"the pattern is four letters S or T, got {args.pattern!r}")
if not Path(args.student).exists():
    p.error(f"no such student: {args.student}")

teacher = train.load_model(args.teacher, "state_dict_ema").eval()
lcm_sample = pm.sample


def mixed(model, noise, y, mask, *, generator=None, **unused):
    """sample(..., sampler="lcm", steps=4) with the teacher's jumps where the pattern says T."""
    steps = pm.timesteps(4, lcm=True).tolist()                          # 999, 759, 499, 259
    x = noise.float()
    for i, (t, who) in enumerate(zip(steps, args.pattern)):
        if who == "S":
            x0 = lcm.consistency(model, x, torch.full((len(x),), t), y, mask, None, None, model.config.prediction)
        else:
            x0 = lcm_sample(teacher, x, y, mask, steps=round(20 * t / 999), cfg_scale=4.5, start=t)
        if i + 1 < len(steps):                                          # fresh noise, as the lcm sampler draws it
            x = pm.q_sample(x0, torch.full((len(x),), steps[i + 1]), torch.randn(x.shape, generator=generator))
    return x0


pm.sample = mixed                                                        # train.evaluate calls pm.sample
train.main(["--score", args.student, "--eval-sampler", "lcm", "--eval-n", str(args.eval_n), "--out", args.out])
