/* client/moectl_trace.c — `moectl trace`: per-request records as JSON lines.
 *
 *   moectl trace [--count N] [--layer L] [--client PID]
 *
 * One line per request that ran on moed's engine and matches the filters
 * (the filters are applied in moed, so records that do not match cost the
 * tracer nothing), written as it arrives and flushed per line, so that
 * `| jq` or `| head` see it at once:
 *
 *   {"seq":..,"time":"2026-12-06T03:12:45.123456Z","pid":..,"client":..,
 *    "name":"..","tag":..,"layer":..,"tokens":..,"dtype":"bf16","status":0,
 *    "epoch":..,"weights_version":..,"batch":{"requests":..,"tokens":..},
 *    "experts":{"3":12,"7":4},"latency_us":..,
 *    "stages_us":{"queue":..,"convert":..,"router":..,"dispatch":..,
 *                 "exchange":..,"experts":..,"combine":..,"device":..},
 *    "lost":..}
 *
 * Times are exact decimals of the daemon's nanoseconds. The stages are the
 * request's own queue wait and its batch's engine stages (every request of
 * a batch shows the batch's); they never add up to more than latency_us.
 * "device" is the whole batch on a device backend (the host stages are 0
 * there) and 0 on the CPU backend. "experts" maps each expert the
 * request's tokens were routed to (its top-k choices) to how many of its
 * tokens went there. "lost" is how many matching records this tracer has
 * lost so far because it read too slowly (moed never waits for a tracer).
 * A name is escaped to ASCII JSON (bytes above 0x7f as \u00XX).
 *
 * It ends after N records (--count), on Ctrl-C, SIGTERM, or when stdout is
 * closed (`| head`), and then says on stderr how many records it wrote and
 * how many were lost; exit 0, or 3 if the daemon went away.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <signal.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "client/moectl.h"

static volatile sig_atomic_t stop_sig;

static void on_signal(int sig)
{
	stop_sig = sig;
}

/* ns as an exact decimal number of µs */
static void put_us(FILE *f, uint64_t ns)
{
	fprintf(f, "%" PRIu64 ".%03u", ns / 1000, (unsigned)(ns % 1000));
}

static void put_str(FILE *f, const char *s)
{
	fputc('"', f);
	for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
		if (*p == '"' || *p == '\\')
			fprintf(f, "\\%c", *p);
		else if (*p < 0x20 || *p > 0x7e)
			fprintf(f, "\\u%04x", *p);
		else
			fputc(*p, f);
	}
	fputc('"', f);
}

static const char *dtype_name(uint32_t d)
{
	return d == 0 ? "f32" : d == 1 ? "bf16" : d == 2 ? "f16" : "?";
}

static void put_record(FILE *f, const moe_trace_event *ev)
{
	static const char *const stage[MOE_TRACE_STAGES] = {
		"queue", "convert", "router", "dispatch", "exchange", "experts", "combine", "device"};
	const struct moe_trace_record *r = &ev->rec;
	time_t sec = (time_t)(r->unix_ns / 1000000000u);
	struct tm tm;
	char when[32] = "?";

	if (gmtime_r(&sec, &tm))
		strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%S", &tm);
	fprintf(f, "{\"seq\":%" PRIu64 ",\"time\":\"%s.%06uZ\",\"pid\":%d,\"client\":%u,\"name\":",
		r->seq, when, (unsigned)(r->unix_ns % 1000000000u / 1000u), (int)r->pid, r->client);
	put_str(f, r->client_name);
	fprintf(f, ",\"tag\":%" PRIu64 ",\"layer\":%u,\"tokens\":%u,\"dtype\":\"%s\",\"status\":%d",
		r->tag, r->layer, r->tokens, dtype_name(r->dtype), (int)r->status);
	if (r->status)
		fprintf(f, ",\"error\":\"%s\"", moe_strerror(r->status));
	fprintf(f, ",\"epoch\":%u,\"weights_version\":%u,\"batch\":{\"requests\":%u,\"tokens\":%u}"
		   ",\"experts\":{",
		r->epoch, r->weights_version, r->batch_requests, r->batch_tokens);
	for (uint32_t i = 0; i < r->n_hits; i++)
		fprintf(f, "%s\"%u\":%u", i ? "," : "", ev->hits[i].expert, ev->hits[i].tokens);
	fputc('}', f);
	if (r->flags & MOE_TRACE_TRUNCATED)
		fputs(",\"experts_truncated\":true", f);
	fputs(",\"latency_us\":", f);
	put_us(f, r->latency_ns);
	fputs(",\"stages_us\":{", f);
	for (int i = 0; i < MOE_TRACE_STAGES; i++) {
		fprintf(f, "%s\"%s\":", i ? "," : "", stage[i]);
		put_us(f, r->stage_ns[i]);
	}
	fprintf(f, "},\"lost\":%" PRIu64 "}\n", ev->lost);
}

