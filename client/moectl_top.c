/* client/moectl_top.c — `moectl top`: a live view of moed for a person at a
 * terminal.
 *
 * Every interval (1 s by default) it reads the status JSON and the metrics
 * text over the control socket (two calls; nothing new in the daemon) and
 * redraws: rates from the counters' change since the last frame (requests/s,
 * tokens/s), p50/p99 from the change of moed_request_duration_seconds'
 * buckets (interpolated within a bucket, as Prometheus' histogram_quantile
 * does), queue, clients, a reload or placement change in progress, the
 * ranks' load bars (their share of the window's rows, and their busy time
 * over the interval), and per MoE layer the experts' heat: each expert's
 * share of the layer's tokens over the load window, one cell per expert
 * (several experts per cell, the hottest shown, when they do not fit), hot
 * experts (more than twice the mean) in reverse video.
 *
 * No curses: plain ANSI sequences (alternate screen, cursor home, erase to
 * end of line), the terminal put in non-canonical no-echo mode and restored
 * on every way out (q, Ctrl-C, SIGTERM, SIGHUP, the daemon gone). Sized to
 * the terminal at each frame (80x24 and wider; narrower is clipped). When
 * stdout is not a terminal it prints one frame without escapes and exits.
 */
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#include "client/moectl.h"

#define MAX_BUCKETS 64

static volatile sig_atomic_t stop_sig, resized;
static struct termios saved;
static bool raw_mode;

static void on_signal(int sig)
{
	if (sig == SIGWINCH)
		resized = 1;
	else
		stop_sig = sig;
}

static void term_restore(void)
{
	if (!raw_mode)
		return;
	/* cursor shown, attributes off, main screen back */
	fputs("\033[0m\033[?25h\033[?1049l", stdout);
	fflush(stdout);
	tcsetattr(STDIN_FILENO, TCSAFLUSH, &saved);
	raw_mode = false;
}

static int term_raw(void)
{
	struct termios t;

	if (tcgetattr(STDIN_FILENO, &saved))
		return -1;
	t = saved;
	t.c_lflag &= ~(tcflag_t)(ICANON | ECHO); /* ISIG kept: Ctrl-C is SIGINT */
	t.c_cc[VMIN] = 0;
	t.c_cc[VTIME] = 0;
	if (tcsetattr(STDIN_FILENO, TCSAFLUSH, &t))
		return -1;
	raw_mode = true;
	atexit(term_restore);
	fputs("\033[?1049h\033[?25l", stdout);
	return 0;
}

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* ---- the frame ------------------------------------------------------------ */

struct frame {
	char *p;
	size_t len, cap;
	int rows, cols, line;
	bool tty;
};

