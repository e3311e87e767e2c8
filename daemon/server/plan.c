#include "daemon/server/plan.h"

#include <inttypes.h>
#include <string.h>

#include "daemon/engine/engine.h"
#include "kernels/cpu/isa.h"
#ifdef MOE_HAVE_CUDA
#include "kernels/cuda/device.h"
#endif

/* MemAvailable from /proc/meminfo: what can be allocated without swapping. */
static uint64_t mem_available(void)
{
	FILE *f = fopen("/proc/meminfo", "r");
	char line[256];
	uint64_t kb = 0;

	if (!f)
		return 0;
	while (fgets(line, sizeof(line), f))
		if (sscanf(line, "MemAvailable: %" SCNu64 " kB", &kb) == 1)
			break;
	fclose(f);
	return kb * 1024;
}

static void choose_device(const struct moe_config *c, struct moe_plan *p)
{
	p->backend = "cpu";
	p->device_ok = true;
#ifdef MOE_HAVE_CUDA
	char why[200] = "", name[128];
	int n = moe_cuda_device_count(why, sizeof(why));
	size_t mem = 0;

	if (c->devices.kind != MOE_CFG_DEV_CUDA) {
		if (n > 0)
			snprintf(p->device_note, sizeof(p->device_note),
				 "none used: devices is cpu (%d GPU%s visible; devices: cuda "
				 "serves on GPU 0)", n, n > 1 ? "s" : "");
		else
			snprintf(p->device_note, sizeof(p->device_note), "none: no usable GPU (%s)",
				 n == 0 ? "no CUDA device" : why);
		return;
	}
	p->backend = "cuda";
	p->device = c->devices.all_gpus ? 0 : c->devices.gpu_ids[0];
	p->device_ok = false;
	if (n <= 0)
		snprintf(p->device_note, sizeof(p->device_note),
			 "devices asks for a GPU, but none is usable: %s",
			 n == 0 ? "no CUDA device" : why);
	else if (c->devices.all_gpus && n > 1)
		snprintf(p->device_note, sizeof(p->device_note),
			 "devices: cuda, and %d GPUs are visible: moed serves one GPU for now; "
			 "name it, e.g. devices: [0]", n);
	else if (p->device >= n)
		snprintf(p->device_note, sizeof(p->device_note),
			 "devices asks for GPU %d, but %d GPU%s visible (ids 0..%d)", p->device, n,
			 n > 1 ? "s are" : " is", n - 1);
	else if (moe_cuda_device_info(p->device, name, sizeof(name), &mem))
		snprintf(p->device_note, sizeof(p->device_note), "GPU %d: cannot read its properties",
			 p->device);
	else {
		p->device_ok = true;
		p->device_mem = mem;
		snprintf(p->device_note, sizeof(p->device_note), "GPU %d: %s, %.1f GiB", p->device,
			 name, (double)mem / (1 << 30));
	}
#else
	if (c->devices.kind == MOE_CFG_DEV_CUDA) { /* the parser refuses it first */
		p->device_ok = false;
		snprintf(p->device_note, sizeof(p->device_note), "built without CUDA");
		return;
	}
	snprintf(p->device_note, sizeof(p->device_note), "none: built without CUDA");
#endif
}

void moe_plan_compute(const struct moe_config *c, const struct moe_model *m,
		      const char *isa_request, struct moe_plan *p)
{
	struct moe_engine_opts o = {.threads = c->cpu.threads,
				    .max_batch_tokens = c->scheduler.max_batch_tokens,
				    .n_ranks = c->devices.n_ranks ? c->devices.n_ranks : 1,
				    .spare_slots = c->placement.spare_slots,
				    .tuning.isa = isa_request ? isa_request : moe_cfg_isa_name(c->cpu.isa),
				    .tuning.precision = moe_cfg_precision_name(c->cpu.precision)};
	uint64_t per = (m->n_experts + o.n_ranks - 1) / o.n_ranks;

	memset(p, 0, sizeof(*p));
	p->n_ranks = o.n_ranks;
	p->slots_per_rank = (uint32_t)(per + o.spare_slots);
	p->weight_bytes_per_rank = (uint64_t)m->n_moe_layers *
				   (p->slots_per_rank * m->expert_bytes + m->layer_fixed_bytes);
	p->workspace_bytes = moe_engine_workspace_bytes(m, &o);
	p->mem_available = mem_available();
	p->fits = !p->mem_available ||
		  p->n_ranks * p->weight_bytes_per_rank + p->workspace_bytes <= p->mem_available;
	choose_device(c, p);
	if (!strcmp(p->backend, "cuda")) {
		/* the weights go to the GPU; the host keeps a copy of the routers */
		o.backend = "cuda";
		p->workspace_bytes = moe_engine_device_workspace_bytes(m, &o);
		p->fits = !p->device_mem ||
			  p->weight_bytes_per_rank + p->workspace_bytes <= p->device_mem;
	}
	{
		enum moe_cpu_isa isa;

		p->isa = moe_cpu_isa_resolve(isa_request ? isa_request : moe_cfg_isa_name(c->cpu.isa),
					     isa_request ? "MOE_CPU_ISA" : NULL, &isa, p->isa_err,
					     sizeof(p->isa_err))
				 ? -1
				 : (int)isa;
		if (p->isa >= 0) {
			const char *k = moe_backend_cpu_kernels(m, &o.tuning, p->kernels_note,
								sizeof(p->kernels_note), p->isa_err);

			snprintf(p->kernels, sizeof(p->kernels), "%s", k ? k : "?");
			if (!k)
				p->isa = -1;
		}
	}
}

