#!/bin/bash
# tests/install_test.sh BUILD_DIR SOURCE_DIR
#
# Installs a built tree into a temporary prefix (cmake --install --prefix)
# and checks what a packager and a third-party developer get:
#   - the installed layout (binaries, library, headers, pkg-config, CMake
#     package, units, sysusers.d/tmpfiles.d, example configuration, man
#     pages)
#   - systemd-analyze verify of moed.service and moed.socket, and that the
#     units name the prefix's binaries; as root, the sysusers.d/tmpfiles.d
#     snippets applied to an empty root directory
#   - a program built with pkg-config against the prefix runs
#   - the same program built with find_package(moeclient) runs
#   - libmoeclient's SONAME is libmoeclient.so.1 and it exports only moe_*
#
# Prints "N passed, N failed"; exits 1 on any failure, 77 (skipped) when
# systemd-analyze is missing and everything else passed, else 0.
set -u

if [ $# -ne 2 ]; then
	echo "usage: $0 BUILD_DIR SOURCE_DIR" >&2
	exit 2
fi
build=$(cd "$1" && pwd) || exit 2
src=$(cd "$2" && pwd) || exit 2
consumer_src=$src/tests/install_consumer

tmp=$(mktemp -d "${TMPDIR:-/tmp}/moed-install.XXXXXX") || exit 1
trap 'rm -rf "$tmp"' EXIT
prefix=$tmp/prefix

passed=0
failed=0
skipped=0
pass() { echo "PASS: $*"; passed=$((passed + 1)); }
fail() { echo "FAIL: $*"; failed=$((failed + 1)); }
skip() { echo "SKIPPED: $*"; skipped=$((skipped + 1)); }
# Prints a command's output indented, for a failure's context.
show() { sed 's/^/    /' "$1"; }

finish() {
	if [ "$skipped" -gt 0 ]; then
		echo "$passed passed, $failed failed, $skipped skipped"
	else
		echo "$passed passed, $failed failed"
	fi
	[ "$failed" -eq 0 ] || exit 1
	[ "$skipped" -eq 0 ] || exit 77
	exit 0
}

# --- install ------------------------------------------------------------------
if cmake --install "$build" --prefix "$prefix" >"$tmp/install.log" 2>&1; then
	pass "cmake --install $build --prefix $prefix"
else
	fail "cmake --install"
	show "$tmp/install.log"
	finish
fi

# The consumers are built like the tree: same C compiler and, for a
# sanitizer build, the same runtime (ASan must be linked into the program
# that loads an instrumented libmoeclient).
cache() { sed -n "s/^$1:[A-Z]*=//p" "$build/CMakeCache.txt"; }
cc=$(cache CMAKE_C_COMPILER)
[ -n "$cc" ] || cc=cc
san=
if [ "$(cache MOE_SANITIZE)" = ON ]; then
	san="-fsanitize=address,undefined"
fi

# libdir as configured (lib, or lib/<multiarch> for the prefix /usr)
lib=$(dirname "$(find "$prefix" -name 'libmoeclient.so.1' -print -quit)")
[ "$lib" != . ] || lib=$prefix/lib
units=$prefix/lib/systemd/system
etcdir=$prefix/etc/moed

missing=
for f in bin/moed bin/moectl bin/moe-mkmodel bin/moe-load bin/moe-bench \
	include/moeclient.h include/moe_errors.h include/moe_admin.h \
	lib/systemd/system/moed.service lib/systemd/system/moed.socket \
	lib/sysusers.d/moed.conf lib/tmpfiles.d/moed.conf \
	etc/moed/moe.yaml.example share/doc/moed/README.md \
	share/man/man1/moectl.1 share/man/man3/libmoeclient.3 \
	share/man/man5/moe.yaml.5 share/man/man8/moed.8; do
	[ -e "$prefix/$f" ] || missing="$missing $f"
done
for f in libmoeclient.so libmoeclient.so.1 pkgconfig/moeclient.pc \
	cmake/moeclient/moeclientConfig.cmake cmake/moeclient/moeclientConfigVersion.cmake \
	cmake/moeclient/moeclientTargets.cmake; do
	[ -e "$lib/$f" ] || missing="$missing ${lib#"$prefix"/}/$f"
done
if [ -z "$missing" ]; then
	pass "installed layout"
else
	fail "installed layout: missing$missing"
	(cd "$prefix" && find . -type f -o -type l | sort | sed 's/^/    /')
fi

# --- (a) systemd units -------------------------------------------------------
if grep -n '@[A-Za-z_]*@' "$units/moed.service" "$units/moed.socket" >"$tmp/subst.log" 2>&1; then
	fail "units: unsubstituted @VARIABLES@"
	show "$tmp/subst.log"
elif ! grep -qxF "ExecStart=$prefix/bin/moed -c $etcdir/moe.yaml" "$units/moed.service" ||
	! grep -qxF "ExecReload=+$prefix/bin/moectl reload-config --wait" "$units/moed.service"; then
	fail "moed.service does not run the prefix's binaries"
	grep -n '^Exec' "$units/moed.service" | sed 's/^/    /'
else
	pass "units name $prefix/bin/moed, $prefix/bin/moectl and $etcdir/moe.yaml"
fi

if ! command -v systemd-analyze >/dev/null 2>&1; then
	skip "systemd-analyze verify (no systemd-analyze on this host)"
else
	# Verify both together: moed.service Requires= moed.socket, found next
	# to it. Any message is a finding (it exits 0 on some warnings).
	if SYSTEMD_LOG_LEVEL=notice systemd-analyze verify --man=no \
		"$units/moed.socket" "$units/moed.service" >"$tmp/verify.log" 2>&1 &&
		! grep -q . "$tmp/verify.log"; then
		pass "systemd-analyze verify moed.socket moed.service"
	else
		fail "systemd-analyze verify moed.socket moed.service"
		show "$tmp/verify.log"
	fi
fi

# sysusers.d and tmpfiles.d snippets, applied to an empty root (needs root:
# tmpfiles chowns). Not counted as skipped otherwise.
if [ "$(id -u)" -ne 0 ] || ! command -v systemd-sysusers >/dev/null 2>&1 ||
	! command -v systemd-tmpfiles >/dev/null 2>&1; then
	echo "(not checked: sysusers.d/tmpfiles.d snippets; needs root and systemd-sysusers/-tmpfiles)"
else
	root=$tmp/root
	mkdir -p "$root/etc" "$root/usr/lib/sysusers.d" "$root/usr/lib/tmpfiles.d"
	cp "$prefix/lib/sysusers.d/moed.conf" "$root/usr/lib/sysusers.d/"
	cp "$prefix/lib/tmpfiles.d/moed.conf" "$root/usr/lib/tmpfiles.d/"
	if systemd-sysusers --root="$root" >"$tmp/sysusers.log" 2>&1 &&
		systemd-tmpfiles --root="$root" --create >>"$tmp/sysusers.log" 2>&1 &&
		uid=$(awk -F: '$1 == "moed" { print $3 }' "$root/etc/passwd") &&
		gid=$(awk -F: '$1 == "moe" { print $3 }' "$root/etc/group") &&
		[ -n "$uid" ] && [ -n "$gid" ] &&
		grep -q '^moed:[^:]*:[0-9]*:'"$gid"':.*:/var/lib/moed:' "$root/etc/passwd" &&
		[ "$(stat -c %u:%g:%a "$root/var/lib/moed")" = "$uid:$gid:750" ]; then
		pass "sysusers.d: user moed in group moe; tmpfiles.d: /var/lib/moed moed:moe 0750"
	else
		fail "sysusers.d/tmpfiles.d snippets"
		show "$tmp/sysusers.log"
		cat "$root/etc/passwd" "$root/etc/group" 2>&1 | sed 's/^/    /'
	fi
fi

# --- (b) a program built with pkg-config -------------------------------------
pcdir=$lib/pkgconfig
if ! command -v pkg-config >/dev/null 2>&1; then
	fail "pkg-config: not installed"
elif ! flags=$(PKG_CONFIG_PATH=$pcdir PKG_CONFIG_LIBDIR=$pcdir pkg-config --cflags --libs moeclient 2>"$tmp/pc.log"); then
	fail "pkg-config --cflags --libs moeclient"
	show "$tmp/pc.log"
else
	want="-I$prefix/include -L$lib -lmoeclient"
	# shellcheck disable=SC2086 # normalizes the blanks of pkg-config's output
	set -- $flags
	# shellcheck disable=SC2086 # word splitting of $flags and $san is intended
	if [ "$*" != "$want" ]; then
		fail "pkg-config moeclient: '$flags', expected '$want'"
	elif ! "$cc" -std=c11 -Wall -Wextra -Werror $san -o "$tmp/consumer-pc" \
		"$consumer_src/main.c" $flags >"$tmp/cc.log" 2>&1; then
		fail "cc main.c \$(pkg-config --cflags --libs moeclient)"
		show "$tmp/cc.log"
	elif ! LD_LIBRARY_PATH=$lib "$tmp/consumer-pc" >"$tmp/run-pc.log" 2>&1; then
		fail "pkg-config-built consumer"
		show "$tmp/run-pc.log"
	else
		pass "pkg-config ($want): $(cat "$tmp/run-pc.log")"
	fi
fi

# --- (c) the same program built with find_package(moeclient) -----------------
if ! cmake -S "$consumer_src" -B "$tmp/consumer-build" -DCMAKE_PREFIX_PATH="$prefix" \
	-DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF -DCMAKE_C_COMPILER="$cc" \
	-DCMAKE_C_FLAGS="-Wall -Wextra -Werror $san" -DCMAKE_EXE_LINKER_FLAGS="$san" \
	>"$tmp/cmake.log" 2>&1 ||
	! cmake --build "$tmp/consumer-build" >>"$tmp/cmake.log" 2>&1; then
	fail "find_package(moeclient) consumer: configure/build"
	show "$tmp/cmake.log"
elif dir=$(sed -n 's/^moeclient_DIR:PATH=//p' "$tmp/consumer-build/CMakeCache.txt") &&
	[ "$dir" != "$lib/cmake/moeclient" ]; then
	fail "find_package(moeclient) found $dir, not $lib/cmake/moeclient"
elif ! LD_LIBRARY_PATH=$lib "$tmp/consumer-build/consumer" >"$tmp/run-cmake.log" 2>&1; then
	fail "find_package(moeclient)-built consumer"
	show "$tmp/run-cmake.log"
else
	pass "find_package(moeclient) + moeclient::moeclient: $(cat "$tmp/run-cmake.log")"
fi

# --- (d) the shared library ------------------------------------------------
soname=$(readelf -d "$lib/libmoeclient.so" 2>/dev/null | sed -n 's/.*(SONAME).*\[\(.*\)\].*/\1/p')
if [ "$soname" = libmoeclient.so.1 ]; then
	pass "SONAME $soname"
else
	fail "SONAME '$soname', expected libmoeclient.so.1"
fi
if command -v nm >/dev/null 2>&1; then
	other=$(nm -D --defined-only "$lib/libmoeclient.so.1" | awk '{print $NF}' | grep -v '^moe_' | tr '\n' ' ')
	if [ -z "$other" ] && nm -D --defined-only "$lib/libmoeclient.so.1" | grep -q ' moe_connect$'; then
		pass "libmoeclient exports only moe_* symbols"
	else
		fail "libmoeclient exports symbols outside moe_*: $other"
	fi
fi

finish
