# bench/callgrind.sh — sourced by the overhead benches (metrics_overhead.sh,
# trace_overhead.sh): sums of callgrind output files.

# The sum of the PROGRAM TOTALS of callgrind files (one per thread with
# --separate-threads).
totals() { for f in "$@"; do callgrind_annotate "$f" 2>/dev/null; done |
	awk '/PROGRAM TOTALS/ {gsub(",", "", $1); s += $1} END {printf "%.0f\n", s}'; }

# incl REGEX FILES...: the inclusive instructions of the functions matching
# REGEX in them.
incl() { local re=$1; shift; for f in "$@"; do
	callgrind_annotate --threshold=100 --inclusive=yes "$f" 2>/dev/null; done |
	awk -v re="$re" '$0 ~ re {gsub(",", "", $1); s += $1} END {printf "%.0f\n", s}'; }
