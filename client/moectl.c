/* client/moectl.c — the command-line tool of moed.
 *
 *   moectl [-s SOCKET] status [--json]
 *   moectl [-s SOCKET] forward --layer L --input IN.safetensors --output OUT.safetensors
 *   moectl [-s SOCKET] ping [-c COUNT]
 *   moectl [-s SOCKET] drain [--wait] | undrain | reload-config
 *   moectl [-s SOCKET] epoch ID
 *   moectl [-s SOCKET] job ID [--cancel]
 *   moectl [-s SOCKET] epoch-cycle COUNT [--interval-us U] [--wait]
 *   moectl [-s SOCKET] placement [--layer L] [--json]
 *   moectl [-s SOCKET] replicate|unreplicate --layer L --expert E --rank R [--wait]
 *   moectl [-s SOCKET] rebalance [--layer L] [--full] [--dry-run] [--wait]
 *   (the placement commands: client/moectl_placement.c)
 *   moectl [-s SOCKET] reload [--model PATH] [--layers LIST] [--experts LIST]
 *                      [--atomic] [--max-parallel N] [--wait] | --cancel | --rollback
 *   (client/moectl_reload.c)
 *   moectl [-s SOCKET] top [--interval S]            (client/moectl_top.c)
 *   moectl [-s SOCKET] trace [--count N] [--layer L] [--client PID]
 *   (client/moectl_trace.c)
 *
 * Exit codes: 0 ok, 1 error, 2 usage, 3 daemon unreachable.
 */
#include "client/moectl.h"
#include "formats/safetensors.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const char *socket_path; /* NULL: the library's default */

void usage(FILE *f)
{
	fprintf(f, "usage: moectl [-s SOCKET] status [--json]\n"
	           "       moectl [-s SOCKET] forward --layer L --input IN.safetensors"
	           " --output OUT.safetensors\n"
	           "       moectl [-s SOCKET] ping [-c COUNT]\n"
	           "       moectl [-s SOCKET] drain [--wait]     (root or server.admin_group)\n"
	           "       moectl [-s SOCKET] undrain\n"
	           "       moectl [-s SOCKET] reload-config [--wait]\n"
	           "       moectl [-s SOCKET] epoch ID         what a completion's epoch id means\n"
	           "       moectl [-s SOCKET] job ID [--cancel]\n"
	           "       moectl [-s SOCKET] epoch-cycle COUNT [--interval-us U] [--wait]\n"
	           "                          publish COUNT epochs with the same weights (a job;\n"
	           "                          a self-test of the publish path while serving)\n"
	           "       moectl [-s SOCKET] placement [--layer L] [--json]\n"
	           "                          where each expert lives, and the ranks' load\n"
	           "       moectl [-s SOCKET] replicate --layer L --expert E --rank R [--wait]\n"
	           "       moectl [-s SOCKET] unreplicate --layer L --expert E --rank R [--wait]\n"
	           "       moectl [-s SOCKET] rebalance [--layer L] [--full] [--dry-run] [--wait]\n"
	           "                          from the load window; --dry-run shows the plan\n"
	           "       moectl [-s SOCKET] reload [--model PATH] [--layers LIST] [--experts LIST]\n"
	           "                          [--atomic] [--max-parallel N] [--wait]\n"
	           "                          new expert weights while serving, layer by layer\n"
	           "                          (LIST: 0-3,7; --experts: only those, routers kept)\n"
	           "       moectl [-s SOCKET] reload --rollback [--wait] | --cancel\n"
	           "       moectl [-s SOCKET] top [--interval SECONDS]\n"
	           "                          live view: rates, p50/p99, queue, ranks' load,\n"
	           "                          expert heat per layer (q quits)\n"
	           "       moectl [-s SOCKET] trace [--count N] [--layer L] [--client PID]\n"
	           "                          per-request records as JSON lines: routing,\n"
	           "                          stage times, epoch (root or server.admin_group)\n"
	           "       moectl [-s SOCKET] metrics   the metrics, Prometheus text format\n"
	           "                          (docs/metrics.md; for node_exporter's textfile\n"
	           "                          collector or hosts without a TCP listener)\n"
	           "SOCKET defaults to $MOED_SOCKET, else /run/moed/moed.sock.\n");
}