/* One line, clipped to the width (escape sequences do not count). */
static void line(struct frame *f, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void line(struct frame *f, const char *fmt, ...)
{
	char t[1024], out[1200];
	size_t o = 0;
	int vis = 0;
	va_list ap;

	if (f->line >= f->rows)
		return;
	va_start(ap, fmt);
	vsnprintf(t, sizeof(t), fmt, ap);
	va_end(ap);
	for (size_t i = 0; t[i] && o + 8 < sizeof(out); i++) {
		if (t[i] == '\033') { /* copy the sequence whole */
			while (t[i] && o + 8 < sizeof(out)) {
				out[o++] = t[i];
				if ((t[i] >= 'A' && t[i] <= 'Z') || (t[i] >= 'a' && t[i] <= 'z'))
					break;
				i++;
			}
			if (!t[i])
				break;
			continue;
		}
		if (vis < f->cols)
			out[o++] = t[i];
		vis++;
	}
	if (f->len + o + 16 > f->cap) {
		size_t cap = (f->cap + o + 16) * 2;
		char *p = realloc(f->p, cap);

		if (!p)
			return;
		f->p = p;
		f->cap = cap;
	}
	memcpy(f->p + f->len, out, o);
	f->len += o;
	if (f->tty) {
		memcpy(f->p + f->len, "\033[0m\033[K\r\n", 10);
		f->len += 10;
	} else {
		f->p[f->len++] = '\n';
	}
	f->line++;
}

/* A plain frame drops the escape sequences (not a terminal). */
static const char *hl(const struct frame *f, const char *seq)
{
	return f->tty ? seq : "";
}

/* ---- what the daemon said ------------------------------------------------- */

struct sample {
	double t;
	double requests, tokens;
	double busy_ms[64];
	uint32_t n_ranks;
	double le[MAX_BUCKETS], cum[MAX_BUCKETS];
	int n_buckets;
};

/* moed_request_duration_seconds' buckets from the metrics text. */
static void parse_buckets(const char *text, struct sample *s)
{
	static const char key[] = "moed_request_duration_seconds_bucket{le=\"";
	const char *p = text;

	s->n_buckets = 0;
	while ((p = strstr(p, key)) && s->n_buckets < MAX_BUCKETS) {
		char *end;
		double le;

		p += sizeof(key) - 1;
		le = strncmp(p, "+Inf", 4) ? strtod(p, &end) : INFINITY;
		p = strstr(p, "} ");
		if (!p)
			break;
		s->le[s->n_buckets] = le;
		s->cum[s->n_buckets++] = strtod(p + 2, &end);
		p = end;
	}
}

/* The q-quantile of the requests between a and b (seconds), or < 0. */
static double quantile(const struct sample *a, const struct sample *b, double q)
{
	double total, want, prev = 0, lo = 0;

	if (a->n_buckets != b->n_buckets || !b->n_buckets)
		return -1;
	total = b->cum[b->n_buckets - 1] - a->cum[a->n_buckets - 1];
	if (total <= 0)
		return -1;
	want = q * total;
	for (int i = 0; i < b->n_buckets; i++) {
		double c = b->cum[i] - a->cum[i];

		if (c >= want) {
			if (isinf(b->le[i]))
				return lo; /* above the last bound: say the last bound */
			return lo + (b->le[i] - lo) * (c > prev ? (want - prev) / (c - prev) : 1.0);
		}
		prev = c;
		lo = b->le[i];
	}
	return lo;
}

static const char *fmt_ms(char *t, size_t n, double s)
{
	if (s < 0)
		snprintf(t, n, "-");
	else if (s < 0.001)
		snprintf(t, n, "%.0f us", s * 1e6);
	else
		snprintf(t, n, "%.2f ms", s * 1e3);
	return t;
}

static void take(const cJSON *st, const char *metrics, struct sample *s)
{
	const cJSON *rq = obj(st, "requests"), *ranks = obj(obj(st, "load"), "ranks"), *r;

	s->t = now_s();
	s->requests = num(rq, "completed") + num(rq, "errors");
	s->tokens = num(rq, "tokens");
	s->n_ranks = 0;
	cJSON_ArrayForEach(r, ranks)
	{
		if (s->n_ranks < 64)
			s->busy_ms[s->n_ranks++] = num(r, "busy_ms");
	}
	parse_buckets(metrics, s);
}

/* What is changing the daemon now: a reload, a placement change. */
static void activity(struct frame *f, const cJSON *st)
{
	const cJSON *rl = obj(obj(st, "weights"), "reload"), *j;
	bool any = false;

	if (cJSON_IsObject(rl)) {
		line(f, "%sreload%s: job %.0f, %.0f/%.0f steps, %.1f s", hl(f, "\033[1;33m"),
		     hl(f, "\033[0m"), num(rl, "job"), num(rl, "steps_done"), num(rl, "steps_total"),
		     num(rl, "elapsed_s"));
		any = true;
	}
	cJSON_ArrayForEach(j, obj(st, "jobs"))
	{
		const cJSON *op = cJSON_GetObjectItemCaseSensitive(j, "op"),
			    *state = cJSON_GetObjectItemCaseSensitive(j, "state");

		if (!cJSON_IsString(op) || !cJSON_IsString(state) ||
		    strcmp(state->valuestring, "running") || !strcmp(op->valuestring, "reload"))
			continue;
		line(f, "%s%s%s: job %.0f, %.0f/%.0f steps", hl(f, "\033[1;33m"), op->valuestring,
		     hl(f, "\033[0m"), num(j, "id"), num(j, "done"), num(j, "total"));
		any = true;
	}
	if (!any)
		line(f, "changes:  none running");
}

static void bar(char *t, size_t n, double frac, int width)
{
	int k = (int)lround(frac * width);

	if (k < 0)
		k = 0;
	if (k > width)
		k = width;
	if ((size_t)width + 3 > n)
		width = (int)n - 3;
	t[0] = '[';
	for (int i = 0; i < width; i++)
		t[1 + i] = i < k ? '#' : ' ';
	t[width + 1] = ']';
	t[width + 2] = '\0';
}

static void ranks(struct frame *f, const cJSON *st, const struct sample *a,
		  const struct sample *b)
{
	const cJSON *rs = obj(obj(st, "load"), "ranks"), *r;
	double total = 0, dt = a ? b->t - a->t : 0;
	uint32_t i = 0;
	int w = f->cols - 40;
	char t[256];

	if (w < 10)
		w = 10;
	if (w > 60)
		w = 60;
	cJSON_ArrayForEach(r, rs) total += num(r, "rows_window");
	cJSON_ArrayForEach(r, rs)
	{
		double share = total > 0 ? num(r, "rows_window") / total : 0;
		double busy = a && dt > 0 && i < a->n_ranks && i < b->n_ranks
				      ? (b->busy_ms[i] - a->busy_ms[i]) / 1e3 / dt
				      : -1;

		bar(t, sizeof(t), share, w);
		if (busy >= 0)
			line(f, "rank %-3u %s %5.1f%% rows, busy %3.0f%%%s", i, t, share * 100,
			     busy * 100, cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(r, "lost"))
						 ? " LOST" : "");
		else
			line(f, "rank %-3u %s %5.1f%% rows%s", i, t, share * 100,
			     cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(r, "lost")) ? " LOST"
											   : "");
		i++;
	}
}

