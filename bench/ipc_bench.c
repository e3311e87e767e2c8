/* moe-bench ipc — what the trip through moed costs.
 *
 * Measured in one run, on one machine: a plain Unix SOCK_SEQPACKET ping-pong
 * between two processes (32 bytes each way, the kernel's floor for a
 * socket wake-up round trip), a no-op request through moed's rings
 * (moe_ping: SQE, socket doorbell, CQE, doorbell back), a 1-token forward,
 * and the requests/s of 1, 4 and 16 concurrent client processes sending
 * 1-token forwards. Starts its own moed (next to this binary) on a small
 * synthetic model unless --socket names a running one.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "bench/hwlimits.h"
#include "moeclient.h"
#include "tools/synth.h"

int moe_bench_ipc(int argc, char **argv);

static void report(const char *what, double *v, int n)
{
	qsort(v, n, sizeof(double), moe_bench_cmp_double);
	printf("%-34s %9.1f %9.1f %9.1f\n", what, v[n / 2] * 1e6, v[(int)(n * 0.99)] * 1e6,
	       v[0] * 1e6);
}

static void socket_pingpong(int n)
{
	int sv[2];
	char buf[32] = {0};
	double *t = malloc(n * sizeof(double));
	pid_t p;

	if (socketpair(AF_UNIX, SOCK_SEQPACKET, 0, sv) < 0)
		return;
	p = fork();
	if (p == 0) {
		close(sv[0]);
		while (recv(sv[1], buf, sizeof(buf), 0) > 0)
			send(sv[1], buf, sizeof(buf), 0);
		_exit(0);
	}
	close(sv[1]);
	for (int i = 0; i < n; i++) {
		double t0 = moe_bench_now();

		send(sv[0], buf, sizeof(buf), 0);
		recv(sv[0], buf, sizeof(buf), 0);
		t[i] = moe_bench_now() - t0;
	}
	close(sv[0]);
	waitpid(p, NULL, 0);
	report("unix socket ping-pong (32 B)", t, n);
	free(t);
}

static double clients_rate(const char *sock, int nclients, double secs, uint32_t layer,
			   uint32_t hidden)
{
	uint64_t *done = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	double t0 = moe_bench_now(), t;
	pid_t pids[64];

	for (int i = 0; i < nclients; i++) {
		if ((pids[i] = fork()) == 0) {
			moe_client *c;
			float *x = calloc(hidden, sizeof(float)), *y = malloc(hidden * sizeof(float));
			uint64_t n = 0;

			for (uint32_t k = 0; k < hidden; k++)
				x[k] = (float)((k * 37) % 11) - 5.0f;
			if (moe_connect(sock, &c) == 0) {
				while (moe_bench_now() - t0 < secs &&
				       moe_forward(c, layer, MOE_DTYPE_F32, x, y, 1) == 0)
					n++;
				moe_disconnect(c);
			}
			__atomic_add_fetch(&done[0], n, __ATOMIC_RELAXED);
			_exit(0);
		}
	}
	for (int i = 0; i < nclients; i++) /* not wait(): moed may be our child too */
		waitpid(pids[i], NULL, 0);
	t = moe_bench_now() - t0;
	{
		double rate = (double)done[0] / t;

		munmap(done, 4096);
		return rate;
	}
}

static pid_t start_moed(const char *model, const char *sock)
{
	char exe[PATH_MAX], moed[PATH_MAX + 8];
	ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
	struct stat st;
	pid_t p;

	if (n < 0)
		return -1;
	exe[n] = '\0';
	*strrchr(exe, '/') = '\0';
	snprintf(moed, sizeof(moed), "%s/moed", exe);
	p = fork();
	if (p == 0) {
		int fd = open("/dev/null", O_WRONLY);

		if (fd >= 0)
			dup2(fd, 2);
		execl(moed, "moed", "--model", model, "--socket", sock, (char *)NULL);
		_exit(127);
	}
	for (int i = 0; i < 300; i++) {
		if (stat(sock, &st) == 0)
			return p;
		usleep(10000);
	}
	kill(p, SIGKILL);
	return -1;
}

