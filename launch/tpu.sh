#!/usr/bin/env bash
# Laptop side: a Cloud TPU VM for jaxprompt, from creation to deletion.
#
#   launch/tpu.sh [--dry-run] create          create the TPU VM
#   launch/tpu.sh [--dry-run] setup           copy this checkout to every worker and install it
#   launch/tpu.sh [--dry-run] data            copy $BUCKET/tensorflow_datasets to every worker
#   launch/tpu.sh [--dry-run] run -- ARGS     `jaxprompt ARGS` on every worker, in the background
#   launch/tpu.sh [--dry-run] logs            follow worker 0's log (JP_WORKER=i for another)
#   launch/tpu.sh [--dry-run] ssh [-- CMD]    a shell (or CMD) on every worker (CMD) / worker 0
#   launch/tpu.sh [--dry-run] delete          delete the TPU VM
#
# --dry-run prints every gcloud command instead of running it (no gcloud needed).
#
# Environment:
#   TPU_NAME   name of the TPU VM (required)
#   ZONE       its zone, e.g. us-central2-b (required)
#   BUCKET     gs://bucket for data and run directories (required by data and run)
#   ACCEL      accelerator type (default v4-8; v4-16 and larger have several hosts)
#   VERSION    TPU software version (default: the one for ACCEL's generation)
#   PROJECT    Google Cloud project (default: gcloud's configured project)
#   SPOT       1 to create a Spot VM (cheaper, preemptible; runs resume from checkpoints)
#
# Runs write into their --workdir; give a gs:// one (e.g. "$BUCKET/jp/...") so that results,
# metrics and checkpoints outlive the VM. A command that is run again skips finished runs and
# resumes interrupted ones.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
dry_run=0
# Paths on the workers: the ~ is expanded there, by the remote shell.
# shellcheck disable=SC2088
remote_repo='~/jaxprompt'
# shellcheck disable=SC2088
remote_log='~/jaxprompt-logs/run.log'

usage() {
  sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

die() {
  echo "tpu.sh: error: $*" >&2
  exit 2
}

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

default_version() {
  case "$1" in
    v2-* | v3-*) echo tpu-ubuntu2204-base ;;
    v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) die "no default VERSION for ACCEL=$1: set VERSION (see the Cloud TPU docs)" ;;
  esac
}

# The flags every `gcloud compute tpus tpu-vm` command takes.
common_flags() {
  flags=(--zone="$ZONE")
  if [[ -n "${PROJECT:-}" ]]; then
    flags+=(--project="$PROJECT")
  fi
}

need_bucket() {
  [[ "${BUCKET:-}" == gs://* ]] || die "set BUCKET=gs://<bucket> (see README: Running on Cloud TPU)"
  BUCKET="${BUCKET%/}"
}

cmd_create() {
  local accel="${ACCEL:-v4-8}"
  local version="${VERSION:-$(default_version "$accel")}"
  local extra=()
  if [[ "${SPOT:-0}" == 1 ]]; then
    extra+=(--spot)
  fi
  run gcloud compute tpus tpu-vm create "$TPU_NAME" "${flags[@]}" \
    --accelerator-type="$accel" --version="$version" "${extra[@]}"
}

cmd_setup() {
  # The checkout as it is (uncommitted edits included), without environments, runs or caches.
  local tarball
  tarball="$(mktemp -d)/jaxprompt.tar.gz"
  run tar -czf "$tarball" -C "$repo" --exclude=.git --exclude=.venv --exclude=runs \
    --exclude=__pycache__ --exclude='*.egg-info' .
  run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:~/jaxprompt.tar.gz" \
    "${flags[@]}" --worker=all
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${flags[@]}" --worker=all \
    --command="mkdir -p $remote_repo && tar -xzf ~/jaxprompt.tar.gz -C $remote_repo && bash $remote_repo/launch/host.sh install"
  if [[ $dry_run -eq 0 ]]; then
    rm -rf "$(dirname "$tarball")"
  fi
}

cmd_data() {
  need_bucket
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${flags[@]}" --worker=all \
    --command="bash $remote_repo/launch/host.sh data $(quote "$BUCKET/tensorflow_datasets")"
}

cmd_run() {
  need_bucket
  [[ $# -gt 0 ]] || die "usage: tpu.sh run -- train --config ... --workdir $BUCKET/jp/..."
  local args
  args="$(quote "$@")"
  # nohup + background: the job survives the ssh session; each worker logs to its own disk.
  # Only the job goes to the background, with every stream redirected: a backgrounded
  # `mkdir && nohup ...` list would keep ssh's stdout open and hold the session until the end.
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${flags[@]}" --worker=all \
    --command="mkdir -p ~/jaxprompt-logs; nohup bash $remote_repo/launch/host.sh $args > $remote_log 2>&1 < /dev/null &"
}

cmd_logs() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${flags[@]}" --worker="${JP_WORKER:-0}" \
    --command="tail -n 200 -F $remote_log"
}

cmd_ssh() {
  if [[ $# -gt 0 ]]; then
    run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${flags[@]}" --worker=all --command="$*"
  else
    run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${flags[@]}" --worker="${JP_WORKER:-0}"
  fi
}

cmd_delete() {
  run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${flags[@]}" --quiet
}

main() {
  if [[ "${1:-}" == "--dry-run" ]]; then
    dry_run=1
    shift
  fi
  local cmd="${1:-}"
  [[ $# -gt 0 ]] && shift
  if [[ "${1:-}" == "--" ]]; then
    shift
  fi
  case "$cmd" in
    "" | -h | --help | help)
      usage
      [[ -n "$cmd" ]] || exit 2
      return 0
      ;;
    create | setup | data | run | logs | ssh | delete) ;;
    *) die "unknown command '$cmd'; choose one of: create setup data run logs ssh delete" ;;
  esac
  [[ -n "${TPU_NAME:-}" ]] || die "set TPU_NAME (the name of your TPU VM)"
  [[ -n "${ZONE:-}" ]] || die "set ZONE (e.g. us-central2-b for v4, us-east1-d for v6e)"
  local flags
  common_flags
  "cmd_$cmd" "$@"
}

main "$@"
