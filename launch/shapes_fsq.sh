#!/usr/bin/env bash
# The unified model on learned FSQ tokens of `shapes`, in one command:
#   bash launch/shapes_fsq.sh [RUNS_DIR] [--config.x=y ...]      (extra flags go to the main job)
# 1. trains the FSQ image tokenizer (configs/tokenizer_shapes.py), 2. pre-tokenizes the shapes splits with it,
# 3. trains and scores the unified model (configs/shapes.py) on those tokens; report: RUNS_DIR/shapes_fsq/report.json
# (text->image and image->text accuracy, as for the patch tokenizer). Each stage resumes, or skips if it finished,
# when the command runs again.
set -euo pipefail
RUNS="${1:-runs}"
shift || true
python -m unimm_jax.tokenizer_main --config=configs/tokenizer_shapes.py --workdir="$RUNS/tok_shapes"
python -m unimm_jax.pretokenize --config=configs/tokenizer_shapes.py --config.image.tokenizer_path="$RUNS/tok_shapes" \
    --out="$RUNS/shapes_fsq_tokens"
python -m unimm_jax.main --config=configs/shapes.py --workdir="$RUNS/shapes_fsq" --config.image.tokenizer=fsq \
    --config.data.source=pretokenized --config.data.path="$RUNS/shapes_fsq_tokens" "$@"
