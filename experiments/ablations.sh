#!/usr/bin/env bash
# Ablation sweeps on the embedded default (see README.md). Usage: experiments/ablations.sh NAME [extra overrides]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-.venv/bin/python}
name=${1:?usage: experiments/ablations.sh consensus|ratio|threshold|gradient|projection [overrides]}
shift
case "$name" in
  consensus)  sweep=(consensus=vote,mean,max,rank,norm,merge) ;;
  ratio)      sweep=(selection.ratio=0.05,0.1,0.2,0.4) ;;
  threshold)  sweep=(consensus=vote consensus.threshold_percentile=50,70,80,90) ;;
  gradient)   sweep=(gradient=adam,sgd) ;;
  projection) sweep=(projection=rademacher,kronecker projection.dim=1024,4096) ;;  # the default run is the exact (none) baseline
  *) echo "unknown ablation: $name" >&2; exit 2 ;;
esac
exec "$PY" -m icons.run -m experiment_name="ablation_$name" "${sweep[@]}" "$@"
