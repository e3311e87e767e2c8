/* SPDX-License-Identifier: MIT */
/* daemon/server/config_internal.h — what the files of the moe.yaml parser share: the
 * key table's and the parser's structs, and the functions one file calls in another
 * (prefixed cfg_). Not for use outside daemon/server/config*.c.
 */
#ifndef MOE_DAEMON_CONFIG_INTERNAL_H
#define MOE_DAEMON_CONFIG_INTERNAL_H

#include "daemon/server/config.h"

#include <stdbool.h>
#include <stddef.h>
#include <yaml.h>

#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

/* How much of a user's text is echoed back in a message. */
#define CFG_ECHO_MAX 48
#define CFG_ECHO_LEN (CFG_ECHO_MAX + 4)

#define CFG_DESCRIBE_LEN (CFG_ECHO_LEN + 32)

struct cfg_parser;

struct cfg_key {
	const char *path; /* "section.key", or "key" at the top level */
	int (*parse)(struct cfg_parser *p, const struct cfg_key *k, const yaml_event_t *ev,
	             void *field);
	size_t offset;            /* of the field in struct moe_config */
	size_t size;              /* of that field */
	long long min, max;       /* integers, sizes, modes; string lengths */
	double fmin, fmax;        /* numbers: fmin < v <= fmax */
	const char *const *names; /* enums, and strings that must be one of */
	const int *values;        /* enum value of each name */
	bool supported;           /* false: refused with "not supported yet" */
	bool reload;              /* applies on a configuration reload; false:
	                             a change needs a restart */
};

struct cfg_parser {
	yaml_parser_t yaml;
	const char *name; /* the file name in messages */
	const unsigned char *buf;
	size_t len;
	struct moe_config *c;
	char *err;
	size_t errlen;
	bool seen_key[64];      /* by index in cfg_keys: duplicate keys */
	bool seen_section[64];  /* by index of a section's first key */
	yaml_mark_t root_mark;  /* where "model.path: required" points... */
	yaml_mark_t model_mark; /* ...or here, when there is a model: section */
	bool have_model;
};

typedef int cfg_parse_fn(struct cfg_parser *p, const struct cfg_key *k, const yaml_event_t *ev,
                         void *field);

/* config_keys.c: the table of keys and lookups in it */
extern const struct cfg_key cfg_keys[];
int cfg_find_key(const char *sec, const char *key, size_t len);
int cfg_find_section(const char *key, size_t len);
void cfg_list_keys(char *buf, size_t size, const char *sec);

/* config_messages.c */
void cfg_msg(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
int cfg_error(struct cfg_parser *p, yaml_mark_t mark, const char *path, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
const char *cfg_echo(char buf[CFG_ECHO_LEN], const char *s, size_t len);
void cfg_one_of(char *buf, size_t size, const char *const *names);

/* config_scalar.c */
const char *cfg_scalar(const yaml_event_t *ev);
bool cfg_is_plain(const yaml_event_t *ev);
bool cfg_is_null(const yaml_event_t *ev);
int cfg_scan_int(const char *v, long long *out);
int cfg_scan_number(const char *v, double *out);
const char *cfg_describe(char *buf, size_t size, const yaml_event_t *ev);
int cfg_bad_value(struct cfg_parser *p, const char *path, const yaml_event_t *ev,
                  const char *expected);
int cfg_check_node(struct cfg_parser *p, const yaml_event_t *ev, const char *path);

/* config_values.c: one parser per kind of key in cfg_keys[] */
cfg_parse_fn cfg_parse_listen, cfg_parse_uint, cfg_parse_bool, cfg_parse_number, cfg_parse_string, cfg_parse_enum,
    cfg_parse_size, cfg_parse_mode, cfg_parse_devices;

/* config.c: the event stream */
int cfg_next_event(struct cfg_parser *p, yaml_event_t *ev);

#endif /* MOE_DAEMON_CONFIG_INTERNAL_H */
