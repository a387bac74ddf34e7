#!/usr/bin/env bash
# The main job: every stage of a config, in order, with the wall time of each.
#   bash scripts/quickstart.sh [configs/mnist.yaml] [--set key=value ...]
# Re-running it resumes: finished stages only re-export their results.
set -euo pipefail
config=${1:-configs/mnist.yaml}
shift || true
overrides=("$@")  # e.g. --set ldm.max_steps=100, passed to every command
run_dir=$(python - "$config" "$@" <<'PY'
import sys
from common.config_yaml import load_config
args = sys.argv[2:]
print(load_config(sys.argv[1], [args[i + 1] for i, a in enumerate(args) if a == "--set"]).run_dir)
PY
)
declare -a timings
stage() {
  local name=$1; shift
  local start=$SECONDS
  echo "=== $name"
  "$@"
  timings+=("$(printf '%-16s %4d s' "$name" $((SECONDS - start)))")
}
total_start=$SECONDS
stage train-clip     train-clip     --config "$config" "${overrides[@]}"
stage train-vae      train-vae      --config "$config" "${overrides[@]}"
stage encode-dataset encode-dataset --config "$config" "${overrides[@]}"
stage train-ldm      train-ldm      --config "$config" "${overrides[@]}"
stage evaluate       evaluate       --config "$config" "${overrides[@]}"   # tunes the run's sampling defaults first
stage generate       generate       --config "$config" "${overrides[@]}" --num 8 --out "$run_dir/samples/quickstart" --all-classes
echo
echo "=== wall time per stage"
printf '%s\n' "${timings[@]}"
printf '%-16s %4d s\n' "total" $((SECONDS - total_start))
echo
echo "Grid:    $run_dir/samples/quickstart/grid.png"
echo "Metrics: $run_dir/eval.json"
echo "Use it:  python -c \"from pipelines import LatentPipeline; LatentPipeline.from_pretrained('$run_dir')('Draw a six').images[0].save('six.png')\""
