# Installation (GNUInstallDirs), included from the top-level CMakeLists.txt:
#   bin/       moed, moectl and the tools
#   lib/       libmoeclient.so.0 (+ the .so link), pkgconfig/moeclient.pc,
#              cmake/moeclient/ (find_package(moeclient) -> moeclient::moeclient)
#   include/   moeclient.h, moe_errors.h
#   etc/moed/  moe.yaml.example (/etc/moed for the prefix /usr)
#   share/doc/moed/  README.md, moe.yaml.example
#   share/man/   moed(8), moectl(1), moe.yaml(5), libmoeclient(3)
#   lib/systemd/system/  moed.service, moed.socket
#   lib/sysusers.d/moed.conf, lib/tmpfiles.d/moed.conf
#
# Files that name install paths (the units, moeclient.pc) are generated at
# install time from the prefix they are installed to, so
# `cmake --install build --prefix P` gives units that run P/bin/moed.
# DESTDIR= is honoured as usual (packaging).

include(CMakePackageConfigHelpers)

option(MOE_INSTALL_SYSTEMD "Install the systemd units, sysusers.d and tmpfiles.d snippets" ON)
# Relative paths are relative to CMAKE_INSTALL_PREFIX (at install time);
# absolute ones are used as they are. Not CMAKE_INSTALL_LIBDIR: systemd looks
# in <prefix>/lib/... whatever the multiarch library directory is.
set(MOE_SYSTEMD_UNITDIR "lib/systemd/system" CACHE STRING
	"Where moed.service and moed.socket go (relative: under CMAKE_INSTALL_PREFIX)")
set(MOE_SYSUSERSDIR "lib/sysusers.d" CACHE STRING
	"Where the sysusers.d snippet goes (relative: under CMAKE_INSTALL_PREFIX)")
set(MOE_TMPFILESDIR "lib/tmpfiles.d" CACHE STRING
	"Where the tmpfiles.d snippet goes (relative: under CMAKE_INSTALL_PREFIX)")

set(_moe_stage ${PROJECT_BINARY_DIR}/install-configured)

# --- Binaries --------------------------------------------------------------
install(TARGETS moed moectl moe-mkmodel moe-bench moe-load RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})

# --- libmoeclient: library, headers, CMake package, pkg-config -------------
install(TARGETS moeclient EXPORT moeclientTargets
	LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
	INCLUDES DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(FILES client/include/moeclient.h ipc/moe_errors.h ipc/moe_admin.h
	DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})

install(EXPORT moeclientTargets NAMESPACE moeclient::
	DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/moeclient)
configure_package_config_file(cmake/moeclientConfig.cmake.in
	${PROJECT_BINARY_DIR}/moeclientConfig.cmake
	INSTALL_DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/moeclient)
# SOVERSION 1: every 1.x release keeps the ABI.
write_basic_package_version_file(${PROJECT_BINARY_DIR}/moeclientConfigVersion.cmake
	VERSION ${MOECLIENT_VERSION} COMPATIBILITY SameMajorVersion)
install(FILES ${PROJECT_BINARY_DIR}/moeclientConfig.cmake
	${PROJECT_BINARY_DIR}/moeclientConfigVersion.cmake
	DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/moeclient)