/* Per layer: one cell per expert (or per group of experts). */
static void heat(struct frame *f, const cJSON *st)
{
	static const char ramp[] = " .:-=+*#%@";
	const cJSON *layers = obj(st, "layers"), *l;
	int n = cJSON_GetArraySize(layers), shown = 0;
	int room = f->rows - f->line - 2, cells_w = f->cols - 12;

	if (cells_w < 8)
		cells_w = 8;
	line(f, "%sexpert heat%s (tokens per expert over the window; %s hot%s: > 2x the mean)",
	     hl(f, "\033[1m"), hl(f, "\033[0m"), hl(f, "\033[7m"), hl(f, "\033[0m"));
	cJSON_ArrayForEach(l, layers)
	{
		const cJSON *tok = obj(l, "expert_tokens_window");
		int E = cJSON_GetArraySize(tok), per = (E + cells_w - 1) / (cells_w ? cells_w : 1);
		double sum = 0, mx = 0, mean;
		char row[1024];
		size_t o = 0;

		if (shown >= room - 1 && shown < n - 1) {
			line(f, "  ... %d more layers (a taller terminal shows them)", n - shown);
			break;
		}
		if (per < 1)
			per = 1;
		for (int e = 0; e < E; e++) {
			double v = cJSON_GetArrayItem(tok, e)->valuedouble;

			sum += v;
			mx = v > mx ? v : mx;
		}
		mean = E ? sum / E : 0;
		for (int e = 0; e < E && o + 16 < sizeof(row); e += per) {
			double v = 0;
			int k;

			for (int x = e; x < e + per && x < E; x++)
				v = fmax(v, cJSON_GetArrayItem(tok, x)->valuedouble);
			k = mx > 0 ? (int)ceil(v / mx * (sizeof(ramp) - 2)) : 0;
			if (mean > 0 && v > 2 * mean && f->tty) {
				memcpy(row + o, "\033[7m", 4);
				o += 4;
				row[o++] = ramp[k];
				memcpy(row + o, "\033[0m", 4);
				o += 4;
			} else {
				row[o++] = mean > 0 && v > 2 * mean ? '!' : ramp[k];
			}
		}
		row[o] = '\0';
		line(f, "L%-4.0f %5.2f|%s|", num(l, "layer"),
		     num(obj(l, "imbalance"), "expert_cv"), row);
		shown++;
	}
}

