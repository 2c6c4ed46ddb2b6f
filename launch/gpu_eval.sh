#!/usr/bin/env bash
# Evaluates a run trained on Cloud TPU on this machine's GPU (or CPU), from its bucket copy.
#
#   launch/gpu_eval.sh [--dry-run] SRC [DEST] [-- --config configs/<protocol>.py:<method>,...]
#
# SRC   the run directory: gs://bucket/jp/<protocol>/<method>/<dataset>/<shots>s/seed<n>, or a
#       local directory (then evaluated in place, nothing copied).
# DEST  where to copy it (default runs/<SRC without gs://bucket/>); re-running copies only
#       what changed (gcloud storage rsync).
# After --: arguments of `jaxprompt eval`. Without --config the run's own evaluations are
#       repeated; with one (e.g. xdomain:coop,dataset=imagenet) its evals are run
#       instead: other datasets (cross-dataset) and shifted domains (domain generalisation).
#
# Results go to DEST/evals/<key>.json (listed in DEST/results.md). --dry-run prints the commands and runs nothing.
# Environment: JAXPROMPT (default: jaxprompt), the command to run. The GPU needs
# `pip install -e ".[cuda]"`; this script never turns on multi-host mode.
set -euo pipefail

dry_run=0

usage() {
  sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

die() {
  echo "gpu_eval.sh: error: $*" >&2
  exit 2
}

main() {
  if [[ "${1:-}" == "--dry-run" ]]; then
    dry_run=1
    shift
  fi
  case "${1:-}" in
    "" | -h | --help) usage; [[ -n "${1:-}" ]] || exit 2; return 0 ;;
  esac
  local src="${1%/}" dest=""
  shift
  if [[ $# -gt 0 && "$1" != "--" ]]; then
    dest="$1"
    shift
  fi
  if [[ $# -gt 0 ]]; then
    [[ "$1" == "--" ]] || die "unexpected argument '$1' (eval arguments go after --)"
    shift
  fi
  local workdir
  if [[ "$src" == gs://* ]]; then
    if [[ -z "$dest" ]]; then
      # The bucket's layout under runs/: gs://B/jp/fewshot/coop/... -> runs/jp/fewshot/coop/...
      dest="runs/${src#gs://*/}"
    fi
    run mkdir -p "$dest"
    run gcloud storage rsync --recursive "$src" "$dest"
    workdir="$dest"
  else
    [[ -z "$dest" ]] || die "a local SRC is evaluated in place; drop DEST"
    [[ $dry_run -eq 1 || -d "$src" ]] || die "no run directory $src"
    workdir="$src"
  fi
  # One local device: never join a multi-host job, whatever the environment says.
  run env -u JAXPROMPT_MULTIHOST "${JAXPROMPT:-jaxprompt}" eval --workdir "$workdir" "$@"
}

main "$@"