static const char *shown_path(void)
{
	const char *p = socket_path;

	if (!p || !*p)
		p = getenv("MOED_SOCKET");
	return p && *p ? p : "/run/moed/moed.sock";
}

/* The exit code for a library error. */
int exit_for(int r)
{
	return r == MOE_EDAEMON ? EXIT_DAEMON : EXIT_ERR;
}

int fail(int r, const char *what)
{
	fprintf(stderr, "moectl: %s: %s%s\n", what, moe_strerror(r),
	        r == MOE_EDAEMON ? " (is moed running?)" : "");
	return exit_for(r);
}

int connect_or_complain(moe_client **c)
{
	char err[512] = "";
	moe_connect_options o = {
	    .name = "moectl", .errbuf = err, .errbuf_len = sizeof(err), .region_bytes = 0};
	int r = moe_connect_opts(socket_path, &o, c);

	if (!r)
		return 0;
	if (!err[0])
		snprintf(err, sizeof(err), "%s: %s", shown_path(), moe_strerror(r));
	fprintf(stderr, "moectl: %s%s\n", err,
	        r == MOE_EDAEMON || r == MOE_EPERM ? " (is moed running?)" : "");
	return r == MOE_EDAEMON || r == MOE_EPERM ? EXIT_DAEMON : EXIT_ERR;
}

/* ------------------------------------------------------------------------ */
/* status                                                                   */

double num(const cJSON *o, const char *k)
{
	const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);

	return cJSON_IsNumber(v) ? v->valuedouble : 0;
}

const char *str(const cJSON *o, const char *k)
{
	const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);

	return cJSON_IsString(v) && v->valuestring ? v->valuestring : "-";
}

const cJSON *obj(const cJSON *o, const char *k)
{
	return cJSON_GetObjectItemCaseSensitive(o, k);
}

static void print_uptime(double s)
{
	unsigned long t = s > 0 ? (unsigned long)s : 0;

	if (t >= 86400)
		printf("%lud %02luh%02lum", t / 86400, t / 3600 % 24, t / 60 % 60);
	else if (t >= 3600)
		printf("%luh%02lum%02lus", t / 3600, t / 60 % 60, t % 60);
	else
		printf("%.1fs", s > 0 ? s : 0);
}

static void print_layers(const cJSON *layers)
{
	const cJSON *l;

	if (!cJSON_IsArray(layers) || !cJSON_GetArraySize(layers))
		return;
	printf("\nexpert tokens per layer (total, max/mean, then per expert):\n");
	cJSON_ArrayForEach(l, layers)
	{
		const cJSON *et = obj(l, "expert_tokens"), *v;
		double total = 0, max = 0;
		int n = 0;

		cJSON_ArrayForEach(v, et)
		{
			double x = cJSON_IsNumber(v) ? v->valuedouble : 0;

			total += x;
			max = x > max ? x : max;
			n++;
		}
		printf("  L%-4.0f %10.0f  %5.2f |", num(l, "layer"), total,
		       total > 0 ? max / (total / n) : 0.0);
		cJSON_ArrayForEach(v, et) printf(" %.0f", cJSON_IsNumber(v) ? v->valuedouble : 0);
		printf("\n");
		if (cJSON_IsObject(obj(l, "imbalance")))
			printf("         window: rank load max/mean %.2f, expert CV %.2f\n",
			       num(obj(l, "imbalance"), "rank_max_over_mean"),
			       num(obj(l, "imbalance"), "expert_cv"));
	}
}