# --- Install-time configuration ----------------------------------------------
# Runs inside cmake_install.cmake, where CMAKE_INSTALL_PREFIX is the prefix
# being installed to. It computes the absolute directories the way
# GNUInstallDirs does (prefix /usr -> /etc, /opt/P -> /etc/opt/P, / -> /etc
# for the configuration directory), generates the units and moeclient.pc
# into ${_moe_stage}, and installs the example configuration to
# <sysconfdir>/moed (an absolute path, hence file(INSTALL), which honours
# DESTDIR and the install manifest).
install(CODE "
set(_moe_src [[${PROJECT_SOURCE_DIR}]])
set(_moe_stage [[${_moe_stage}]])
set(_moe_version [[${PROJECT_VERSION}]])
set(_moe_systemd [[${MOE_INSTALL_SYSTEMD}]])
set(_moe_dirs
	BINDIR [[${CMAKE_INSTALL_BINDIR}]]
	SYSCONFDIR [[${CMAKE_INSTALL_SYSCONFDIR}]]
	DOCDIR [[${CMAKE_INSTALL_DOCDIR}]]
	LIBDIR [[${CMAKE_INSTALL_LIBDIR}]]
	INCLUDEDIR [[${CMAKE_INSTALL_INCLUDEDIR}]])
")
install(CODE [[
function(_moe_install_configure)
	set(prefix "${CMAKE_INSTALL_PREFIX}")
	string(REGEX REPLACE "(.)/+$" "\\1" prefix "${prefix}")
	set(PROJECT_VERSION "${_moe_version}")
	set(CMAKE_INSTALL_PREFIX "${prefix}")
	list(LENGTH _moe_dirs n)
	math(EXPR last "${n} - 1")
	foreach(i RANGE 0 ${last} 2)
		math(EXPR j "${i} + 1")
		list(GET _moe_dirs ${i} name)
		list(GET _moe_dirs ${j} rel)
		if(IS_ABSOLUTE "${rel}")
			set(full "${rel}")
		elseif(name STREQUAL "SYSCONFDIR" AND prefix MATCHES "^/usr$")
			set(full "/${rel}")
		elseif(name STREQUAL "SYSCONFDIR" AND prefix MATCHES "^/opt/(.*)")
			set(full "/${rel}/opt/${CMAKE_MATCH_1}")
		elseif(prefix STREQUAL "/")
			set(full "/${rel}")
		else()
			set(full "${prefix}/${rel}")
		endif()
		set(CMAKE_INSTALL_FULL_${name} "${full}")
		# moeclient.pc: libdir/includedir relative to ${prefix} when they
		# are under it, so pkg-config --define-prefix can relocate them.
		if(NOT IS_ABSOLUTE "${rel}" AND NOT prefix STREQUAL "/")
			set(MOE_PC_${name} "\${prefix}/${rel}")
		else()
			set(MOE_PC_${name} "${full}")
		endif()
	endforeach()

	set(CMAKE_INSTALL_FULL_LIBDIR "${MOE_PC_LIBDIR}")
	set(CMAKE_INSTALL_FULL_INCLUDEDIR "${MOE_PC_INCLUDEDIR}")
	configure_file("${_moe_src}/client/moeclient.pc.in" "${_moe_stage}/moeclient.pc" @ONLY)
	if(_moe_systemd)
		configure_file("${_moe_src}/systemd/moed.service.in" "${_moe_stage}/moed.service" @ONLY)
		configure_file("${_moe_src}/systemd/moed.socket.in" "${_moe_stage}/moed.socket" @ONLY)
	endif()
	set(_moe_sysconfdir "${CMAKE_INSTALL_FULL_SYSCONFDIR}" PARENT_SCOPE)
endfunction()
_moe_install_configure()
# Here, not in the function: file(INSTALL) records the file in the install
# manifest of the calling scope.
file(INSTALL DESTINATION "${_moe_sysconfdir}/moed" TYPE FILE
	FILES "${_moe_src}/moe.yaml.example")
]])

install(FILES ${_moe_stage}/moeclient.pc DESTINATION ${CMAKE_INSTALL_LIBDIR}/pkgconfig)

# --- systemd ---------------------------------------------------------------
if(MOE_INSTALL_SYSTEMD)
	install(FILES ${_moe_stage}/moed.service ${_moe_stage}/moed.socket
		DESTINATION ${MOE_SYSTEMD_UNITDIR})
	install(FILES systemd/moed.sysusers.conf DESTINATION ${MOE_SYSUSERSDIR} RENAME moed.conf)
	install(FILES systemd/moed.tmpfiles.conf DESTINATION ${MOE_TMPFILESDIR} RENAME moed.conf)
endif()

# --- Documentation ---------------------------------------------------------
install(FILES README.md moe.yaml.example DESTINATION ${CMAKE_INSTALL_DOCDIR})
# Man pages (docs/man; tests/man_test.sh checks them against the code)
install(FILES docs/man/moectl.1 DESTINATION ${CMAKE_INSTALL_MANDIR}/man1)
install(FILES docs/man/libmoeclient.3 DESTINATION ${CMAKE_INSTALL_MANDIR}/man3)
install(FILES docs/man/moe.yaml.5 DESTINATION ${CMAKE_INSTALL_MANDIR}/man5)
install(FILES docs/man/moed.8 DESTINATION ${CMAKE_INSTALL_MANDIR}/man8)
