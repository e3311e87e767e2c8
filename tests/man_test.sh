#!/bin/bash
# tests/man_test.sh SRC_DIR BIN_DIR — the man pages in docs/man:
#   - each renders with `man -l` (exit 0, no groff warnings at all, a NAME
#     section)
#   - moectl.1: every subcommand of client/moectl.c's main() is a tagged
#     paragraph of COMMANDS, and every long option of client/moectl*.c is
#     named
#   - moe.yaml.5: every key of cfg_keys[] (daemon/server/config_keys.c) has
#     an entry under KEYS, in its section's subsection, that says "Applies
#     on reload" or "Needs a restart" as the table's .reload does, and "not
#     supported yet" where .supported is false; no entry for a key the
#     table lacks
#   - libmoeclient.3: every MOE_API function of client/include/moeclient.h
#     (and the functions moe_errors.h and moe_admin.h export) is in the
#     SYNOPSIS and described below it
#   - moed.8: every long option of moed (its --help, usage() and opts[] in
#     daemon/server/main.c) is named
# The lists come from the code, so a new subcommand, key, function or option
# without its documentation fails here.
#
# Prints a line per check and "N passed, N failed"; exits 1 on any failure,
# 77 (skipped) without man or groff.
set -u

if [ $# -ne 2 ]; then
	echo "usage: $0 SRC_DIR BIN_DIR" >&2
	exit 2
fi
src=$(cd "$1" && pwd) || exit 2
bin=$2
man_dir=$src/docs/man

if ! command -v man >/dev/null 2>&1; then
	echo "SKIPPED: man not found (Debian man-db)"
	exit 77
fi
if ! command -v groff >/dev/null 2>&1; then
	echo "SKIPPED: groff not found (Debian groff-base)"
	exit 77
fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/moed-man.XXXXXX") || exit 1
trap 'rm -rf "$tmp"' EXIT

passed=0
failed=0
pass() { echo "PASS: $*"; passed=$((passed + 1)); }
fail() { echo "FAIL: $*"; failed=$((failed + 1)); }
show() { sed 's/^/    /' "$1"; }

# The roff source with \- as -, font escapes and \& dropped: what the
# checks below read.
norm() { sed -e 's/\\-/-/g' -e 's/\\f[BIRP]//g' -e 's/\\&//g' -e 's/\\c$//' "$1"; }

# The first word of each tagged paragraph's tag (the line after .TP), in
# section SH (all sections when empty): "TAG<TAB>SUBSECTION".
tags() {
	norm "$1" | awk -v want="$2" '
		/^\.SH / { sh = $2; ss = ""; next }
		/^\.SS / { ss = $2; next }
		tp { tp = 0
		     if (want != "" && sh != want) next
		     line = $0; sub(/^\.[A-Z]+ +/, "", line); gsub(/"/, "", line)
		     split(line, w, /[ \t]+/); print w[1] "\t" ss; next }
		/^\.TP/ { tp = 1 }'
}

pages="moed.8 moectl.1 moe.yaml.5 libmoeclient.3"

# --- rendering ------------------------------------------------------------------
# LC_ALL=C: ASCII output whatever the host's locale, and no locale warning.
for p in $pages; do
	f=$man_dir/$p
	if [ ! -f "$f" ]; then
		fail "$p: missing ($f)"
		continue
	fi
	LC_ALL=C MANWIDTH=80 MANPAGER=cat PAGER=cat man --warnings=w -l "$f" \
		>"$tmp/$p.txt" 2>"$tmp/$p.err"
	rc=$?
	if [ $rc -ne 0 ]; then
		fail "man -l $p: exit $rc"
		show "$tmp/$p.err"
	elif [ -s "$tmp/$p.err" ]; then
		fail "man --warnings=w -l $p: warnings"
		show "$tmp/$p.err"
	elif ! grep -q '^NAME$' "$tmp/$p.txt" || [ "$(wc -l <"$tmp/$p.txt")" -lt 20 ]; then
		fail "man -l $p: no NAME section or nearly empty output"
		show "$tmp/$p.txt"
	else
		pass "man -l $p renders ($(wc -l <"$tmp/$p.txt") lines at 80 columns, no warnings)"
	fi
done

# --- moectl(1): subcommands and options ------------------------------------------
cmds=$(sed -n '/^int main(/,/^}/p' "$src/client/moectl.c" |
	sed -n 's/.*!strcmp(cmd, "\([^"]*\)").*/\1/p')
n=$(echo "$cmds" | grep -c .)
if [ "$n" -lt 5 ]; then
	fail "moectl subcommands: found only $n in client/moectl.c main() (has its dispatch changed?)"
else
	tags "$man_dir/moectl.1" COMMANDS | cut -f1 | sort -u >"$tmp/moectl.tags"
	missing=
	for c in $cmds; do
		grep -qxF -- "$c" "$tmp/moectl.tags" && grep -qw -- "$c" "$tmp/moectl.1.txt" ||
			missing="$missing $c"
	done
	if [ -z "$missing" ]; then
		pass "moectl.1: all $n subcommands of client/moectl.c main() under COMMANDS: $(tr '\n' ' ' <<<"$cmds")"
	else
		fail "moectl.1: subcommands not under COMMANDS (a .TP tag):$missing"
	fi
fi

opts=$(cat "$src"/client/moectl*.c |
	sed -n 's/.*{"\([a-z][a-z0-9-]*\)", *\(no\|required\|optional\)_argument.*/\1/p' | sort -u)
norm "$man_dir/moectl.1" >"$tmp/moectl.1.norm"
missing=
for o in $opts; do
	grep -qE -- "--$o([^a-z0-9-]|\$)" "$tmp/moectl.1.norm" || missing="$missing --$o"
done
if [ -z "$opts" ]; then
	fail "moectl options: none found in client/moectl*.c"
elif [ -z "$missing" ]; then
	pass "moectl.1: all $(echo "$opts" | wc -l) long options of client/moectl*.c"
else
	fail "moectl.1: long options not named:$missing"
fi

# --- moe.yaml(5): every key of cfg_keys[] ----------------------------------------
# One line per table entry (entries span lines): KEY SUPPORTED RELOAD.
sed -n '/^const struct cfg_key cfg_keys\[\] = {/,/^};/p' "$src/daemon/server/config_keys.c" |
	sed -e 's:/\*.*\*/::g' -e 's://.*::' |
	awk '/^[ \t]*\{"/ { if (e != "") print e; e = $0; next }
	     e != "" && !/^};/ { e = e " " $0 }
	     END { if (e != "") print e }' |
	while IFS= read -r e; do
		k=$(echo "$e" | sed -n 's/^[ \t]*{"\([^"]*\)".*/\1/p')
		s=0 r=0
		echo "$e" | grep -q '\.supported *= *true' && s=1
		echo "$e" | grep -q '\.reload *= *true' && r=1
		echo "$k $s $r"
	done >"$tmp/keys"
# The page's entries under KEYS: KEY<TAB>SUBSECTION<TAB>TEXT (tag line + body).
norm "$man_dir/moe.yaml.5" | awk '
	/^\.SH / { flush(); sh = $2; ss = ""; next }
	/^\.SS / { flush(); ss = $2; next }
	/^\.TP/ { flush(); tp = 1; next }
	tp { tp = 0
	     if (sh != "KEYS") next
	     line = $0; sub(/^\.[A-Z]+ +/, "", line); gsub(/"/, "", line)
	     split(line, w, /[ \t]+/); key = w[1]; sec = ss; text = line; next }
	key != "" { text = text " " $0 }
	function flush() { if (key != "") print key "\t" sec "\t" text; key = "" }
	END { flush() }' >"$tmp/entries"
n=$(grep -c . "$tmp/keys")
if [ "$n" -lt 10 ]; then
	fail "moe.yaml keys: found only $n in cfg_keys[] (has the table changed?)"
else
	bad=0
	while read -r k s r; do
		line=$(awk -F'\t' -v k="$k" '$1 == k' "$tmp/entries" | head -1)
		sec=${k%%.*}
		text=$(echo "$line" | cut -f3-)
		if [ -z "$line" ]; then
			fail "moe.yaml.5: $k: no entry (.TP tag) under KEYS"
		elif [ "$(echo "$line" | cut -f2)" != "$sec" ]; then
			fail "moe.yaml.5: $k: under .SS '$(echo "$line" | cut -f2)', not '$sec'"
		elif ! grep -qF -- "$k" "$tmp/moe.yaml.5.txt"; then
			fail "moe.yaml.5: $k: not in the rendered page"
		elif [ "$s" = 0 ] && ! echo "$text" | grep -qi 'not supported yet'; then
			fail "moe.yaml.5: $k: .supported = false but the entry does not say 'not supported yet'"
		elif [ "$s" = 1 ] && [ "$r" = 1 ] &&
			{ ! echo "$text" | grep -q 'Applies on reload' ||
				echo "$text" | grep -q 'Needs a restart'; }; then
			fail "moe.yaml.5: $k: .reload = true: the entry must say 'Applies on reload' (only)"
		elif [ "$s" = 1 ] && [ "$r" = 0 ] &&
			{ ! echo "$text" | grep -q 'Needs a restart' ||
				echo "$text" | grep -q 'Applies on reload'; }; then
			fail "moe.yaml.5: $k: needs a restart: the entry must say 'Needs a restart' (only)"
		else
			continue
		fi
		bad=1
	done <"$tmp/keys"
	stale=$(cut -f1 "$tmp/entries" | while read -r k; do
		grep -q "^$k " "$tmp/keys" || printf ' %s' "$k"
	done)
	if [ -n "$stale" ]; then
		fail "moe.yaml.5: entries for keys cfg_keys[] does not have:$stale"
		bad=1
	fi
	# (failures were counted one by one above)
	[ $bad = 0 ] && pass "moe.yaml.5: all $n keys of cfg_keys[], each in its section, reload/restart/not-supported as the table says"
fi

# --- libmoeclient(3): every exported function -------------------------------------
funcs=$( {
	sed -n 's/^MOE_API[^(]*[ *]\([a-z_][a-z0-9_]*\)(.*/\1/p' "$src/client/include/moeclient.h"
	sed -n 's/^__attribute__((visibility("default")))[^(]*[ *]\([a-z_][a-z0-9_]*\)(.*/\1/p' \
		"$src/ipc/moe_errors.h" "$src/ipc/moe_admin.h"
} | sort -u)
norm "$man_dir/libmoeclient.3" | awk '/^\.SH /{ sh = $2 } sh == "SYNOPSIS"' >"$tmp/lib.synopsis"
norm "$man_dir/libmoeclient.3" | awk '/^\.SH /{ sh = $2 } sh != "SYNOPSIS" && sh != "NAME"' \
	>"$tmp/lib.body"
missing=
for f in $funcs; do
	grep -qE -- "[ *]$f\(" "$tmp/lib.synopsis" && grep -qw -- "$f" "$tmp/lib.body" ||
		missing="$missing $f"
done
if [ "$(echo "$funcs" | grep -c .)" -lt 10 ]; then
	fail "libmoeclient functions: found only $(echo "$funcs" | grep -c .) in moeclient.h"
elif [ -z "$missing" ]; then
	pass "libmoeclient.3: all $(echo "$funcs" | wc -l) exported functions in SYNOPSIS and described"
else
	fail "libmoeclient.3: functions not in SYNOPSIS or not described:$missing"
fi

# --- moed(8): every long option ----------------------------------------------------
{
	if [ -x "$bin/moed" ]; then
		"$bin/moed" --help 2>&1 | grep -o -- '--[a-z][a-z0-9-]*'
	else
		echo "(note: no $bin/moed; options from daemon/server/main.c only)" >&2
	fi
	sed -n '/^static void usage(/,/^}/p' "$src/daemon/server/main.c" | grep -o -- '--[a-z][a-z0-9-]*'
	sed -n 's/.*{"\([a-z][a-z0-9-]*\)", *\(no\|required\|optional\)_argument.*/--\1/p' \
		"$src/daemon/server/main.c"
} | sort -u >"$tmp/moed.opts"
norm "$man_dir/moed.8" >"$tmp/moed.8.norm"
missing=
while read -r o; do
	grep -qE -- "$o([^a-z0-9-]|\$)" "$tmp/moed.8.norm" || missing="$missing $o"
done <"$tmp/moed.opts"
if [ "$(grep -c . "$tmp/moed.opts")" -lt 5 ]; then
	fail "moed options: found only $(grep -c . "$tmp/moed.opts")"
elif [ -z "$missing" ]; then
	pass "moed.8: all $(wc -l <"$tmp/moed.opts") long options of moed: $(tr '\n' ' ' <"$tmp/moed.opts")"
else
	fail "moed.8: long options not named:$missing"
fi

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ] || exit 1
exit 0
