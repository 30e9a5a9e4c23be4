#!/usr/bin/env bash
# N seeds of one config, then their multi-seed report (python -m segchange_jax.report).
#
#   launch/seeds.sh CONFIG WORKDIR_PREFIX N [--first_seed S] [--jobs J] [--split SPLIT]
#       [--dry_run] [-- extra train flags, e.g. --config.train.epochs=50]
#
# Seed s trains into WORKDIR_PREFIX/seed_s with --config.seed=s, for s = S .. S+N-1 (S default
# 0). --jobs J runs up to J trainings at a time (default 1: one after the other, output on the
# terminal; J > 1: each run's output goes to WORKDIR_PREFIX/seed_s.log; split the devices
# yourself, e.g. one GPU each through CUDA_VISIBLE_DEVICES in a wrapper). When every run has
# succeeded it writes WORKDIR_PREFIX/report.md and report.csv (mean +- std over the seeds of
# --split, default the config's eval.split). Running the same command again resumes unfinished
# runs from their workdirs and rewrites the report. --dry_run (or DRY_RUN=1) prints the
# commands and runs nothing; PYTHON names the interpreter (default python). See README.md.
set -euo pipefail

usage() { sed -n '2,/^set -e/{/^#/p}' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
die() { echo "error: seeds.sh: $*" >&2; exit 2; }

py=${PYTHON:-python}
dry=0
[[ "${DRY_RUN:-0}" == 1 ]] && dry=1
positional=() first=0 jobs=1 split= extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage 0 ;;
    --first_seed) first=${2:?--first_seed needs a value}; shift 2 ;;
    --first_seed=*) first=${1#*=}; shift ;;
    --jobs) jobs=${2:?--jobs needs a value}; shift 2 ;;
    --jobs=*) jobs=${1#*=}; shift ;;
    --split) split=${2:?--split needs a value}; shift 2 ;;
    --split=*) split=${1#*=}; shift ;;
    --dry_run) dry=1; shift ;;
    --) shift; extra+=("$@"); break ;;
    --*) extra+=("$1"); shift ;;  # a train flag given without --
    *) positional+=("$1"); shift ;;
  esac
done
[[ ${#positional[@]} -eq 3 ]] || die "usage: launch/seeds.sh CONFIG WORKDIR_PREFIX N [--jobs J] [--first_seed S] [--split SPLIT] [--dry_run] [-- train flags] (got ${#positional[@]} positional arguments)"
config=${positional[0]} prefix=${positional[1]} n=${positional[2]}
[[ "$n" =~ ^[0-9]+$ && "$n" -ge 1 ]] || die "N=$n must be a whole number >= 1 (the number of seeds)"
[[ "$jobs" =~ ^[0-9]+$ && "$jobs" -ge 1 ]] || die "--jobs $jobs must be a whole number >= 1"
[[ "$first" =~ ^[0-9]+$ ]] || die "--first_seed $first must be a whole number >= 0"
[[ -f "${config%%:*}" ]] || die "config file ${config%%:*} not found (run from the repository root)"
for a in "${extra[@]}"; do
  case "$a" in
    --config.seed=*|--config.seed|--workdir|--workdir=*) die "$a is set per run by seeds.sh; leave it out" ;;
  esac
done

# shellcheck source=launch/_show.sh
source "$(dirname "${BASH_SOURCE[0]}")/_show.sh"

seeds=()
for ((i = 0; i < n; i++)); do seeds+=($((first + i))); done
[[ $dry -eq 1 ]] || mkdir -p "$prefix"
pids=() names=() failed=()
for s in "${seeds[@]}"; do
  cmd=("$py" -m segchange_jax.train --config "$config" --workdir "$prefix/seed_$s"
       "--config.seed=$s" "${extra[@]}")
  show "${cmd[@]}"
  [[ $dry -eq 0 ]] || continue
  if [[ $jobs -eq 1 ]]; then
    "${cmd[@]}" || die "seed $s failed (exit $?); fix it and run the same command again"
    continue
  fi
  if [[ ${#pids[@]} -ge $jobs ]]; then  # wait for the oldest run (seeds take alike long)
    k=$((${#pids[@]} - jobs))
    wait "${pids[$k]}" || failed+=("${names[$k]}")
  fi
  "${cmd[@]}" >"$prefix/seed_$s.log" 2>&1 &
  pids+=($!) names+=("$s")
done
if [[ $dry -eq 0 && $jobs -gt 1 ]]; then
  start=$(( ${#pids[@]} > jobs ? ${#pids[@]} - jobs : 0 ))
  for ((k = start; k < ${#pids[@]}; k++)); do
    wait "${pids[$k]}" || failed+=("${names[$k]}")
  done
  if [[ ${#failed[@]} -gt 0 ]]; then
    die "seeds ${failed[*]} failed (logs: $(printf "$prefix/seed_%s.log " "${failed[@]}")); fix them and run the same command again"
  fi
fi

runs=()
for s in "${seeds[@]}"; do runs+=("$prefix/seed_$s"); done
report=("$py" -m segchange_jax.report "${runs[@]}" --out "$prefix/report" --overwrite)
[[ -z "$split" ]] || report+=(--split "$split")
show "${report[@]}"
[[ $dry -eq 1 ]] || "${report[@]}"
