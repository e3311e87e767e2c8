// SPDX-License-Identifier: MIT
/*
 * fuzz_config.c - libFuzzer target for the moe.yaml parser.
 *
 * Any input must give 0 or a negative errno with a message, never a crash,
 * a leak or undefined behaviour. Seeds: tests/fuzz/corpus/config/.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "daemon/server/config.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char err[MOE_CFG_ERRLEN];
	struct moe_config c;
	int rc;

	rc = moe_cfg_load_string("fuzz.yaml", (const char *)data, size, &c, err, sizeof(err));
	/* A message is always one NUL-terminated line in the buffer. */
	if (rc && (!memchr(err, '\0', sizeof(err)) || !err[0]))
		__builtin_trap();
	if (!rc && !c.model.path)
		__builtin_trap();
	moe_cfg_free(&c);
	return 0;
}
