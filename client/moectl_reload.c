/* client/moectl_reload.c — moectl's weight commands:
 *
 *   reload [--model PATH] [--layers LIST] [--experts LIST] [--atomic]
 *          [--max-parallel N] [--wait] | --cancel | --rollback [--wait]
 *
 * LIST: numbers and ranges, "0-3,7". The reload is a job in moed (one step
 * per layer, or per layer's named experts, or one for everything with
 * --atomic); --wait returns once it is over, exit 1 with moed's reason if
 * it failed. --model takes a path relative to the current directory too
 * (made absolute here: moed resolves none).
 *
 * And `status`'s weights lines (print_weights).
 */
#include "client/moectl.h"

#include <getopt.h>
#include <limits.h>
#include <unistd.h>
#include <stdlib.h>
#include <string.h>

#include "ipc/moe_admin.h"

/* "0-3,7" into a bitmap of max+1 bits; -1 on a malformed list. */
static int parse_list(const char *s, uint64_t *bits, uint32_t max)
{
	while (*s) {
		char *end;
		unsigned long a = strtoul(s, &end, 10), b = a;

		if (end == s || *s == '-' || a > max)
			return -1;
		s = end;
		if (*s == '-') {
			b = strtoul(++s, &end, 10);
			if (end == s || b > max || b < a)
				return -1;
			s = end;
		}
		for (unsigned long i = a; i <= b; i++)
			bits[i / 64] |= 1ull << (i % 64);
		if (*s == ',')
			s++;
		else if (*s)
			return -1;
	}
	return 0;
}

int cmd_reload(int argc, char **argv)
{
	static const struct option opts[] = {{"model", required_argument, NULL, 'm'},
	                                     {"layers", required_argument, NULL, 'l'},
	                                     {"experts", required_argument, NULL, 'e'},
	                                     {"atomic", no_argument, NULL, 'a'},
	                                     {"max-parallel", required_argument, NULL, 'p'},
	                                     {"wait", no_argument, NULL, 'w'},
	                                     {"cancel", no_argument, NULL, 'c'},
	                                     {"rollback", no_argument, NULL, 'r'},
	                                     {"help", no_argument, NULL, 'h'},
	                                     {NULL, 0, NULL, 0}};
	struct moe_admin_reload *x = calloc(1, sizeof(*x));
	moe_admin_req q = {.op = MOE_ADMIN_RELOAD, .payload = x, .payload_len = sizeof(*x),
	                   .timeout_ms = -1};
	moe_admin_res *res = malloc(sizeof(*res));
	moe_client *c;
	int ch, r, rc;

	if (!x || !res) {
		free(x);
		free(res);
		return fail(MOE_ENOMEM, "reload");
	}
	while ((ch = getopt_long(argc, argv, "m:l:e:ap:wcrh", opts, NULL)) != -1) {
		const char *bad = NULL;

		switch (ch) {
		case 'm': {
			/* absolute as given (moed says if it is missing) */
			char abs[PATH_MAX], cwd[PATH_MAX];
			int n = 0;

			if (realpath(optarg, abs))
				n = snprintf(x->model, sizeof(x->model), "%s", abs);
			else if (optarg[0] == '/')
				n = snprintf(x->model, sizeof(x->model), "%s", optarg);
			else if (getcwd(cwd, sizeof(cwd)))
				n = snprintf(x->model, sizeof(x->model), "%s/%s", cwd, optarg);
			if (n <= 0 || (size_t)n >= sizeof(x->model))
				bad = "--model: the path is too long";
			break;
		}
		case 'l':
			if (parse_list(optarg, x->layers, MOE_RELOAD_MAX_LAYER))
				bad = "--layers: a list of layer numbers and ranges, e.g. 0-3,7";
			break;
		case 'e':
			if (parse_list(optarg, x->experts, MOE_RELOAD_MAX_EXPERT))
				bad = "--experts: a list of expert numbers and ranges, e.g. 0-3,7";
			break;
		case 'a': x->flags |= MOE_RELOAD_ATOMIC; break;
		case 'p':
			if (parse_u32(optarg, &x->max_parallel) || !x->max_parallel ||
			    x->max_parallel > 64)
				bad = "--max-parallel: 1..64";
			break;
		case 'w': q.wait_job = 1; break;
		case 'c': x->flags |= MOE_RELOAD_CANCEL; break;
		case 'r': x->flags |= MOE_RELOAD_ROLLBACK; break;
		case 'h':
			usage(stdout);
			free(x);
			free(res);
			return EXIT_OK;
		default: bad = "";
		}
		if (bad) {
			if (*bad)
				fprintf(stderr, "moectl: reload %s\n", bad);
			usage(stderr);
			free(x);
			free(res);
			return EXIT_USAGE;
		}
	}
	if (optind != argc) {
		usage(stderr);
		free(x);
		free(res);
		return EXIT_USAGE;
	}
	if (x->flags & MOE_RELOAD_CANCEL)
		q.wait_job = 0; /* (the cancelled job's end goes to its own session) */
	rc = connect_or_complain(&c);
	if (rc) {
		free(x);
		free(res);
		return rc;
	}
	r = moe_admin_call(c, &q, res);
	if (r) {
		fprintf(stderr, "moectl: reload: %s%s%s\n", moe_strerror(r),
		        res->message[0] ? ": " : "", res->message);
		rc = exit_for(r);
	} else {
		printf("%s\n", res->message);
		if (res->result_len == sizeof(struct moe_admin_job)) {
			print_job(&res->job);
			if (q.wait_job && res->job.result) {
				fprintf(stderr, "moectl: reload failed: %s\n", res->job.message);
				rc = EXIT_ERR;
			}
		}
	}
	moe_disconnect(c);
	free(x);
	free(res);
	return rc;
}

static const char *s_or(const cJSON *o, const char *k)
{
	const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);

	return cJSON_IsString(v) ? v->valuestring : "";
}

void print_weights(const cJSON *w)
{
	const cJSON *src = obj(w, "sources"), *ls = obj(w, "layers"), *rl = obj(w, "reload"), *x;

	if (!cJSON_IsObject(w))
		return;
	printf("weights:  ");
	cJSON_ArrayForEach(x, ls)
	    printf("layer %.0f v%.0f%s%s ", num(x, "layer"), num(x, "version"),
	           num(x, "experts_other") > 0 ? "*" : "",
	           cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(x, "rollback")) ? "(rb)" : "");
	printf("\n          %.0f reloads done, %.0f failed, %.0f cancelled; rollback: %s; "
	       "%.1f MiB kept\n",
	       num(w, "reloads_done"), num(w, "reloads_failed"), num(w, "reloads_cancelled"),
	       s_or(w, "rollback"), num(w, "kept_bytes") / (1 << 20));
	if (cJSON_GetArraySize(src) > 1)
		cJSON_ArrayForEach(x, src)
		    printf("          source %.0f: %s (identity %s)\n", num(x, "id"),
		           s_or(x, "path"), s_or(x, "identity"));
	if (*s_or(w, "last_reload"))
		printf("          last: %s\n", s_or(w, "last_reload"));
	if (cJSON_IsObject(rl))
		printf("reloading: job %.0f, %s: %.0f/%.0f steps, %.1f MiB staged, %.1f s\n",
		       num(rl, "job"), s_or(rl, "what"), num(rl, "steps_done"),
		       num(rl, "steps_total"), num(rl, "bytes") / (1 << 20), num(rl, "elapsed_s"));
}