static void print_load(const cJSON *load)
{
	const cJSON *r;

	if (!cJSON_IsObject(load))
		return;
	printf("\nranks (rows of (token, expert) pairs computed; window %.0f s):\n",
	       num(load, "window_s"));
	cJSON_ArrayForEach(r, obj(load, "ranks"))
	    printf("  rank %-3.0f %12.0f rows, %10.0f in the window, busy %.1f ms%s\n", num(r, "rank"),
	           num(r, "rows"), num(r, "rows_window"), num(r, "busy_ms"),
	           cJSON_IsTrue(obj(r, "lost")) ? "  LOST (its experts moved to the others)" : "");
}

static void print_status(const cJSON *j)
{
	const cJSON *m = obj(j, "model"), *b = obj(j, "backend"), *q = obj(j, "queue"),
	            *rq = obj(j, "requests"), *cl = obj(j, "clients"), *ml, *c;

	printf("state:    %s, up ", str(j, "state"));
	print_uptime(num(j, "uptime_s"));
	printf("\nmodel:    %s (%s, %s), hidden %.0f, %.0f experts, top-%.0f", str(m, "path"),
	       str(m, "family"), str(m, "dtype"), num(m, "hidden"), num(m, "experts"),
	       num(m, "top_k"));
	ml = obj(m, "moe_layers");
	if (cJSON_IsArray(ml))
		printf(", %d MoE layers", cJSON_GetArraySize(ml));
	printf("\nbackend:  %s on %s (%.0f rank%s, %.0f host threads)\n", str(b, "name"),
	       str(b, "device"), num(b, "ranks"), num(b, "ranks") == 1 ? "" : "s",
	       num(b, "threads"));
	printf("gpu:      %s", str(b, "gpu"));
	if (cJSON_IsNumber(cJSON_GetObjectItemCaseSensitive(b, "last_batch_device_ms")))
		printf("; last batch %.3f ms on the device", num(b, "last_batch_device_ms"));
	if (num(b, "unpinned_clients") > 0)
		printf("; %.0f client regions could not be pinned", num(b, "unpinned_clients"));
	if (cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(b, "device_lost")))
		printf("; DEVICE LOST");
	printf("\n");
	{
		const cJSON *mt = obj(j, "metrics");
		const char *addr = str(mt, "address");

		if (addr[0])
			printf("metrics:  http://%s/metrics (and moectl metrics)\n", addr);
		else
			printf("metrics:  no HTTP endpoint (metrics.listen unset); moectl metrics\n");
	}
	{
		const cJSON *tr = obj(j, "trace"), *a = obj(tr, "tracers"), *x;
		int n = cJSON_IsArray(a) ? cJSON_GetArraySize(a) : 0;

		/* only once someone has traced */
		if (n || num(tr, "records") > 0) {
			printf("trace:    %d tracer%s; %.0f records, %.0f sent, %.0f lost to slow "
			       "tracers\n", n, n == 1 ? "" : "s", num(tr, "records"), num(tr, "sent"),
			       num(tr, "lost"));
			cJSON_ArrayForEach(x, a)
				printf("          client %.0f (pid %.0f): %.0f sent, %.0f lost, %.0f "
				       "behind\n", num(x, "client"), num(x, "pid"), num(x, "sent"),
				       num(x, "lost"), num(x, "behind"));
		}
	}
	printf("queue:    %.0f requests, %.0f tokens pending\n", num(q, "pending_requests"),
	       num(q, "pending_tokens"));
	printf("requests: %.0f completed, %.0f errors, %.0f timeouts, %.0f cancelled;"
	       " %.0f tokens in %.0f batches\n",
	       num(rq, "completed"), num(rq, "errors"), num(rq, "timeouts"), num(rq, "cancelled"),
	       num(rq, "tokens"), num(rq, "batches"));
	printf("clients:  %d\n", cJSON_IsArray(cl) ? cJSON_GetArraySize(cl) : 0);
	if (cJSON_IsArray(cl) && cJSON_GetArraySize(cl)) {
		printf("  %6s %8s %6s %-20s %8s %10s %8s\n", "ID", "PID", "UID", "NAME", "INFLIGHT",
		       "REQUESTS", "ERRORS");
		cJSON_ArrayForEach(c, cl)
		    printf("  %6.0f %8.0f %6.0f %-20.20s %8.0f %10.0f %8.0f\n", num(c, "id"),
		           num(c, "pid"), num(c, "uid"), str(c, "name"), num(c, "inflight"),
		           num(c, "requests"), num(c, "errors"));
	}
	print_weights(obj(j, "weights"));
	print_layers(obj(j, "layers"));
	print_load(obj(j, "load"));
}

