#!/usr/bin/env bash
# On a machine with a CUDA GPU: prune qwen2.5-coder-0.5b with Wanda and SparseGPT at 50% on
# --device cuda and on --device cpu, and print wall time and WikiText-2 perplexity side by side.
# Usage: bench/device_check.sh [PYTHON]   (SPARSEALLOC_DATA must point at WikiText-2)
set -euo pipefail
PY=${1:-python}
OUT=${OUT:-$(mktemp -d)}
MODEL=qwen2.5-coder-0.5b
COMMON=(--model "$MODEL" --sparsity 0.5 --nsamples 32 --seqlen 512 --eval-tokens 65536 --quiet)
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible')"
printf '%-10s %-6s %10s %10s %12s\n' pruner device seconds ppl peak_rss_mb
for pruner in wanda sparsegpt; do
  for device in cuda cpu; do
    run="$OUT/$pruner-$device"
    start=$(date +%s.%N)
    "$PY" -m sparsealloc.cli prune "${COMMON[@]}" --pruner "$pruner" --device "$device" \
      --out "$run"
    end=$(date +%s.%N)
    "$PY" - "$run/result.json" "$pruner" "$device" "$start" "$end" <<'PYEOF'
import json, sys
rec = json.load(open(sys.argv[1]))
secs = float(sys.argv[5]) - float(sys.argv[4])
print(f"{sys.argv[2]:<10} {sys.argv[3]:<6} {secs:10.1f} {rec['ppl']['wikitext2']:10.3f} "
      f"{rec['peak_rss_mb']:12.0f}")
PYEOF
  done
done
