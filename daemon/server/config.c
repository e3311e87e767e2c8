// SPDX-License-Identifier: MIT
/*
 * config.c - parse moe.yaml with libyaml's event API.
 *
 * The file is read as a stream of events and checked against one static
 * table of keys (cfg_keys[] in config_keys.c): its path, how to parse it,
 * where it is stored, its range, and whether the feature behind it exists
 * yet. The event API (rather than libyaml's document tree) lets us refuse
 * anchors, aliases and tags where they appear and stop at the first error,
 * without ever building or walking a tree that hostile input could make deep.
 *
 * This file walks the event stream and holds the public API; the rest is
 * split by concept over config_internal.h: config_keys.c (the key table),
 * config_values.c (the value parsers), config_scalar.c (scalars and node
 * checks), config_messages.c (error messages).
 */
#include "daemon/server/config_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* ------------------------------------------------------------------------ */
/* Events                                                                   */
/* ------------------------------------------------------------------------ */

/* The first byte of the character at @mark (libyaml counts characters). */
static int char_at(const struct cfg_parser *p, yaml_mark_t mark)
{
	size_t i = 0, line = 0, col = 0;

	while (i < p->len && line < mark.line)
		if (p->buf[i++] == '\n')
			line++;
	for (; i < p->len && p->buf[i] != '\n'; i++) {
		if ((p->buf[i] & 0xc0) == 0x80)
			continue;
		if (col++ == mark.column)
			return p->buf[i];
	}
	return -1;
}

/* Turn libyaml's error into "NAME:LINE:COLUMN: YAML syntax error: ...". */
static int syntax_error(struct cfg_parser *p)
{
	const yaml_parser_t *y = &p->yaml;
	const char *problem = y->problem ? y->problem : "unknown error";
	yaml_mark_t mark = y->problem_mark;
	size_t i;

	if (y->error == YAML_MEMORY_ERROR)
		return -ENOMEM;
	if (y->error == YAML_READER_ERROR) {
		/* The reader only knows a byte offset: count lines and
		 * characters up to it. */
		memset(&mark, 0, sizeof(mark));
		for (i = 0; i < y->problem_offset && i < p->len; i++) {
			if (p->buf[i] == '\n') {
				mark.line++;
				mark.column = 0;
			} else if ((p->buf[i] & 0xc0) != 0x80) {
				mark.column++;
			}
		}
		return cfg_error(p, mark, NULL, "invalid input: %s (byte 0x%02x)", problem,
		                 (unsigned int)y->problem_value & 0xff);
	}
	if (char_at(p, mark) == '\t')
		return cfg_error(p, mark, NULL,
		                 "YAML syntax error: %s (a tab: YAML indents with spaces only)",
		                 problem);
	if (y->context)
		return cfg_error(p, mark, NULL, "YAML syntax error: %s (%s at line %zu column %zu)",
		                 problem, y->context, y->context_mark.line + 1,
		                 y->context_mark.column + 1);
	return cfg_error(p, mark, NULL, "YAML syntax error: %s", problem);
}

/* The next event; on success the caller owns it (yaml_event_delete). */
int cfg_next_event(struct cfg_parser *p, yaml_event_t *ev)
{
	return yaml_parser_parse(&p->yaml, ev) ? 0 : syntax_error(p);
}

/* Read one event that libyaml's grammar promises is of @type. */
static int expect_event(struct cfg_parser *p, yaml_event_type_t type)
{
	yaml_event_t ev;
	int rc = cfg_next_event(p, &ev);

	if (rc)
		return rc;
	if (ev.type != type)
		rc = cfg_error(p, ev.start_mark, NULL, "unexpected YAML event %d", (int)ev.type);
	yaml_event_delete(&ev);
	return rc;
}

/* ------------------------------------------------------------------------ */
/* Structure: the stream, the top-level mapping, the sections               */
/* ------------------------------------------------------------------------ */

static int unknown_key(struct cfg_parser *p, const char *sec, const yaml_event_t *key)
{
	char echo[CFG_ECHO_LEN], valid[256];

	cfg_list_keys(valid, sizeof(valid), sec);
	cfg_echo(echo, cfg_scalar(key), key->data.scalar.length);
	if (!echo[0])
		snprintf(echo, sizeof(echo), "\"\"");
	return cfg_error(p, key->start_mark, NULL, "%s%s%s: unknown key (expected one of: %s)",
	                 sec ? sec : "", sec ? "." : "", echo, valid);
}

