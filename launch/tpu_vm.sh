#!/usr/bin/env bash
# Train segchange_jax on a Cloud TPU VM slice: create (or reuse) the slice, install the package
# on every worker, run the same train command on all of them, stream logs, delete on request.
#
#   launch/tpu_vm.sh --name cd-v4-32 --zone us-central2-b --type v4-32 \
#       --config configs/levir.py --workdir gs://my-bucket/runs/levir \
#       [--shards gs://my-bucket/shards/levir] [--version tpu-ubuntu2204-base] \
#       [--spot] [--delete] [--dry_run] [-- --config.train.batch_size=64 ...]
#
# Every worker runs `python -m segchange_jax.train`; jax.distributed.initialize() discovers the
# slice by itself on TPU VMs, so nothing else changes. The workdir must outlive the VMs: gs://
# (installs segchange_jax[gcs]) or a shared mount. --shards gs://... copies the converted shards
# to every worker's disk (gcloud storage rsync) and sets config.data.shards_dir to that copy.
# Rerun the same command after a preemption: training resumes from the workdir. See README.md.
set -euo pipefail

usage() { sed -n '2,/^set -e/{/^#/p}' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
die() { echo "tpu_vm.sh: $*" >&2; exit 2; }

name= zone= type= config= workdir= shards= version=tpu-ubuntu2204-base spot=0 delete=0 dry=0 extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name=${2:?}; shift 2 ;;
    --zone) zone=${2:?}; shift 2 ;;
    --type) type=${2:?}; shift 2 ;;
    --config) config=${2:?}; shift 2 ;;
    --workdir) workdir=${2:?}; shift 2 ;;
    --shards) shards=${2:?}; shift 2 ;;
    --version) version=${2:?}; shift 2 ;;
    --spot) spot=1; shift ;;
    --delete) delete=1; shift ;;
    --dry_run) dry=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "tpu_vm.sh: unknown argument $1" >&2; usage 2 ;;
  esac
done
[[ -n "$name" ]] || die "--name is required (the TPU VM name)"
[[ -n "$zone" ]] || die "--zone is required (e.g. us-central2-b)"
if [[ $delete -eq 0 ]]; then
  [[ -n "$type" ]] || die "--type is required (accelerator type, e.g. v4-32 or v5litepod-16)"
  [[ -n "$config" ]] || die "--config is required (e.g. configs/levir.py)"
  [[ -f "${config%%:*}" ]] || die "config file ${config%%:*} not found (run from the repository root)"
  [[ -n "$workdir" ]] || die "--workdir is required (gs://bucket/path or a shared mount)"
  [[ "$type" =~ ^v[0-9]+[a-z]*(pod)?-[0-9]+$ ]] || die "--type $type does not look like a TPU type (v4-32, v5litepod-16, ...)"
  [[ -z "$shards" || "$shards" == gs://* ]] || die "--shards $shards must be a gs:// folder of converted shards (for a shared mount pass --config.data.shards_dir=... after --)"
fi

# shellcheck source=launch/_show.sh
source "$(dirname "${BASH_SOURCE[0]}")/_show.sh"
run() {
  show "$@"
  if [[ $dry -eq 0 ]]; then "$@"; fi
}
if [[ $dry -eq 0 ]]; then command -v gcloud >/dev/null || die "gcloud not found; install the Google Cloud SDK"; fi

if [[ $delete -eq 1 ]]; then
  run gcloud compute tpus tpu-vm delete "$name" --zone "$zone" --quiet
  exit 0
fi

if [[ $dry -eq 1 ]] || ! gcloud compute tpus tpu-vm describe "$name" --zone "$zone" >/dev/null 2>&1; then
  create=(gcloud compute tpus tpu-vm create "$name" --zone "$zone" --accelerator-type "$type"
          --version "$version")
  [[ $spot -eq 1 ]] && create+=(--spot)
  run "${create[@]}"
fi

ssh=(gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all)
archive=$(mktemp -d)/segchange_jax.tar.gz
run git archive --format=tar.gz -o "$archive" HEAD
run gcloud compute tpus tpu-vm scp "$archive" "$name:~/segchange_jax.tar.gz" --zone "$zone" --worker=all
package=.
[[ "$workdir" == gs://* ]] && package='.[gcs]'  # epath + TensorBoard writers for gs://
run "${ssh[@]}" --command "mkdir -p ~/segchange_jax && tar -xzf ~/segchange_jax.tar.gz -C ~/segchange_jax && cd ~/segchange_jax && python3 -m pip install -q -e \"$package\" \"jax[tpu]\""
if [[ -n "$shards" ]]; then
  # ArrayRecord reads local files only; every worker reads records of every shard.
  run "${ssh[@]}" --command "mkdir -p ~/segchange_shards && gcloud storage rsync --recursive $(printf '%q' "$shards") ~/segchange_shards"
fi

train="cd ~/segchange_jax && python3 -m segchange_jax.train --config $(printf '%q' "$config") --workdir $(printf '%q' "$workdir")"
[[ -n "$shards" ]] && train+=" --config.data.shards_dir=\$HOME/segchange_shards --config.data.source_root="
for arg in "${extra[@]}"; do train+=" $(printf '%q' "$arg")"; done
# Output of every worker is streamed; worker 0 alone writes summaries and logs to the workdir.
run "${ssh[@]}" --command "$train 2>&1 | sed \"s/^/[\$(hostname)] /\""
