/* client/moectl.h — what moectl's files share: exit codes, the socket, the
 * helpers for connecting, failing, numbers and status JSON. */
#ifndef MOECTL_H
#define MOECTL_H

#include <cjson/cJSON.h>
#include <stdint.h>
#include <stdio.h>

#include "client/include/moeclient.h"

#define EXIT_OK	    0
#define EXIT_ERR    1
#define EXIT_USAGE  2
#define EXIT_DAEMON 3

extern const char *socket_path; /* NULL: the library's default */

void usage(FILE *f);
int exit_for(int r);
int fail(int r, const char *what);
int connect_or_complain(moe_client **c);
int parse_u32(const char *s, uint32_t *v);
double num(const cJSON *o, const char *k);
/* The string at k, or "-". */
const char *str(const cJSON *o, const char *k);
const cJSON *obj(const cJSON *o, const char *k);
void print_job(const struct moe_admin_job *j);

/* moectl_placement.c */
int cmd_placement(int argc, char **argv);
int cmd_replicate(int argc, char **argv, uint32_t op);
int cmd_rebalance(int argc, char **argv);

/* moectl_top.c */
int cmd_top(int argc, char **argv);

/* moectl_trace.c */
int cmd_trace(int argc, char **argv);

/* moectl_reload.c */
int cmd_reload(int argc, char **argv);
void print_weights(const cJSON *weights);

#endif
