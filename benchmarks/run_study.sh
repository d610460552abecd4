#!/bin/bash
# Runs a study one process per run (memory does not build up over a study), JOBS at a time, each on one thread.
# Usage:
#   benchmarks/run_study.sh RECORDS SPLIT "SEEDS" "TASKS" "METHODS" [JOBS]
# e.g. benchmarks/run_study.sh benchmarks/results/online_vs_grpo_test.jsonl test "0 1 2" "arithmetic" "nca,grpo" 2
# SCRIPT=benchmarks/offline_vs_dpo.py runs the offline study instead, one process per (seed, task) with all of its
# methods (they train from the same sampled rows). Runs already in RECORDS are skipped; the lines say what ran, in
# order; LOG=FILE keeps the runs' output.
set -euo pipefail
records=$1 split=$2 seeds=$3 tasks=$4 methods=$5 jobs=${6:-2}
here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$here/.venv/bin/python}
script=${SCRIPT:-$here/benchmarks/online_vs_grpo.py}
log=${LOG:-/dev/null}
if [[ $script == *offline_vs_dpo.py ]]; then
  list=$methods
else
  list=$("$python" -c "import sys; sys.path.insert(0, '$here/benchmarks'); from online_vs_grpo import split_methods; print('\n'.join(split_methods(sys.argv[1])))" "$methods")
fi
for seed in $seeds; do
  for task in $tasks; do
    while read -r method; do
      printf '%s\t%s\t%s\n' "$seed" "$task" "$method"
    done <<< "$list"
  done
done | OMP_NUM_THREADS=1 xargs -P "$jobs" -d '\n' -I{} bash -c '
  IFS=$'"'"'\t'"'"' read -r seed task method <<< "{}"
  "'"$python"'" "'"$script"'" --records "'"$records"'" --split "'"$split"'" \
    --seeds "$seed" --tasks "$task" --methods "$method" >> "'"$log"'" 2>&1 || echo "run failed: $seed $task $method" >&2
  echo "done: $seed $task $method $(date +%T)"'
