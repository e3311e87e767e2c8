/* tests/trace_check.c — checks `moectl trace` output: JSON lines on stdin.
 *
 *   trace_check --count N --top-k K --experts E [--layer L] [--pid P]
 *
 * Every line must be one JSON object (cJSON) with every field moectl trace
 * documents, of the right type: seq increasing, time an RFC 3339 UTC string,
 * pid > 0, a name, layer (= L if given), pid (= P if given), tokens > 0,
 * dtype f32/bf16/f16, status 0, epoch and weights_version >= 1, the batch
 * at least as large as the request, "experts" an object of expert ids < E
 * whose counts add up to tokens * K, the 8 stages, and their sum no more
 * than latency_us (compared in integer ns: moectl prints exact decimals),
 * lost never decreasing. Exactly N lines. Prints a summary; exit 0 or 1
 * with the first bad line and why.
 */
#include <cjson/cJSON.h>
#include <getopt.h>
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const stages[] = {"queue",	 "convert", "router",  "dispatch",
				     "exchange", "experts", "combine", "device"};

static long lineno;

static int bad(const char *line, const char *why)
{
	fprintf(stderr, "trace_check: line %ld: %s\n  %s\n", lineno, why, line);
	return 1;
}

static const cJSON *num(const cJSON *o, const char *k)
{
	const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);

	return cJSON_IsNumber(v) ? v : NULL;
}

static uint64_t us_to_ns(double us)
{
	return (uint64_t)llround(us * 1000.0);
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{"count", required_argument, NULL, 'n'}, {"top-k", required_argument, NULL, 'k'},
		{"experts", required_argument, NULL, 'e'}, {"layer", required_argument, NULL, 'l'},
		{"pid", required_argument, NULL, 'p'},	 {NULL, 0, NULL, 0}};
	long want = -1, K = 0, E = 0, layer = -1, pid = -1, n = 0;
	double last_seq = -1, last_lost = 0, worst = 0;
	uint64_t sum_latency = 0;
	char *line = NULL;
	size_t cap = 0;
	ssize_t len;
	int ch;

	while ((ch = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		long v = strtol(optarg, NULL, 10);

		switch (ch) {
		case 'n': want = v; break;
		case 'k': K = v; break;
		case 'e': E = v; break;
		case 'l': layer = v; break;
		case 'p': pid = v; break;
		default: return 2;
		}
	}
	if (want < 0 || K <= 0 || E <= 0) {
		fprintf(stderr, "usage: trace_check --count N --top-k K --experts E [--layer L] "
				"[--pid P] <trace.jsonl\n");
		return 2;
	}
	while ((len = getline(&line, &cap, stdin)) > 0) {
		cJSON *j;
		const cJSON *o, *v, *batch, *ex, *st, *x;
		uint64_t stage_sum = 0, latency;
		long tokens, hit_sum = 0;
		int rc = 0;

		lineno++;
		if (line[len - 1] != '\n')
			return bad(line, "not a whole line");
		line[len - 1] = '\0';
		j = cJSON_Parse(line);
		if (!cJSON_IsObject(j)) {
			cJSON_Delete(j);
			return bad(line, "not a JSON object");
		}
		o = j;
#define NEED(cond, why)                                                                            \
	do {                                                                                       \
		if (!(cond)) {                                                                     \
			rc = bad(line, why);                                                       \
			goto next;                                                                 \
		}                                                                                  \
	} while (0)
		NEED((v = num(o, "seq")) && v->valuedouble > last_seq, "seq missing or not increasing");
		last_seq = v->valuedouble;
		v = cJSON_GetObjectItemCaseSensitive(o, "time");
		NEED(cJSON_IsString(v) && strlen(v->valuestring) == 27 && v->valuestring[4] == '-' &&
			     v->valuestring[10] == 'T' && v->valuestring[26] == 'Z',
		     "time is not YYYY-MM-DDTHH:MM:SS.uuuuuuZ");
		NEED((v = num(o, "pid")) && v->valuedouble > 0, "pid");
		NEED(pid < 0 || v->valuedouble == pid, "pid does not match --client");
		NEED(num(o, "client"), "client");
		NEED(cJSON_IsString(cJSON_GetObjectItemCaseSensitive(o, "name")), "name");
		NEED(num(o, "tag"), "tag");
		NEED((v = num(o, "layer")) && v->valuedouble >= 0, "layer");
		NEED(layer < 0 || v->valuedouble == layer, "layer does not match --layer");
		NEED((v = num(o, "tokens")) && v->valuedouble >= 1, "tokens");
		tokens = (long)v->valuedouble;
		v = cJSON_GetObjectItemCaseSensitive(o, "dtype");
		NEED(cJSON_IsString(v) && (!strcmp(v->valuestring, "f32") ||
					   !strcmp(v->valuestring, "bf16") ||
					   !strcmp(v->valuestring, "f16")),
		     "dtype");
		NEED((v = num(o, "status")) && v->valuedouble == 0, "status is not 0");
		NEED((v = num(o, "epoch")) && v->valuedouble >= 1, "epoch");
		NEED((v = num(o, "weights_version")) && v->valuedouble >= 1, "weights_version");
		batch = cJSON_GetObjectItemCaseSensitive(o, "batch");
		NEED(cJSON_IsObject(batch) && (v = num(batch, "requests")) && v->valuedouble >= 1 &&
			     (v = num(batch, "tokens")) && v->valuedouble >= tokens,
		     "batch");
		ex = cJSON_GetObjectItemCaseSensitive(o, "experts");
		NEED(cJSON_IsObject(ex) && ex->child, "experts missing or empty");
		cJSON_ArrayForEach(x, ex) {
			char *end;
			long id = strtol(x->string, &end, 10);

			NEED(*x->string && !*end && id >= 0 && id < E, "an expert id out of range");
			NEED(cJSON_IsNumber(x) && x->valuedouble >= 1, "an expert's count");
			hit_sum += (long)x->valuedouble;
		}
		NEED(hit_sum == tokens * K, "the experts' counts do not add up to tokens * top_k");
		NEED((v = num(o, "latency_us")) && v->valuedouble > 0, "latency_us");
		latency = us_to_ns(v->valuedouble);
		st = cJSON_GetObjectItemCaseSensitive(o, "stages_us");
		NEED(cJSON_IsObject(st) && cJSON_GetArraySize(st) == 8, "stages_us is not 8 stages");
		for (size_t i = 0; i < sizeof(stages) / sizeof(stages[0]); i++) {
			NEED((v = num(st, stages[i])) && v->valuedouble >= 0, "a stage is missing");
			stage_sum += us_to_ns(v->valuedouble);
		}
		NEED(stage_sum <= latency, "the stages add up to more than latency_us");
		NEED((v = num(o, "lost")) && v->valuedouble >= last_lost, "lost decreased");
		last_lost = v->valuedouble;
		if ((double)stage_sum / (double)latency > worst)
			worst = (double)stage_sum / (double)latency;
		sum_latency += latency;
		n++;
next:
		cJSON_Delete(j);
		if (rc)
			return rc;
	}
	free(line);
	if (n != want) {
		fprintf(stderr, "trace_check: %ld records, expected %ld\n", n, want);
		return 1;
	}
	printf("trace_check: %ld valid records; stages/latency at most %.3f; mean latency %.1f us; "
	       "%.0f lost\n", n, worst, n ? (double)sum_latency / 1e3 / (double)n : 0.0, last_lost);
	return 0;
}
