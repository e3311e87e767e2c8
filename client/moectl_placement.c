/* client/moectl_placement.c — moectl's commands for where experts live:
 *
 *   placement [--layer L] [--json]   per layer, the experts each rank holds
 *                                    (from status), with the window's load
 *   replicate --layer L --expert E --rank R [--wait]
 *   unreplicate --layer L --expert E --rank R [--wait]
 *   rebalance [--layer L] [--full] [--dry-run] [--wait]
 *
 * The three changes are admin ops (root or server.admin_group) that start a
 * job in moed; --wait returns once it is over (exit 1 if it failed).
 */
#include "client/moectl.h"

#include <getopt.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

static int bad_usage(int ch)
{
	usage(ch == 'h' ? stdout : stderr);
	return ch == 'h' ? EXIT_OK : EXIT_USAGE;
}

/* ---- placement ------------------------------------------------------- */

static void print_layer(const cJSON *l)
{
	const cJSON *pl = obj(l, "placement"), *rows = obj(l, "rank_rows_window"), *x;
	int R = cJSON_IsArray(rows) ? cJSON_GetArraySize(rows) : 0;

	printf("layer %.0f: rank load max/mean %.2f, expert CV %.2f (window)\n", num(l, "layer"),
	       num(obj(l, "imbalance"), "rank_max_over_mean"),
	       num(obj(l, "imbalance"), "expert_cv"));
	for (int r = 0; r < R; r++) {
		int e = 0;

		printf("  rank %-3d %10.0f rows |", r,
		       cJSON_GetArrayItem(rows, r)->valuedouble);
		cJSON_ArrayForEach(x, pl)
		{
			const cJSON *p;

			cJSON_ArrayForEach(p, x)
			{
				if (cJSON_GetArraySize(p) == 2 &&
				    (int)cJSON_GetArrayItem(p, 0)->valuedouble == r)
					printf(" %s%d", cJSON_GetArraySize(x) > 1 ? "+" : "", e);
			}
			e++;
		}
		printf("\n");
	}
}

int cmd_placement(int argc, char **argv)
{
	static const struct option opts[] = {{"layer", required_argument, NULL, 'l'},
	                                     {"json", no_argument, NULL, 'j'},
	                                     {"help", no_argument, NULL, 'h'},
	                                     {NULL, 0, NULL, 0}};
	uint32_t layer = 0;
	int ch, json = 0, one = 0, rc, r, found = 0;
	moe_client *c;
	char *text = NULL;
	cJSON *j, *out, *arr, *l;

	while ((ch = getopt_long(argc, argv, "l:jh", opts, NULL)) != -1) {
		if (ch == 'l' && !parse_u32(optarg, &layer)) {
			one = 1;
			continue;
		}
		if (ch == 'j') {
			json = 1;
			continue;
		}
		return bad_usage(ch);
	}
	if (optind != argc)
		return bad_usage('?');
	rc = connect_or_complain(&c);
	if (rc)
		return rc;
	r = moe_status_json(c, &text, NULL);
	moe_disconnect(c);
	if (r)
		return fail(r, "placement");
	j = cJSON_Parse(text);
	free(text);
	if (!j) {
		fprintf(stderr, "moectl: placement: moed's status is not JSON\n");
		return EXIT_ERR;
	}
	out = cJSON_CreateObject();
	arr = cJSON_AddArrayToObject(out, "layers");
	cJSON_ArrayForEach(l, obj(j, "layers"))
	{
		cJSON *x;

		if (one && (uint32_t)num(l, "layer") != layer)
			continue;
		found++;
		x = cJSON_CreateObject();
		cJSON_AddNumberToObject(x, "layer", num(l, "layer"));
		cJSON_AddItemToObject(x, "placement",
				      cJSON_Duplicate(obj(l, "placement"), 1));
		cJSON_AddItemToObject(x, "rank_rows_window",
				      cJSON_Duplicate(obj(l, "rank_rows_window"), 1));
		cJSON_AddItemToObject(x, "expert_tokens_window",
				      cJSON_Duplicate(obj(l, "expert_tokens_window"), 1));
		cJSON_AddItemToObject(x, "imbalance", cJSON_Duplicate(obj(l, "imbalance"), 1));
		cJSON_AddItemToArray(arr, x);
		if (!json)
			print_layer(l);
	}
	if (json) {
		char *s = cJSON_Print(out);

		printf("%s\n", s ? s : "{}");
		free(s);
	}
	cJSON_Delete(out);
	cJSON_Delete(j);
	if (one && !found) {
		fprintf(stderr, "moectl: placement: layer %u is not an MoE layer of the model\n",
		        layer);
		return EXIT_ERR;
	}
	return EXIT_OK;
}

