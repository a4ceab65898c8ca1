# Sourced by scripts/gpu_check.sh (and by tests/test_gpu_check.py): run named sections, each under its own time
# limit, keep each one's exit status, and print a summary table at the end.
#
#   section NAME LIMIT_SECONDS PATTERN COMMAND [ARGS...]
#       runs COMMAND with `timeout LIMIT_SECONDS`, its output (stdout and stderr) shown and saved to $OUT/NAME.txt;
#       records ok / failed (exit N) / timed out, the seconds it took, and the last output line matching PATTERN
#       (grep -E) as the section's result.
#   skip NAME REASON       records a section that did not run, and why.
#   summary                prints the table; returns 1 if any section failed or timed out, else 0.
#
# Written for the exit status: `timeout ... | tee` reports tee's status, so a failing section looked like a success;
# here the command's own status is taken from PIPESTATUS.

SECTION_NAMES=()
SECTION_STATUS=()
SECTION_SECONDS=()
SECTION_LIMITS=()
SECTION_RESULTS=()
SECTION_FAILURES=0

section() {
  local name=$1 limit=$2 pattern=$3
  shift 3
  local log="${OUT:-/tmp}/$name.txt" started=$SECONDS code status result
  echo
  echo "=== $name (limit ${limit} s, $(date +%T))"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$log"
  code=${PIPESTATUS[0]}
  case $code in
    0) status="ok" ;;
    124|137) status="timed out"; SECTION_FAILURES=$((SECTION_FAILURES + 1)) ;;
    *) status="failed (exit $code)"; SECTION_FAILURES=$((SECTION_FAILURES + 1)) ;;
  esac
  result=$(grep -aE "$pattern" "$log" | tail -1 | tr '|' '/' | cut -c1-140)
  SECTION_NAMES+=("$name"); SECTION_STATUS+=("$status"); SECTION_SECONDS+=($((SECONDS - started)))
  SECTION_LIMITS+=("$limit"); SECTION_RESULTS+=("${result:--}")
  return 0
}

skip() {
  SECTION_NAMES+=("$1"); SECTION_STATUS+=("skipped"); SECTION_SECONDS+=(0); SECTION_LIMITS+=(0)
  SECTION_RESULTS+=("$2")
  echo; echo "=== $1: skipped ($2)"
}

summary() {
  local i total=0
  echo
  echo "| section | status | seconds | limit | result |"
  echo "|---|---|---:|---:|---|"
  for i in "${!SECTION_NAMES[@]}"; do
    echo "| ${SECTION_NAMES[$i]} | ${SECTION_STATUS[$i]} | ${SECTION_SECONDS[$i]} | ${SECTION_LIMITS[$i]} | ${SECTION_RESULTS[$i]} |"
    total=$((total + SECTION_SECONDS[$i]))
  done
  echo
  echo "sections: ${#SECTION_NAMES[@]}, failed or timed out: $SECTION_FAILURES, seconds in sections: $total"
  [ "$SECTION_FAILURES" -eq 0 ]
}
