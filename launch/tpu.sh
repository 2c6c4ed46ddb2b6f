#!/usr/bin/env bash
# Laptop side: a Cloud TPU VM for jaxprompt, from creation to deletion.
#
#   launch/tpu.sh [--dry-run] create          create the TPU VM
#   launch/tpu.sh [--dry-run] setup           copy this checkout to every worker and install it
#   launch/tpu.sh [--dry-run] data            copy $BUCKET/tensorflow_datasets to every worker
#   launch/tpu.sh [--dry-run] run -- ARGS     `jaxprompt ARGS` on every worker, in the background
#   launch/tpu.sh [--dry-run] keep -- ARGS    run, then watch until it ends; after a preemption,
#                                            recreate the VM (create, setup, data) and run again
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
#   JP_POLL_S  keep: seconds between looks at the VM and the job (default 60)
#   JP_MAX_RECREATE  keep: how many times it recreates the VM before giving up (default 20)
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
# host.sh writes the job's exit status here when it ends (see JP_STATUS there).
# shellcheck disable=SC2088
remote_status='~/jaxprompt-logs/run.status'

usage() {
  sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
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
    --command="mkdir -p ~/jaxprompt-logs; rm -f $remote_status; JP_STATUS=$remote_status nohup bash $remote_repo/launch/host.sh $args > $remote_log 2>&1 < /dev/null &"
}

# The VM's state (READY, PREEMPTED, CREATING, ...), or NOT_FOUND when there is none.
vm_state() {
  local state
  if state="$(gcloud compute tpus tpu-vm describe "$TPU_NAME" "${flags[@]}" \
    --format='value(state)' 2> /dev/null)"; then
    echo "${state:-UNKNOWN}"
  else
    echo NOT_FOUND
  fi
}

# What the job reports on every worker: its exit status once it has ended, "running" while it
# runs, "lost" when it is gone without one (killed). The [j] keeps pgrep from finding the
# shell that runs this very line (its command line holds the pattern's text, not a match).
job_states() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${flags[@]}" --worker=all \
    --command="cat $remote_status 2> /dev/null || { pgrep -f '[j]axprompt/launch/host.sh' > /dev/null && echo running; } || echo lost"
}

recreate() {
  if [[ "$1" != NOT_FOUND ]]; then
    cmd_delete
  fi
  cmd_create
  cmd_setup
  cmd_data
}

# run, then watch: a Spot VM that is preempted (or deleted) is created again, set up, given
# the datasets, and sent the same command, which skips finished runs and resumes the
# interrupted one from the bucket. Ends with the job: 0 when it succeeded on every worker.
cmd_keep() {
  need_bucket
  [[ $# -gt 0 ]] || die "usage: tpu.sh keep -- sweep --config ... --root $BUCKET/jp"
  local poll="${JP_POLL_S:-60}" max="${JP_MAX_RECREATE:-20}" recreated=0 state states
  [[ "$poll" =~ ^[0-9]+$ && "$max" =~ ^[0-9]+$ ]] || die "JP_POLL_S and JP_MAX_RECREATE are whole numbers"
  if [[ $dry_run -eq 1 ]]; then
    cmd_run "$@"
    echo "# then, every ${poll}s: the VM's state and the job's on every worker; after a preemption:"
    recreate PREEMPTED
    cmd_run "$@"
    return 0
  fi
  state="$(vm_state)"
  if [[ "$state" == READY ]]; then
    # A job already running there (keep started again after the laptop slept, say) is
    # watched, not started twice: two copies would write the same run directories.
    if [[ "$(job_states 2> /dev/null || true)" == *running* ]]; then
      echo "tpu.sh: a job is already running on $TPU_NAME; watching it instead of starting another" >&2
    else
      cmd_run "$@"
    fi
  fi
  while true; do
    case "$state" in
      READY)
        if states="$(job_states 2> /dev/null)"; then
          if [[ "$states" == *lost* || "$states" =~ (^|[^0-9])[1-9][0-9]*($|[^0-9]) ]]; then
            echo "tpu.sh: the job failed on $TPU_NAME (worker states: $(echo "$states" | tr '\n' ' ')); see launch/tpu.sh logs" >&2
            return 1
          fi
          if [[ "$states" != *running* && "$states" == *0* ]]; then
            echo "tpu.sh: the job finished on every worker of $TPU_NAME"
            return 0
          fi
        fi # an ssh that fails (network, a VM going down) is looked at again next time
        ;;
      PREEMPTED | TERMINATED | NOT_FOUND)
        if [[ $recreated -ge $max ]]; then
          echo "tpu.sh: $TPU_NAME is $state after $recreated recreations (JP_MAX_RECREATE=$max); giving up" >&2
          return 1
        fi
        recreated=$((recreated + 1))
        echo "tpu.sh: $TPU_NAME is $state; recreating it ($recreated of at most $max) and running the command again" >&2
        recreate "$state"
        cmd_run "$@"
        ;;
      STOPPED | STOPPING)
        echo "tpu.sh: $TPU_NAME was stopped; start it (gcloud compute tpus tpu-vm start) or delete it, then keep again" >&2
        return 1
        ;;
      *) ;; # CREATING, STARTING, RESTARTING, REPAIRING, ...: look again later
    esac
    sleep "$poll"
    state="$(vm_state)"
  done
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
    create | setup | data | run | keep | logs | ssh | delete) ;;
    *) die "unknown command '$cmd'; choose one of: create setup data run keep logs ssh delete" ;;
  esac
  [[ -n "${TPU_NAME:-}" ]] || die "set TPU_NAME (the name of your TPU VM)"
  [[ -n "${ZONE:-}" ]] || die "set ZONE (e.g. us-central2-b for v4, us-east1-d for v6e)"
  local flags
  common_flags
  "cmd_$cmd" "$@"
}

main "$@"