/* The value of table key @idx, whose key node was @key. */
static int parse_value(struct cfg_parser *p, int idx, const yaml_event_t *key)
{
	const struct cfg_key *k = &cfg_keys[idx];
	yaml_event_t ev;
	int rc;

	if (p->seen_key[idx])
		return cfg_error(p, key->start_mark, k->path, "duplicate key");
	p->seen_key[idx] = true;
	rc = cfg_next_event(p, &ev);
	if (rc)
		return rc;
	rc = cfg_check_node(p, &ev, k->path);
	if (!rc)
		rc = k->parse(p, k, &ev, (char *)p->c + k->offset);
	yaml_event_delete(&ev);
	if (!rc && !k->supported)
		rc = cfg_error(p, key->start_mark, k->path, "not supported yet");
	return rc;
}

static int parse_mapping(struct cfg_parser *p, const char *sec);

/* A section: a mapping of its keys; an empty one (null) is allowed. */
static int parse_section(struct cfg_parser *p, int idx, const yaml_event_t *key)
{
	char sec[32];
	yaml_event_t ev;
	int rc;

	snprintf(sec, sizeof(sec), "%.*s", (int)strcspn(cfg_keys[idx].path, "."),
	         cfg_keys[idx].path);
	if (p->seen_section[idx])
		return cfg_error(p, key->start_mark, sec, "duplicate key");
	p->seen_section[idx] = true;
	if (!strcmp(sec, "model")) {
		p->model_mark = key->start_mark;
		p->have_model = true;
	}
	rc = cfg_next_event(p, &ev);
	if (rc)
		return rc;
	rc = cfg_check_node(p, &ev, sec);
	if (!rc && ev.type == YAML_MAPPING_START_EVENT)
		rc = parse_mapping(p, sec);
	else if (!rc && !cfg_is_null(&ev))
		rc = cfg_bad_value(p, sec, &ev, "a mapping");
	yaml_event_delete(&ev);
	return rc;
}

static int parse_pair(struct cfg_parser *p, const char *sec, const yaml_event_t *key)
{
	char got[CFG_DESCRIBE_LEN];
	const char *name;
	size_t len;
	int idx;

	if (key->type != YAML_SCALAR_EVENT)
		return cfg_error(p, key->start_mark, sec, "expected a key, got %s",
		                 cfg_describe(got, sizeof(got), key));
	name = cfg_scalar(key);
	len = key->data.scalar.length;
	idx = cfg_find_key(sec, name, len);
	if (idx >= 0)
		return parse_value(p, idx, key);
	idx = sec ? -1 : cfg_find_section(name, len);
	if (idx >= 0)
		return parse_section(p, idx, key);
	return unknown_key(p, sec, key);
}

/* The pairs of a mapping whose start has been read; @sec NULL: top level. */
static int parse_mapping(struct cfg_parser *p, const char *sec)
{
	yaml_event_t key;
	int rc;

	for (;;) {
		rc = cfg_next_event(p, &key);
		if (rc)
			return rc;
		if (key.type == YAML_MAPPING_END_EVENT)
			break;
		rc = cfg_check_node(p, &key, sec);
		if (!rc)
			rc = parse_pair(p, sec, &key);
		yaml_event_delete(&key);
		if (rc)
			return rc;
	}
	yaml_event_delete(&key);
	return 0;
}

static int parse_root(struct cfg_parser *p, const yaml_event_t *ev)
{
	char got[CFG_DESCRIBE_LEN];
	int rc;

	rc = cfg_check_node(p, ev, NULL);
	if (rc)
		return rc;
	if (cfg_is_null(ev)) /* "---" and nothing else */
		return cfg_error(p, (yaml_mark_t){0}, NULL,
		                 "empty configuration: model.path is required");
	if (ev->type != YAML_MAPPING_START_EVENT)
		return cfg_error(p, ev->start_mark, NULL, "expected a mapping at top level, got %s",
		                 cfg_describe(got, sizeof(got), ev));
	p->root_mark = ev->start_mark;
	return parse_mapping(p, NULL);
}

