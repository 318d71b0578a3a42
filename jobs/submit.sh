#!/usr/bin/env bash
# Submit a job script after creating the directories of its --output/--error files (SLURM opens them before
# the script runs, and a job whose log directory is missing fails without any log).
#
#   jobs/submit.sh [sbatch options...] SCRIPT [script arguments...]
#   jobs/submit.sh --ntasks=16 --time=2-00:00:00 jobs/long_requeue.sbatch
#
# Prints sbatch's output (the job id). Options given here override the script's #SBATCH lines, as with sbatch.
set -euo pipefail
opts=() script=""
while [ $# -gt 0 ]; do
    case "$1" in
        *.sbatch|*.sh) script=$1; shift; break ;;
        *) opts+=("$1"); shift ;;
    esac
done
[ -n "$script" ] && [ -f "$script" ] || { echo "usage: $0 [sbatch options...] SCRIPT.sbatch [args...]" >&2; exit 2; }
logs=()
while read -r line; do logs+=("$line"); done < <(sed -n -E 's/^#SBATCH +(--output|--error|-o|-e)[= ]+([^ ]+).*/\2/p' "$script")
for ((i = 0; i < ${#opts[@]}; i++)); do
    case "${opts[i]}" in
        --output=*|--error=*) logs+=("${opts[i]#*=}") ;;
        -o|-e|--output|--error) logs+=("${opts[i+1]:-}") ;;
    esac
done
for log in "${logs[@]}"; do
    dir=$(dirname "$log")
    [ -n "$dir" ] && mkdir -p "$dir"
done
exec sbatch ${opts[@]+"${opts[@]}"} "$script" "$@"
