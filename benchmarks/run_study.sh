#!/bin/bash
# Runs benchmarks/online_vs_grpo.py one run per process (memory does not build up over a study), JOBS at a time,
# each on one thread. Usage:
#   benchmarks/run_study.sh RECORDS SPLIT "SEEDS" "TASKS" "METHODS" [JOBS]
# e.g. benchmarks/run_study.sh benchmarks/results/online_vs_grpo_test.jsonl test "0 1 2" "arithmetic" "nca,grpo" 2
# Runs already in RECORDS are skipped; the lines say seed, task and method of each run in order.
set -euo pipefail
records=$1 split=$2 seeds=$3 tasks=$4 methods=$5 jobs=${6:-2}
here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$here/.venv/bin/python}
list=$("$python" -c "import sys; sys.path.insert(0, '$here/benchmarks'); from online_vs_grpo import split_methods; print('\n'.join(split_methods(sys.argv[1])))" "$methods")
for seed in $seeds; do
  for task in $tasks; do
    while read -r method; do
      printf '%s\t%s\t%s\n' "$seed" "$task" "$method"
    done <<< "$list"
  done
done | OMP_NUM_THREADS=1 xargs -P "$jobs" -d '\n' -I{} bash -c '
  IFS=$'"'"'\t'"'"' read -r seed task method <<< "{}"
  "'"$python"'" "'"$here"'/benchmarks/online_vs_grpo.py" --records "'"$records"'" --split "'"$split"'" \
    --seeds "$seed" --tasks "$task" --methods "$method" > /dev/null 2>&1 || echo "run failed: $seed $task $method" >&2
  echo "done: $seed $task $method $(date +%T)"'