/* One document holding one mapping; anything else is refused. */
static int parse_stream(struct cfg_parser *p)
{
	yaml_event_t ev;
	int rc;

	rc = expect_event(p, YAML_STREAM_START_EVENT);
	if (rc)
		return rc;
	rc = cfg_next_event(p, &ev);
	if (rc)
		return rc;
	if (ev.type == YAML_STREAM_END_EVENT) /* nothing, or only comments */
		rc = cfg_error(p, (yaml_mark_t){0}, NULL,
		               "empty configuration: model.path is required");
	yaml_event_delete(&ev);
	if (rc)
		return rc;
	rc = cfg_next_event(p, &ev);
	if (rc)
		return rc;
	rc = parse_root(p, &ev);
	yaml_event_delete(&ev);
	if (rc)
		return rc;
	rc = expect_event(p, YAML_DOCUMENT_END_EVENT);
	if (rc)
		return rc;
	rc = cfg_next_event(p, &ev);
	if (rc)
		return rc;
	if (ev.type != YAML_STREAM_END_EVENT)
		rc = cfg_error(p, ev.start_mark, NULL, "only one YAML document is allowed");
	yaml_event_delete(&ev);
	if (rc)
		return rc;
	if (!p->c->model.path)
		return cfg_error(p, p->have_model ? p->model_mark : p->root_mark, "model.path",
		                 "required");
	return 0;
}

/* ------------------------------------------------------------------------ */
/* API                                                                      */
/* ------------------------------------------------------------------------ */

int moe_cfg_defaults(struct moe_config *c)
{
	memset(c, 0, sizeof(*c));
	c->devices.kind = MOE_CFG_DEV_CPU;
	c->devices.n_ranks = 1;
	c->cpu.threads = 0;
	c->cpu.isa = MOE_CFG_ISA_AUTO;
	c->placement.spare_slots = 0;
	c->placement.auto_rebalance = false;
	c->placement.rebalance_threshold = 1.5;
	c->placement.rebalance_interval_s = 60;
	c->placement.stats_window_s = 60;
	c->reload.max_staging_bytes = 0;
	c->reload.keep_previous = true;
	c->reload.bytes_per_s = 0;
	c->scheduler.max_batch_tokens = 4096;
	c->scheduler.batch_window_us = 200;
	c->scheduler.max_queue_requests = 4096;
	c->scheduler.request_timeout_ms = 30000;
	c->server.socket_mode = 0660;
	c->server.max_clients = 64;
	c->server.max_client_shm_bytes = 1ULL << 30;
	c->server.max_inflight_requests = 256;
	c->server.max_inflight_tokens = 65536;
	c->server.handshake_timeout_ms = 5000;
	c->log.level = MOE_CFG_LOG_INFO;
	c->server.socket = strdup(MOE_CFG_DEFAULT_SOCKET);
	c->server.group = strdup("");
	c->server.admin_group = strdup("");
	c->metrics.listen = strdup("");
	c->metrics.slo_p99_ms = 250;
	if (!c->server.socket || !c->server.group || !c->server.admin_group || !c->metrics.listen)
		return -ENOMEM;
	return 0;
}

void moe_cfg_free(struct moe_config *c)
{
	if (!c)
		return;
	free(c->path);
	free(c->model.path);
	free(c->model.family);
	free(c->server.socket);
	free(c->server.group);
	free(c->server.admin_group);
	free(c->metrics.listen);
	memset(c, 0, sizeof(*c));
}

int moe_cfg_load_string(const char *name, const char *yaml, size_t len, struct moe_config *c,
                        char *err, size_t errlen)
{
	struct cfg_parser p;
	int rc;

	memset(&p, 0, sizeof(p));
	p.name = name ? name : "<string>";
	p.buf = (const unsigned char *)(yaml ? yaml : "");
	p.len = yaml ? len : 0;
	p.c = c;
	p.err = err;
	p.errlen = errlen;
	if (err && errlen)
		err[0] = '\0';
	rc = moe_cfg_defaults(c);
	if (rc)
		goto out_nomem;
	if (p.len > MOE_CFG_MAX_FILE_BYTES) {
		cfg_msg(err, errlen, "%s: too large (%zu bytes, at most %u)", p.name, p.len,
		        MOE_CFG_MAX_FILE_BYTES);
		rc = -EFBIG;
		goto out_free_cfg;
	}
	if (!yaml_parser_initialize(&p.yaml))
		goto out_nomem;
	yaml_parser_set_input_string(&p.yaml, p.buf, p.len);
	yaml_parser_set_encoding(&p.yaml, YAML_UTF8_ENCODING);
	rc = parse_stream(&p);
	yaml_parser_delete(&p.yaml);
	if (rc == -ENOMEM)
		goto out_nomem;
	if (rc)
		goto out_free_cfg;
	return 0;

out_nomem:
	cfg_msg(err, errlen, "%s: out of memory", p.name);
	rc = -ENOMEM;
out_free_cfg:
	moe_cfg_free(c);
	return rc;
}