/* ---- changes ---------------------------------------------------------- */

/* Sends the op; prints the reply (and the job); 0 or an exit code. */
static int change(moe_admin_req *q, const char *what, int dry)
{
	moe_admin_res *res = malloc(sizeof(*res));
	moe_client *c;
	int r, rc;

	if (!res)
		return fail(MOE_ENOMEM, what);
	rc = connect_or_complain(&c);
	if (rc) {
		free(res);
		return rc;
	}
	r = moe_admin_call(c, q, res);
	if (r) {
		fprintf(stderr, "moectl: %s: %s%s%s\n", what, moe_strerror(r),
		        res->message[0] ? ": " : "", res->message);
		rc = exit_for(r);
	} else if (dry || res->result_len != sizeof(struct moe_admin_job)) {
		printf("%s\n", res->message);
	} else {
		printf("%s\n", res->message);
		print_job(&res->job);
		if (q->wait_job && res->job.result)
			rc = EXIT_ERR;
	}
	moe_disconnect(c);
	free(res);
	return rc;
}

int cmd_replicate(int argc, char **argv, uint32_t op)
{
	static const struct option opts[] = {{"layer", required_argument, NULL, 'l'},
	                                     {"expert", required_argument, NULL, 'e'},
	                                     {"rank", required_argument, NULL, 'r'},
	                                     {"wait", no_argument, NULL, 'w'},
	                                     {"help", no_argument, NULL, 'h'},
	                                     {NULL, 0, NULL, 0}};
	struct moe_admin_replica x = {0};
	moe_admin_req q = {.op = op, .payload = &x, .payload_len = sizeof(x), .timeout_ms = -1};
	int ch, have = 0;

	while ((ch = getopt_long(argc, argv, "l:e:r:wh", opts, NULL)) != -1) {
		if (ch == 'l' && !parse_u32(optarg, &x.layer))
			have |= 1;
		else if (ch == 'e' && !parse_u32(optarg, &x.expert))
			have |= 2;
		else if (ch == 'r' && !parse_u32(optarg, &x.rank))
			have |= 4;
		else if (ch == 'w')
			q.wait_job = 1;
		else
			return bad_usage(ch);
	}
	if (optind != argc || have != 7) {
		fprintf(stderr, "moectl: %s needs --layer, --expert and --rank\n",
		        moe_admin_op_name(op));
		return bad_usage('?');
	}
	return change(&q, moe_admin_op_name(op), 0);
}

int cmd_rebalance(int argc, char **argv)
{
	static const struct option opts[] = {{"layer", required_argument, NULL, 'l'},
	                                     {"full", no_argument, NULL, 'f'},
	                                     {"dry-run", no_argument, NULL, 'n'},
	                                     {"wait", no_argument, NULL, 'w'},
	                                     {"help", no_argument, NULL, 'h'},
	                                     {NULL, 0, NULL, 0}};
	struct moe_admin_rebalance x = {MOE_ADMIN_ALL_LAYERS, MOE_PLAN_KIND_KEEP};
	moe_admin_req q = {.op = MOE_ADMIN_REBALANCE, .payload = &x, .payload_len = sizeof(x),
	                   .timeout_ms = -1};
	int ch;

	while ((ch = getopt_long(argc, argv, "l:fnwh", opts, NULL)) != -1) {
		if (ch == 'l' && !parse_u32(optarg, &x.layer) && x.layer != MOE_ADMIN_ALL_LAYERS)
			continue;
		if (ch == 'f')
			x.mode = MOE_PLAN_KIND_FULL;
		else if (ch == 'n')
			q.flags |= MOE_ADMIN_DRY_RUN;
		else if (ch == 'w')
			q.wait_job = 1;
		else
			return bad_usage(ch);
	}
	if (optind != argc)
		return bad_usage('?');
	return change(&q, "rebalance", (q.flags & MOE_ADMIN_DRY_RUN) != 0);
}