static int cmd_status(int argc, char **argv)
{
	static const struct option opts[] = {
	    {"json", no_argument, NULL, 'j'}, {"help", no_argument, NULL, 'h'}, {NULL, 0, NULL, 0}};
	int json = 0, ch, r, rc;
	moe_client *c;
	char *text;
	size_t len;
	cJSON *j;

	while ((ch = getopt_long(argc, argv, "jh", opts, NULL)) != -1) {
		if (ch == 'j') {
			json = 1;
		} else {
			usage(ch == 'h' ? stdout : stderr);
			return ch == 'h' ? EXIT_OK : EXIT_USAGE;
		}
	}
	if (optind != argc) {
		usage(stderr);
		return EXIT_USAGE;
	}
	rc = connect_or_complain(&c);
	if (rc)
		return rc;
	r = moe_status_json(c, &text, &len);
	moe_disconnect(c);
	if (r)
		return fail(r, "status");
	if (json) {
		fwrite(text, 1, len, stdout);
		if (!len || text[len - 1] != '\n')
			putchar('\n');
		free(text);
		return EXIT_OK;
	}
	j = cJSON_ParseWithLength(text, len);
	free(text);
	if (!cJSON_IsObject(j)) {
		cJSON_Delete(j);
		fprintf(stderr, "moectl: status: the daemon sent malformed JSON\n");
		return EXIT_ERR;
	}
	print_status(j);
	cJSON_Delete(j);
	return EXIT_OK;
}

/* ------------------------------------------------------------------------ */
/* metrics                                                                  */

static int cmd_metrics(int argc, char **argv)
{
	moe_client *c;
	char *text;
	size_t len;
	int r, rc;

	if (argc > 1) {
		int help = !strcmp(argv[1], "-h") || !strcmp(argv[1], "--help");

		usage(help ? stdout : stderr);
		return help ? EXIT_OK : EXIT_USAGE;
	}
	rc = connect_or_complain(&c);
	if (rc)
		return rc;
	r = moe_metrics_text(c, &text, &len);
	moe_disconnect(c);
	if (r)
		return fail(r, "metrics");
	fwrite(text, 1, len, stdout);
	free(text);
	return fflush(stdout) ? EXIT_ERR : EXIT_OK;
}

/* ------------------------------------------------------------------------ */
/* forward                                                                  */

int parse_u32(const char *s, uint32_t *v)
{
	char *end;
	unsigned long long x;

	errno = 0;
	x = strtoull(s, &end, 10);
	if (errno || end == s || *end || *s == '-' || x > UINT32_MAX)
		return -1;
	*v = (uint32_t)x;
	return 0;
}

_Static_assert(MOE_DTYPE_F32 == 0 && MOE_DTYPE_BF16 == 1 && MOE_DTYPE_F16 == 2,
	       "moe_st_float_code numbers the dtypes as moe_dtype does");

static int st_to_dtype(enum moe_st_dtype dt, moe_dtype *out)
{
	int code = moe_st_float_code(dt);

	if (code < 0)
		return -1;
	*out = (moe_dtype)code;
	return 0;
}

/* Runs n rows through the layer in chunks the daemon and the data area take. */
static int forward_rows(moe_client *c, const moe_model_info *mi, uint32_t layer, moe_dtype dt,
                        const unsigned char *in, unsigned char *out, uint64_t n, size_t row)
{
	uint64_t chunk = mi->max_batch_tokens ? mi->max_batch_tokens : n;
	uint64_t fit = mi->data_bytes / 2 / (row ? row : 1);

	if (fit < chunk)
		chunk = fit; /* data_bytes / 2 is a multiple of 64: rounding fits */
	if (chunk > UINT32_MAX)
		chunk = UINT32_MAX;
	if (!chunk)
		return MOE_ENOMEM;
	for (uint64_t i = 0; i < n; i += chunk) {
		uint64_t k = n - i < chunk ? n - i : chunk;
		int r = moe_forward(c, layer, dt, in + i * row, out + i * row, (uint32_t)k);

		if (r)
			return r;
	}
	return 0;
}

