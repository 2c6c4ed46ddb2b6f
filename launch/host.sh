#!/usr/bin/env bash
# Worker side of launch/tpu.sh: runs on every TPU VM host (gcloud ... ssh --worker=all).
#
#   bash launch/host.sh install                  # venv + jaxprompt[tpu]; a no-op when up to date
#   bash launch/host.sh data GS_DIR              # copy prepared TFDS datasets to ~/tensorflow_datasets
#   bash launch/host.sh train --config ... --workdir gs://...   # any jaxprompt command
#   bash launch/host.sh sweep --config ... --root gs://...
#   bash launch/host.sh --dry-run <any of the above>   # print the commands, run nothing
#
# Every jaxprompt command installs first if needed, then runs with JAXPROMPT_MULTIHOST=1, so
# each host calls jax.distributed.initialize() and the hosts form one job (on a one-host TPU VM
# that is a job of one). The install is keyed by a hash of pyproject.toml: re-running setup, or
# a command on a fresh or preempted-and-recreated VM, installs exactly when needed.
#
# Environment (all optional):
#   JP_VENV      virtual environment (default ~/jaxprompt-venv)
#   JP_PYTHON    interpreter that creates it (default python3)
#   JP_EXTRAS    pip extras of jaxprompt (default tpu)
#   JP_STATUS    a file that gets the command's exit status when it ends (tpu.sh keep reads it)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
venv="${JP_VENV:-$HOME/jaxprompt-venv}"
python="${JP_PYTHON:-python3}"
extras="${JP_EXTRAS:-tpu}"
dry_run=0

usage() {
  sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

install() {
  local stamp want
  stamp="$venv/.jaxprompt-install"
  # What the install depends on: the dependency list and the extras.
  want="$(cat "$repo/pyproject.toml" <(echo "$extras") | sha256sum | cut -d' ' -f1)"
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    echo "jaxprompt is installed in $venv and up to date"
    return 0
  fi
  if [[ ! -x "$venv/bin/pip" ]]; then
    run "$python" -m venv "$venv"
  fi
  run "$venv/bin/pip" install -q --upgrade pip
  # gcsfs lets etils.epath (run files, orbax directories) read and write gs:// paths.
  run "$venv/bin/pip" install -q -e "${repo}[${extras}]" gcsfs
  if [[ $dry_run -eq 0 ]]; then
    echo "$want" > "$stamp"
  fi
}

sync_data() {
  local src="${1:?usage: host.sh data gs://BUCKET/tensorflow_datasets}"
  run gcloud storage rsync --recursive "$src" "$HOME/tensorflow_datasets"
}

main() {
  if [[ "${1:-}" == "--dry-run" ]]; then
    dry_run=1
    shift
  fi
  local cmd="${1:-}"
  case "$cmd" in
    "" | -h | --help | help)
      usage
      [[ -n "$cmd" ]]
      ;;
    install)
      install
      ;;
    data)
      shift
      sync_data "$@"
      ;;
    *)
      if [[ -n "${JP_STATUS:-}" ]]; then
        # Also when the install fails: the status is how a watcher knows the job ended.
        trap 'echo $? > "$JP_STATUS"' EXIT
      fi
      install
      export JAXPROMPT_MULTIHOST="${JAXPROMPT_MULTIHOST:-1}"
      echo "+ JAXPROMPT_MULTIHOST=$JAXPROMPT_MULTIHOST"
      run "$venv/bin/jaxprompt" "$@"
      ;;
  esac
}

main "$@"
