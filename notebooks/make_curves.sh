#!/usr/bin/env bash
# The runs behind the curves in notebooks 03 and 04, stored as small JSON-lines files in notebooks/data/. Each is
# train.py's default recipe (stage 2 of the toy, dense captions) with one change:
#   staged     the default: from checkpoints/toy_dit, re-parameterised at t=500
#   noreparam  from checkpoints/toy_dit without the re-parameterisation (--no-reparam)
#   scratch    from random weights (--from-scratch)
#   sparse     from checkpoints/toy_dit, on sparse, LAION-like captions (--captions sparse)
# Every EVERY steps each run is scored on 64 prompts a group twice: by train.py itself (--eval-seed 1234,
# NAME.jsonl) and by train.py --score on other prompts and noise (seed 4242, NAME_4242.jsonl). The run is trained
# in EVERY-step pieces with --resume between them, which continues it exactly, so the second score sees the same
# weights as the first. About 17 minutes a run on this project's 2-core CPU, over an hour for the four.
# train.py does not start a run in a folder that already holds one: remove runs/curves to measure again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
STEPS=${STEPS:-$($PY -c "import train; print(train.parse_args([]).steps)")}
EVERY=${EVERY:-$((STEPS / 4))}
RUNS=${RUNS:-"staged noreparam scratch sparse"}
declare -A FLAGS=([staged]="" [noreparam]="--no-reparam" [scratch]="--from-scratch" [sparse]="--captions sparse")
for run in $RUNS; do
    out=runs/curves/$run
    for ((step = EVERY; step <= STEPS; step += EVERY)); do
        if [ "$step" = "$EVERY" ]; then
            $PY train.py --steps "$step" --eval-every "$EVERY" --eval-n 64 ${FLAGS[$run]} --out "$out"
        else
            $PY train.py --resume "$out/last.pt" --steps "$step"
        fi
        $PY train.py --score "$out/pixart.safetensors" --eval-n 64 --eval-seed 4242 --out "$out/seed4242_$step"
    done
    cp "$out/metrics.jsonl" "notebooks/data/$run.jsonl"
    $PY - "$out" "notebooks/data/${run}_4242.jsonl" <<'PY'
import json, sys
from pathlib import Path
rows = []
for folder in sorted(Path(sys.argv[1]).glob("seed4242_*"), key=lambda p: int(p.name.split("_")[1])):
    score = json.loads((folder / "score.json").read_text())
    rows.append({"step": int(folder.name.split("_")[1]),
                 **{f"{g}_{k}": v for g, s in score.items() if isinstance(s, dict) for k, v in s.items()}})
Path(sys.argv[2]).write_text("".join(json.dumps(r) + "\n" for r in rows))
PY
done
echo "curves written to notebooks/data/"