/* All of @file into a new *@buf, refusing what is not a regular file of sane size. */
static int read_file(const char *file, char **buf, size_t *len, char *err, size_t errlen)
{
	struct stat st;
	size_t got = 0, cap;
	ssize_t n;
	int fd, rc;

	/* O_NONBLOCK: a FIFO named by mistake must not hang the daemon. */
	fd = open(file, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
	if (fd < 0) {
		rc = -errno;
		cfg_msg(err, errlen, "%s: cannot open: %s", file, strerror(-rc));
		return rc;
	}
	if (fstat(fd, &st)) {
		rc = -errno;
		cfg_msg(err, errlen, "%s: cannot stat: %s", file, strerror(-rc));
		goto out_close;
	}
	if (!S_ISREG(st.st_mode)) {
		cfg_msg(err, errlen, "%s: not a regular file", file);
		rc = S_ISDIR(st.st_mode) ? -EISDIR : -EINVAL;
		goto out_close;
	}
	if (st.st_size > MOE_CFG_MAX_FILE_BYTES) {
		cfg_msg(err, errlen, "%s: too large (%lld bytes, at most %u)", file,
		        (long long)st.st_size, MOE_CFG_MAX_FILE_BYTES);
		rc = -EFBIG;
		goto out_close;
	}
	/* One byte more than its size, to notice a file that grows while we
	 * read it: half of an edit is not a configuration. */
	cap = (size_t)st.st_size + 1;
	*buf = malloc(cap);
	if (!*buf) {
		cfg_msg(err, errlen, "%s: out of memory", file);
		rc = -ENOMEM;
		goto out_close;
	}
	while (got < cap) {
		n = read(fd, *buf + got, cap - got);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			rc = -errno;
			cfg_msg(err, errlen, "%s: cannot read: %s", file, strerror(-rc));
			goto out_free_buf;
		}
		if (n == 0)
			break;
		got += (size_t)n;
	}
	if (got == cap) {
		cfg_msg(err, errlen, "%s: changed while being read", file);
		rc = -EAGAIN;
		goto out_free_buf;
	}
	*len = got;
	close(fd);
	return 0;

out_free_buf:
	free(*buf);
	*buf = NULL;
out_close:
	close(fd);
	return rc;
}

/* A relative model.path means: next to the configuration file. */
static int resolve_model_path(struct moe_config *c, const char *file)
{
	const char *slash = strrchr(file, '/');
	size_t dirlen, plen;
	char *full;

	if (c->model.path[0] == '/' || !slash)
		return 0;
	dirlen = (size_t)(slash - file);
	plen = strlen(c->model.path);
	full = malloc(dirlen + 1 + plen + 1);
	if (!full)
		return -ENOMEM;
	memcpy(full, file, dirlen);
	full[dirlen] = '/';
	memcpy(full + dirlen + 1, c->model.path, plen + 1);
	free(c->model.path);
	c->model.path = full;
	return 0;
}

int moe_cfg_load_file(const char *file, struct moe_config *c, char *err, size_t errlen)
{
	char *buf = NULL;
	size_t len = 0;
	int rc;

	memset(c, 0, sizeof(*c));
	if (err && errlen)
		err[0] = '\0';
	rc = read_file(file, &buf, &len, err, errlen);
	if (rc)
		return rc;
	rc = moe_cfg_load_string(file, buf, len, c, err, errlen);
	free(buf);
	if (rc)
		return rc;
	c->path = strdup(file);
	if (!c->path || resolve_model_path(c, file)) {
		cfg_msg(err, errlen, "%s: out of memory", file);
		moe_cfg_free(c);
		return -ENOMEM;
	}
	return 0;
}