int moe_bench_ipc(int argc, char **argv)
{
	const char *sock = NULL;
	char model[256] = "/tmp/moe-bench-ipc-model", sockbuf[64];
	int n = 20000;
	pid_t daemon = -1;
	moe_client *c;
	moe_model_info info;
	double *t;
	float *x, *y;

	for (int i = 1; i < argc; i++) {
		if (strcmp(argv[i], "--socket") == 0 && i + 1 < argc)
			sock = argv[++i];
		else if (strcmp(argv[i], "--model") == 0 && i + 1 < argc)
			snprintf(model, sizeof(model), "%s", argv[++i]);
		else if (strcmp(argv[i], "--count") == 0 && i + 1 < argc)
			n = atoi(argv[++i]);
		else {
			fprintf(stderr, "usage: moe-bench ipc [--socket PATH | --model DIR] "
					"[--count N]\n");
			return 2;
		}
	}
	if (!sock) {
		struct stat st;
		char probe[300];

		snprintf(probe, sizeof(probe), "%s/config.json", model);
		if (stat(probe, &st) != 0) {
			struct moe_synth_opts o;
			char err[MOE_ERRLEN];

			moe_synth_defaults(&o, MOE_FAM_OLMOE);
			o.hidden = 512, o.inter = 256, o.experts = 8, o.top_k = 2, o.layers = 1;
			o.dtype = MOE_DT_BF16;
			if (moe_synth_write(model, &o, err)) {
				fprintf(stderr, "moe-bench ipc: %s\n", err);
				return 1;
			}
		}
		snprintf(sockbuf, sizeof(sockbuf), "/tmp/moe-bench-ipc-%d.sock", (int)getpid());
		sock = sockbuf;
		daemon = start_moed(model, sock);
		if (daemon < 0) {
			fprintf(stderr, "moe-bench ipc: could not start moed\n");
			return 1;
		}
	}
	if (moe_connect(sock, &c)) {
		fprintf(stderr, "moe-bench ipc: cannot connect to %s\n", sock);
		return 1;
	}
	moe_get_model_info(c, &info);
	setvbuf(stdout, NULL, _IOLBF, 0);
	printf("moe-bench ipc: moed on %s (%s, hidden %u), %d round trips each\n\n", sock,
	       info.family, info.hidden, n);
	printf("%-34s %9s %9s %9s\n", "round trip", "p50 us", "p99 us", "min us");
	socket_pingpong(n);
	t = malloc(n * sizeof(double));
	for (int i = 0; i < n; i++) {
		uint64_t ns = 0;

		moe_ping(c, &ns);
		t[i] = (double)ns * 1e-9;
	}
	report("no-op request through moed", t, n);
	x = calloc(info.hidden, sizeof(float));
	y = malloc(info.hidden * sizeof(float));
	for (uint32_t k = 0; k < info.hidden; k++)
		x[k] = (float)((k * 37) % 11) - 5.0f;
	for (int i = 0; i < n / 4; i++) {
		double t0 = moe_bench_now();

		moe_forward(c, info.moe_layers[0], MOE_DTYPE_F32, x, y, 1);
		t[i] = moe_bench_now() - t0;
	}
	report("1-token forward through moed", t, n / 4);
	moe_disconnect(c);
	printf("\n%-34s %12s\n", "concurrent clients (1-token)", "requests/s");
	for (int k = 1; k <= 16; k *= 4)
		printf("%-34d %12.0f\n", k, clients_rate(sock, k, 1.0, info.moe_layers[0], info.hidden));
	free(t), free(x), free(y);
	if (daemon > 0) {
		kill(daemon, SIGTERM);
		waitpid(daemon, NULL, 0);
	}
	return 0;
}
