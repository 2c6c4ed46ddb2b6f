# shellcheck shell=bash
# Helpers shared by the launch scripts (sourced, not run). The caller sets dry_run=0|1.

# Quotes words so that the printed line can be pasted into a shell: plain words stay as they
# are, others go in single quotes. A leading ~/ stays outside the quotes (expanded by that shell).
quote() {
  local out="" w
  for w in "$@"; do
    if [[ "$w" =~ ^[A-Za-z0-9_@%+=:,./~-]+$ ]]; then
      out+="$w "
    else
      out+="'${w//\'/\'\\\'\'}' "
    fi
  done
  echo "${out% }"
}

# Prints a command (one pasteable line), then runs it unless this is a dry run.
run() {
  echo "+ $(quote "$@")"
  # shellcheck disable=SC2154  # dry_run is set by the sourcing script
  if [[ $dry_run -eq 0 ]]; then
    "$@"
  fi
}
