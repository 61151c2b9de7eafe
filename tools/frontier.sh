#!/usr/bin/env bash
# The frontier runs of RESULTS.md section 7 (issue 12): one setting and one calibration seed (or
# the setting's search row) per call, resumable. Rerun the same call after a crash or the end of
# a session: finished rows (and a search's finished generations) are taken over (`--resume`).
#
#   tools/frontier.sh MODEL SETTING SEED [OUT_ROOT]
#     MODEL    smollm2 | gemma | qwen
#     SETTING  wanda-60 | wanda-70 | sparsegpt-70
#     SEED     0 | 1 | 2   every frontier row with this calibration seed
#              search      the search row (seed 0, 25 generations, held-out check), started from
#                          the setting's best seed-0 heuristic (the starts RESULTS.md used)
#     OUT_ROOT default runs/frontier; the run writes OUT_ROOT/MODEL-SETTING-sSEED (or -search)
#
# Reduced protocols (RESULTS.md 7c): SmolLM2 and Gemma 32 x 512 calibration tokens, 16384
# WikiText-2 tokens in windows of 1024, 4 probe sequences; Qwen 16 x 512, 8192, 8. One thread:
# two runs side by side on two cores (the lessons: more threads per job are slower).
# Environment: SPARSEALLOC (default: `sparsealloc` on PATH), SPARSEALLOC_DATA for WikiText-2,
# ONLY=label,label to run some of a seed's rows (e.g. ONLY=owl+absorb,owl+absorb_rdamage: rows
# another run of that seed lacks; use another OUT_ROOT so that run's folder is not rewritten).
set -euo pipefail

if [ $# -lt 3 ]; then
  awk 'NR > 1 && /^#/ {print; next} NR > 1 {exit}' "$0" >&2
  exit 2
fi
model=$1 setting=$2 seed=$3 root=${4:-runs/frontier}
cli=${SPARSEALLOC:-sparsealloc}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}

case $model in
  smollm2) proto=(--model smollm2-135m --nsamples 32 --eval-tokens 16384 --absorb-nsamples 4) ;;
  gemma) proto=(--model gemma3-270m --nsamples 32 --eval-tokens 16384 --absorb-nsamples 4) ;;
  qwen) proto=(--model qwen2.5-coder-0.5b --nsamples 16 --eval-tokens 8192 --absorb-nsamples 8) ;;
  *) echo "error: MODEL must be smollm2, gemma or qwen (got '$model')" >&2; exit 2 ;;
esac
proto+=(--seqlen 512 --eval-seqlen 1024 --no-dense)
case $setting in
  wanda-60) proto+=(--pruner wanda --sparsity 0.6) ;;
  wanda-70) proto+=(--pruner wanda --sparsity 0.7) ;;
  sparsegpt-70) proto+=(--pruner sparsegpt --sparsity 0.7) ;;
  *) echo "error: SETTING must be wanda-60, wanda-70 or sparsegpt-70 (got '$setting')" >&2
     exit 2 ;;
esac

search_opts="search_generations=25,search_offspring=8,search_survivors=2;1,search_tokens=512;1024,search_stride=4"
case $seed in
  0|1|2)
    rows=(--row "uniform|uniform|" --row "linear:auto|linear:auto|" --row "dlp|dlp|"
          --row "dlp+absorb|dlp+absorb|"
          --row "owl+absorb_rdamage|owl+absorb|absorb_final=damage"
          --row "owl|owl|" --row "alpha|alpha|" --row "owl+absorb|owl+absorb|"
          --row "lsa|lsa|")
    if [ -n "${ONLY:-}" ]; then
      keep=()
      for ((i = 1; i < ${#rows[@]}; i += 2)); do
        case ",$ONLY," in *",${rows[i]%%|*},"*) keep+=(--row "${rows[i]}") ;; esac
      done
      [ ${#keep[@]} -gt 0 ] || { echo "error: ONLY=$ONLY names no row label" >&2; exit 2; }
      rows=("${keep[@]}")
    fi
    out=$root/$model-$setting-s$seed ;;
  search)
    # The start: the best seed-0 heuristic of the setting (linear:auto with the slope it chose).
    case $model-$setting in
      smollm2-*) start="search:dlp+absorb|search:dlp+absorb|" ;;
      gemma-wanda-60) start="search:linear|search:linear|linear_beta=0.014117647058823528," ;;
      gemma-wanda-70) start="search:linear|search:linear|linear_beta=0.007058823529411764," ;;
      gemma-sparsegpt-70) start="search:linear|search:linear|linear_beta=0.004705882352941177," ;;
      qwen-wanda-60) start="search:linear|search:linear|linear_beta=0.0017391304347826088," ;;
      qwen-wanda-70) start="search:owl+absorb_rdamage|search:owl+absorb|absorb_final=damage," ;;
      qwen-sparsegpt-70) start="search:owl|search:owl|" ;;
    esac
    rows=(--row "$start$search_opts")
    seed=0
    out=$root/$model-$setting-search ;;
  *) echo "error: SEED must be 0, 1, 2 or search (got '$seed')" >&2; exit 2 ;;
esac

mkdir -p "$root"
exec $cli compare "${proto[@]}" --seed "$seed" "${rows[@]}" --out "$out" --resume