static int cmd_forward(int argc, char **argv)
{
	static const struct option opts[] = {{"layer", required_argument, NULL, 'l'},
	                                     {"input", required_argument, NULL, 'i'},
	                                     {"output", required_argument, NULL, 'o'},
	                                     {"help", no_argument, NULL, 'h'},
	                                     {NULL, 0, NULL, 0}};
	const char *in_path = NULL, *out_path = NULL;
	uint32_t layer = 0;
	int have_layer = 0, ch, r, rc = EXIT_ERR;
	char err[MOE_ERRLEN];
	struct moe_st_file *f = NULL;
	const struct moe_st_tensor *t;
	struct moe_st_wtensor wt;
	moe_client *c = NULL;
	moe_model_info mi;
	moe_dtype dt;
	unsigned char *in = NULL, *out = NULL;
	uint64_t n, bytes;
	size_t row;

	while ((ch = getopt_long(argc, argv, "l:i:o:h", opts, NULL)) != -1) {
		switch (ch) {
		case 'l':
			if (parse_u32(optarg, &layer)) {
				fprintf(stderr, "moectl: forward: --layer %s: not a layer index\n",
				        optarg);
				return EXIT_USAGE;
			}
			have_layer = 1;
			break;
		case 'i':
			in_path = optarg;
			break;
		case 'o':
			out_path = optarg;
			break;
		default:
			usage(ch == 'h' ? stdout : stderr);
			return ch == 'h' ? EXIT_OK : EXIT_USAGE;
		}
	}
	if (optind != argc || !have_layer || !in_path || !out_path) {
		fprintf(stderr, "moectl: forward needs --layer, --input and --output\n");
		usage(stderr);
		return EXIT_USAGE;
	}

	if (moe_st_open(in_path, &f, err)) {
		fprintf(stderr, "moectl: %s\n", err);
		return EXIT_ERR;
	}
	t = moe_st_find(f, "hidden_states");
	if (!t) {
		fprintf(stderr, "moectl: %s: no tensor \"hidden_states\"\n", in_path);
		goto out_close;
	}
	if (t->ndim != 2 || st_to_dtype(t->dtype, &dt)) {
		fprintf(stderr,
		        "moectl: %s: hidden_states: expected a 2-D F32, BF16 or F16 tensor,"
		        " found %u-D %s\n",
		        in_path, t->ndim, moe_st_dtype_name(t->dtype));
		goto out_close;
	}
	rc = connect_or_complain(&c);
	if (rc)
		goto out_close;
	rc = EXIT_ERR;
	r = moe_get_model_info(c, &mi);
	if (r) {
		rc = fail(r, "model info");
		goto out_close;
	}
	if (t->shape[1] != mi.hidden) {
		fprintf(stderr,
		        "moectl: %s: hidden_states: %" PRIu64 " columns, the model's hidden"
		        " size is %u\n",
		        in_path, t->shape[1], mi.hidden);
		goto out_close;
	}
	n = t->shape[0];
	row = (size_t)mi.hidden * (dt == MOE_DTYPE_F32 ? 4 : 2);
	bytes = t->end - t->begin; /* = n * row, checked by the reader */
	in = malloc(bytes ? bytes : 1);
	out = malloc(bytes ? bytes : 1);
	if (!in || !out) {
		fprintf(stderr, "moectl: %s: out of memory for %" PRIu64 " bytes\n", in_path,
		        bytes);
		goto out_close;
	}
	if (bytes && moe_st_pread(f, t, 0, bytes, in, err)) {
		fprintf(stderr, "moectl: %s\n", err);
		goto out_close;
	}
	r = forward_rows(c, &mi, layer, dt, in, out, n, row);
	if (r) {
		char what[64];

		snprintf(what, sizeof(what), "forward: layer %u", layer);
		rc = fail(r, what);
		goto out_close;
	}
	wt = (struct moe_st_wtensor){
	    .name = "output", .dtype = t->dtype, .ndim = 2, .shape = {n, t->shape[1]}, .data = out};
	if (moe_st_write(out_path, &wt, 1, NULL, err)) {
		fprintf(stderr, "moectl: %s\n", err);
		goto out_close;
	}
	rc = EXIT_OK;
out_close:
	free(in);
	free(out);
	moe_disconnect(c);
	moe_st_close(f);
	return rc;
}