static void draw(struct frame *f, const cJSON *st, const struct sample *a,
		 const struct sample *b)
{
	const cJSON *m = obj(st, "model"), *be = obj(st, "backend"), *q = obj(st, "queue");
	double dt = a ? b->t - a->t : 0;
	char rps[32] = "-", tps[32] = "-", p50[32], p99[32];

	f->len = 0;
	f->line = 0;
	if (f->tty)
		fputs("\033[H", stdout);
	if (a && dt > 0) {
		snprintf(rps, sizeof(rps), "%.0f", (b->requests - a->requests) / dt);
		snprintf(tps, sizeof(tps), "%.0f", (b->tokens - a->tokens) / dt);
	}
	line(f, "%smoed%s %s, up %.0f s  %s %s, %s (%s kernels, %.0f ranks)   q: quit",
	     hl(f, "\033[1m"), hl(f, "\033[0m"),
	     str(st, "state"), num(st, "uptime_s"), str(m, "family"), str(m, "dtype"),
	     str(be, "name"), str(be, "kernels"), num(be, "ranks"));
	line(f, "requests/s %s  tokens/s %s  p50 %s  p99 %s", rps, tps,
	     fmt_ms(p50, sizeof(p50), a ? quantile(a, b, 0.50) : -1),
	     fmt_ms(p99, sizeof(p99), a ? quantile(a, b, 0.99) : -1));
	line(f, "queue %.0f requests, %.0f tokens pending   clients %d", num(q, "pending_requests"),
	     num(q, "pending_tokens"), cJSON_GetArraySize(obj(st, "clients")));
	activity(f, st);
	line(f, "%s", "");
	ranks(f, st, a, b);
	line(f, "%s", "");
	heat(f, st);
	fwrite(f->p, 1, f->len, stdout);
	if (f->tty)
		fputs("\033[J", stdout);
	fflush(stdout);
}

static void term_size(struct frame *f)
{
	struct winsize ws;

	f->rows = 24;
	f->cols = 80;
	if (f->tty && !ioctl(STDOUT_FILENO, TIOCGWINSZ, &ws) && ws.ws_row && ws.ws_col) {
		f->rows = ws.ws_row;
		f->cols = ws.ws_col;
	}
	if (!f->tty)
		f->rows = 10000;
}

/* One round: status + metrics; 0, or the library's error. */
static int fetch(moe_client *c, cJSON **st, struct sample *s)
{
	char *json = NULL, *text = NULL;
	size_t jl, tl;
	int r = moe_status_json(c, &json, &jl);

	if (!r)
		r = moe_metrics_text(c, &text, &tl);
	if (!r) {
		*st = cJSON_ParseWithLength(json, jl);
		if (!cJSON_IsObject(*st)) {
			cJSON_Delete(*st);
			*st = NULL;
			r = MOE_EPROTO;
		} else {
			take(*st, text, s);
		}
	}
	free(json);
	free(text);
	return r;
}

int cmd_top(int argc, char **argv)
{
	static const struct option opts[] = {{"interval", required_argument, NULL, 'i'},
	                                     {"help", no_argument, NULL, 'h'},
	                                     {NULL, 0, NULL, 0}};
	struct sigaction sa = {.sa_handler = on_signal};
	struct frame f = {.tty = isatty(STDOUT_FILENO) && isatty(STDIN_FILENO)};
	struct sample s[2];
	double interval = 1.0;
	moe_client *c;
	int ch, rc = EXIT_OK, cur = 0, have = 0;

	while ((ch = getopt_long(argc, argv, "i:h", opts, NULL)) != -1) {
		char *end;

		if (ch == 'i') {
			errno = 0;
			interval = strtod(optarg, &end);
			if (errno || *end || !(interval >= 0.1 && interval <= 3600)) {
				fprintf(stderr, "moectl: top: --interval: seconds, 0.1..3600\n");
				return EXIT_USAGE;
			}
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
	sigemptyset(&sa.sa_mask);
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGHUP, &sa, NULL);
	sigaction(SIGWINCH, &sa, NULL);
	if (f.tty && term_raw()) {
		fprintf(stderr, "moectl: top: cannot set up the terminal: %s\n", strerror(errno));
		moe_disconnect(c);
		return EXIT_ERR;
	}
	for (;;) {
		cJSON *st = NULL;
		struct pollfd pfd = {.fd = STDIN_FILENO, .events = POLLIN};
		double until;
		int r = fetch(c, &st, &s[cur]);

		if (r) {
			term_restore();
			rc = fail(r, "top");
			break;
		}
		term_size(&f);
		draw(&f, st, have ? &s[cur ^ 1] : NULL, &s[cur]);
		cJSON_Delete(st);
		have = 1;
		cur ^= 1;
		if (!f.tty)
			break; /* one frame to a pipe or file */
		until = now_s() + interval;
		while (!stop_sig && !resized) {
			double left = until - now_s();
			char k;

			if (left <= 0)
				break;
			if (poll(&pfd, 1, (int)(left * 1000) + 1) > 0 && read(STDIN_FILENO, &k, 1) == 1 &&
			    (k == 'q' || k == 'Q'))
				stop_sig = -1;
		}
		resized = 0;
		if (stop_sig)
			break;
	}
	term_restore();
	free(f.p);
	moe_disconnect(c);
	/* q, Ctrl-C: a normal way out */
	return rc;
}
