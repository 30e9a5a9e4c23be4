# Sourced by the launch scripts: show CMD... prints a command readably (`+ cmd args`, arguments
# with spaces in single quotes), as the scripts echo what they run (and all --dry_run prints).
show() {
  local out='+' a
  for a in "$@"; do
    if [[ "$a" =~ [[:space:]] ]]; then out+=" '$a'"; else out+=" $a"; fi
  done
  echo "$out"
}