/* ------------------------------------------------------------------------ */
/* ping                                                                     */

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return x < y ? -1 : x > y;
}

/* drain [--wait] / undrain / reload-config [--wait]: one operator command.
 * reload-config always waits for the daemon's verdict (--wait is accepted
 * for systemd's ExecReload=); drain --wait returns once nothing is queued. */
static int cmd_admin(int argc, char **argv, uint32_t op)
{
	static const struct option opts[] = {{"wait", no_argument, NULL, 'w'},
	                                     {"help", no_argument, NULL, 'h'},
	                                     {NULL, 0, NULL, 0}};
	uint32_t flags = 0;
	char msg[256];
	moe_client *c;
	int ch, r, rc;

	while ((ch = getopt_long(argc, argv, "wh", opts, NULL)) != -1) {
		if (ch == 'w' && op != MOE_ADMIN_UNDRAIN) {
			flags |= 1;
			continue;
		}
		usage(ch == 'h' ? stdout : stderr);
		return ch == 'h' ? EXIT_OK : EXIT_USAGE;
	}
	if (optind != argc) {
		usage(stderr);
		return EXIT_USAGE;
	}
	rc = connect_or_complain(&c);
	if (rc)
		return rc;
	r = moe_admin(c, op, op == MOE_ADMIN_DRAIN ? flags : 0, -1, msg, sizeof(msg));
	if (r) {
		fprintf(stderr, "moectl: %s: %s%s%s\n", argv[0], moe_strerror(r), msg[0] ? ": " : "",
		        msg);
		rc = r == MOE_EDAEMON ? EXIT_DAEMON : EXIT_ERR;
	} else {
		printf("%s\n", msg);
	}
	moe_disconnect(c);
	return rc;
}

static int cmd_ping(int argc, char **argv)
{
	static const struct option opts[] = {{"count", required_argument, NULL, 'c'},
	                                     {"help", no_argument, NULL, 'h'},
	                                     {NULL, 0, NULL, 0}};
	uint32_t count = 5;
	uint64_t *rtt;
	moe_client *c;
	int ch, r, rc;
	double med;

	while ((ch = getopt_long(argc, argv, "c:h", opts, NULL)) != -1) {
		if (ch == 'c' && !parse_u32(optarg, &count) && count && count <= 1000000)
			continue;
		if (ch == 'c')
			fprintf(stderr, "moectl: ping: -c %s: expected a count in 1..1000000\n",
			        optarg);
		else
			usage(ch == 'h' ? stdout : stderr);
		return ch == 'h' ? EXIT_OK : EXIT_USAGE;
	}
	if (optind != argc) {
		usage(stderr);
		return EXIT_USAGE;
	}
	rtt = calloc(count, sizeof(*rtt));
	if (!rtt) {
		fprintf(stderr, "moectl: ping: out of memory\n");
		return EXIT_ERR;
	}
	rc = connect_or_complain(&c);
	if (rc) {
		free(rtt);
		return rc;
	}
	for (uint32_t i = 0; i < count; i++) {
		r = moe_ping(c, &rtt[i]);
		if (r) {
			rc = fail(r, "ping");
			goto out;
		}
		if (count <= 10) /* a few: each one; many: the summary only */
			printf("ping %u: %.1f us\n", i + 1, (double)rtt[i] / 1e3);
	}
	qsort(rtt, count, sizeof(*rtt), cmp_u64);
	med = count % 2 ? (double)rtt[count / 2]
	                : ((double)rtt[count / 2 - 1] + (double)rtt[count / 2]) / 2;
	printf("%u pings: min %.1f us, median %.1f us, max %.1f us\n", count, (double)rtt[0] / 1e3,
	       med / 1e3, (double)rtt[count - 1] / 1e3);
out:
	moe_disconnect(c);
	free(rtt);
	return rc;
}