static void human(uint64_t b, char *buf, size_t n)
{
	const char *u[] = {"B", "KiB", "MiB", "GiB", "TiB"};
	double v = (double)b;
	int i = 0;

	while (v >= 1024 && i < 4)
		v /= 1024, i++;
	snprintf(buf, n, i ? "%.1f %s" : "%.0f %s", v, u[i]);
}


void moe_plan_print(FILE *f, const struct moe_config *c, const struct moe_model *m,
		    const struct moe_plan *p)
{
	char a[32], b[32], d[32];

	fprintf(f, "model:       %s\n", m->dir);
	fprintf(f, "family:      %s (%s weights)\n", moe_family_name(m->family),
		moe_dtype_name(m->dtype));
	fprintf(f, "shape:       hidden %u, expert intermediate %u, %u experts, top-%u", m->hidden,
		m->inter, m->n_experts, m->top_k);
	if (m->shared_inter)
		fprintf(f, ", shared expert intermediate %u", m->shared_inter);
	fprintf(f, "\nmoe layers:  %u of %u:", m->n_moe_layers, m->n_layers);
	for (uint32_t i = 0; i < m->n_moe_layers; i++)
		fprintf(f, "%s%u", i ? "," : " ", m->layers[i].index);
	fprintf(f, "\nrouting:     %s%s%s, scale %g\n",
		m->route.score == MOE_SCORE_SIGMOID ? "sigmoid + correction bias" : "softmax",
		m->route.group == MOE_GROUP_NONE ? ""
		: m->route.group == MOE_GROUP_MAX ? ", group-limited (max)"
						  : ", group-limited (sum of top-2)",
		m->route.renormalize ? ", renormalized" : "", m->route.scale);
	if (!p->device_ok)
		fprintf(f, "backend:     ERROR: %s\n", p->device_note);
	else if (!strcmp(p->backend, "cuda"))
		fprintf(f, "backend:     cuda (%s; expert GEMMs with cuBLAS)\n", p->device_note);
	else
		fprintf(f, "backend:     cpu (GPU: %s)\n", p->device_note);
	if (strcmp(p->backend, "cuda")) {
		if (p->isa >= 0)
			fprintf(f, "kernels:     %s%s%s%s (cpu.isa %s, cpu.precision %s; best verified "
				"on this CPU: %s)\n", p->kernels,
				p->kernels_note[0] ? " (" : "", p->kernels_note,
				p->kernels_note[0] ? ")" : "",
				moe_cfg_isa_name(c->cpu.isa), moe_cfg_precision_name(c->cpu.precision),
				moe_cpu_isa_name(moe_cpu_isa_best()));
		else
			fprintf(f, "kernels:     ERROR: %s\n", p->isa_err);
	}
	human(m->expert_bytes, a, sizeof(a));
	fprintf(f, "ranks:       %u (%s), %u slots per rank per layer (%s per expert)\n",
		p->n_ranks, p->backend, p->slots_per_rank, a);
	human(p->weight_bytes_per_rank, a, sizeof(a));
	human(p->workspace_bytes, b, sizeof(b));
	human(p->mem_available, d, sizeof(d));
	if (!strcmp(p->backend, "cuda")) {
		human(p->device_mem, d, sizeof(d));
		fprintf(f, "memory:      %s of weights + %s of device workspaces (max_batch_tokens "
			   "%u); %s on the GPU\n",
			a, b, c->scheduler.max_batch_tokens, p->device_mem ? d : "unknown");
	} else {
		fprintf(f, "memory:      %s of weights per rank + %s of workspaces (max_batch_tokens "
			   "%u); %s available\n",
			a, b, c->scheduler.max_batch_tokens, p->mem_available ? d : "unknown");
	}
	fprintf(f, "fits:        %s\n", p->fits ? "yes" : "NO");
}