int cmd_trace(int argc, char **argv)
{
	static const struct option opts[] = {{"count", required_argument, NULL, 'c'},
					     {"layer", required_argument, NULL, 'l'},
					     {"client", required_argument, NULL, 'p'},
					     {"help", no_argument, NULL, 'h'},
					     {NULL, 0, NULL, 0}};
	struct moe_admin_trace f = {.layer = MOE_ADMIN_ALL_LAYERS};
	struct sigaction sa = {.sa_handler = on_signal};
	uint64_t written = 0, lost = 0;
	moe_trace_event *ev;
	moe_client *c;
	uint32_t v;
	int ch, r, rc;

	while ((ch = getopt_long(argc, argv, "c:l:p:h", opts, NULL)) != -1) {
		switch (ch) {
		case 'c':
			if (parse_u32(optarg, &v) || !v) {
				fprintf(stderr, "moectl: trace: --count takes a number above 0\n");
				return EXIT_USAGE;
			}
			f.count = v;
			break;
		case 'l':
			if (parse_u32(optarg, &v) || v == MOE_ADMIN_ALL_LAYERS) {
				fprintf(stderr, "moectl: trace: --layer takes a layer index\n");
				return EXIT_USAGE;
			}
			f.layer = v;
			break;
		case 'p':
			if (parse_u32(optarg, &v) || !v || v > INT32_MAX) {
				fprintf(stderr, "moectl: trace: --client takes a process id\n");
				return EXIT_USAGE;
			}
			f.pid = (int32_t)v;
			break;
		default:
			usage(ch == 'h' ? stdout : stderr);
			return ch == 'h' ? EXIT_OK : EXIT_USAGE;
		}
	}
	if (optind < argc) {
		usage(stderr);
		return EXIT_USAGE;
	}
	ev = malloc(sizeof(*ev));
	if (!ev)
		return fail(MOE_ENOMEM, "trace");
	rc = connect_or_complain(&c);
	if (rc) {
		free(ev);
		return rc;
	}
	r = moe_trace_start(c, &f);
	if (r) {
		rc = fail(r, "trace");
		goto out;
	}
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGHUP, &sa, NULL);
	signal(SIGPIPE, SIG_IGN); /* a closed stdout ends it below */
	while (!stop_sig) {
		/* (a short wait: a signal is seen within it) */
		r = moe_trace_next(c, ev, 200);
		if (r == MOE_ETIMEDOUT)
			continue;
		if (r == MOE_ENOENT) { /* --count reached */
			r = 0;
			break;
		}
		if (r == MOE_EPROTO) {
			fprintf(stderr, "moectl: trace: a malformed message from moed, skipped\n");
			continue;
		}
		if (r)
			break;
		lost = ev->lost;
		put_record(stdout, ev);
		if (fflush(stdout) || ferror(stdout))
			break; /* the reader went away */
		written++;
	}
	fprintf(stderr, "moectl trace: %" PRIu64 " records, %" PRIu64 " lost\n", written, lost);
	rc = r ? fail(r, "trace") : EXIT_OK;
out:
	moe_disconnect(c);
	free(ev);
	return rc;
}