/* ------------------------------------------------------------------------ */
/* epochs and jobs                                                          */

void print_job(const struct moe_admin_job *j)
{
	printf("job %u (%s): %s, %" PRIu64 " of %" PRIu64 "%s%s\n", j->job, moe_admin_op_name(j->op),
	       moe_job_state_name(j->state), j->done, j->total, j->state == MOE_JOB_RUNNING ? "" : ": ",
	       j->state == MOE_JOB_RUNNING ? "" : j->message);
}

/* epoch ID: placement generation, state and per-layer weights versions. */
static int cmd_epoch(int argc, char **argv)
{
	struct moe_admin_epoch_info info;
	uint32_t id, v[512];
	moe_client *c;
	int r, rc;

	if (argc != 2 || parse_u32(argv[1], &id)) {
		usage(stderr);
		return EXIT_USAGE;
	}
	rc = connect_or_complain(&c);
	if (rc)
		return rc;
	r = moe_epoch_info(c, id, &info, v, 512);
	if (r) {
		rc = fail(r, "epoch");
	} else {
		printf("epoch %u: %s, placement generation %" PRIu64 "\nweights versions:", info.id,
		       info.flags & MOE_EPOCH_CURRENT ? "current"
		       : info.flags & MOE_EPOCH_RETIRED ? "retired" : "live (pinned by a batch)",
		       info.placement_gen);
		for (uint32_t l = 0; l < info.n_layers && l < 512; l++)
			printf(" %u", v[l]);
		printf("\n");
	}
	moe_disconnect(c);
	return rc;
}

/* job ID [--cancel] */
static int cmd_job(int argc, char **argv)
{
	static const struct option opts[] = {{"cancel", no_argument, NULL, 'c'},
	                                     {"help", no_argument, NULL, 'h'},
	                                     {NULL, 0, NULL, 0}};
	struct moe_admin_job j;
	int ch, cancel = 0, r, rc;
	uint32_t id;
	moe_client *c;

	while ((ch = getopt_long(argc, argv, "ch", opts, NULL)) != -1) {
		if (ch == 'c') {
			cancel = 1;
			continue;
		}
		usage(ch == 'h' ? stdout : stderr);
		return ch == 'h' ? EXIT_OK : EXIT_USAGE;
	}
	if (optind != argc - 1 || parse_u32(argv[optind], &id)) {
		usage(stderr);
		return EXIT_USAGE;
	}
	rc = connect_or_complain(&c);
	if (rc)
		return rc;
	r = moe_job(c, id, cancel, &j);
	if (r)
		rc = fail(r, "job");
	else
		print_job(&j);
	moe_disconnect(c);
	return rc;
}

/* epoch-cycle COUNT [--interval-us U] [--wait] */
static int cmd_epoch_cycle(int argc, char **argv)
{
	static const struct option opts[] = {{"interval-us", required_argument, NULL, 'i'},
	                                     {"wait", no_argument, NULL, 'w'},
	                                     {"help", no_argument, NULL, 'h'},
	                                     {NULL, 0, NULL, 0}};
	struct moe_admin_cycle cy = {0, 0};
	moe_admin_req q = {.op = MOE_ADMIN_EPOCH_CYCLE, .payload = &cy, .payload_len = sizeof(cy),
	                   .timeout_ms = -1};
	moe_admin_res *res;
	moe_client *c;
	int ch, r, rc;

	while ((ch = getopt_long(argc, argv, "i:wh", opts, NULL)) != -1) {
		if (ch == 'i' && !parse_u32(optarg, &cy.interval_us) && cy.interval_us <= 1000000)
			continue;
		if (ch == 'w') {
			q.wait_job = 1;
			continue;
		}
		usage(ch == 'h' ? stdout : stderr);
		return ch == 'h' ? EXIT_OK : EXIT_USAGE;
	}
	if (optind != argc - 1 || parse_u32(argv[optind], &cy.count) || !cy.count ||
	    cy.count > 1000000) {
		usage(stderr);
		return EXIT_USAGE;
	}
	res = malloc(sizeof(*res));
	if (!res)
		return fail(MOE_ENOMEM, "epoch-cycle");
	rc = connect_or_complain(&c);
	if (rc) {
		free(res);
		return rc;
	}
	r = moe_admin_call(c, &q, res);
	if (r) {
		fprintf(stderr, "moectl: epoch-cycle: %s%s%s\n", moe_strerror(r),
		        res->message[0] ? ": " : "", res->message);
		rc = exit_for(r);
	} else {
		print_job(&res->job);
		if (q.wait_job && res->job.result)
			rc = EXIT_ERR;
	}
	moe_disconnect(c);
	free(res);
	return rc;
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {{"socket", required_argument, NULL, 's'},
	                                     {"help", no_argument, NULL, 'h'},
	                                     {NULL, 0, NULL, 0}};
	const char *cmd;
	int ch;

	while ((ch = getopt_long(argc, argv, "+s:h", opts, NULL)) != -1) {
		if (ch == 's') {
			socket_path = optarg;
			continue;
		}
		usage(ch == 'h' ? stdout : stderr);
		return ch == 'h' ? EXIT_OK : EXIT_USAGE;
	}
	if (optind >= argc) {
		usage(stderr);
		return EXIT_USAGE;
	}
	cmd = argv[optind];
	argc -= optind;
	argv += optind;
	optind = 0; /* GNU getopt: start afresh for the subcommand's options */
	if (!strcmp(cmd, "status"))
		return cmd_status(argc, argv);
	if (!strcmp(cmd, "forward"))
		return cmd_forward(argc, argv);
	if (!strcmp(cmd, "ping"))
		return cmd_ping(argc, argv);
	if (!strcmp(cmd, "drain"))
		return cmd_admin(argc, argv, MOE_ADMIN_DRAIN);
	if (!strcmp(cmd, "undrain"))
		return cmd_admin(argc, argv, MOE_ADMIN_UNDRAIN);
	if (!strcmp(cmd, "reload-config"))
		return cmd_admin(argc, argv, MOE_ADMIN_RELOAD_CONFIG);
	if (!strcmp(cmd, "epoch"))
		return cmd_epoch(argc, argv);
	if (!strcmp(cmd, "job"))
		return cmd_job(argc, argv);
	if (!strcmp(cmd, "epoch-cycle"))
		return cmd_epoch_cycle(argc, argv);
	if (!strcmp(cmd, "placement"))
		return cmd_placement(argc, argv);
	if (!strcmp(cmd, "replicate"))
		return cmd_replicate(argc, argv, MOE_ADMIN_REPLICATE);
	if (!strcmp(cmd, "unreplicate"))
		return cmd_replicate(argc, argv, MOE_ADMIN_UNREPLICATE);
	if (!strcmp(cmd, "rebalance"))
		return cmd_rebalance(argc, argv);
	if (!strcmp(cmd, "reload"))
		return cmd_reload(argc, argv);
	if (!strcmp(cmd, "metrics"))
		return cmd_metrics(argc, argv);
	if (!strcmp(cmd, "top"))
		return cmd_top(argc, argv);
	if (!strcmp(cmd, "trace"))
		return cmd_trace(argc, argv);
	fprintf(stderr, "moectl: unknown command \"%s\"\n", cmd);
	usage(stderr);
	return EXIT_USAGE;
}
