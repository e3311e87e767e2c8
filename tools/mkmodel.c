/* moe-mkmodel — writes a synthetic MoE checkpoint in Hugging Face layout. */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tools/synth.h"

static void usage(FILE *f)
{
	fprintf(f,
		"usage: moe-mkmodel --family F --out DIR [options]\n"
		"  --family F        mixtral | qwen2_moe | qwen3_moe | olmoe | deepseek_v2 | deepseek_v3\n"
		"  --out DIR         checkpoint directory to create\n"
		"  --hidden N        hidden size (default 2048)\n"
		"  --inter N         per-expert intermediate size (default 1024)\n"
		"  --shared-inter N  shared expert intermediate size (qwen2_moe, deepseek: n_shared*inter)\n"
		"  --experts N       routed experts (default 64; mixtral 8)\n"
		"  --top-k N         experts per token (default 8; mixtral 2)\n"
		"  --layers N        decoder layers (default 2)\n"
		"  --dense-first N   deepseek first_k_dense_replace (default 0)\n"
		"  --sparse-step N   qwen decoder_sparse_step (default 1)\n"
		"  --groups G:K      deepseek n_group:topk_group\n"
		"  --group-limited   deepseek_v2 topk_method group_limited_greedy\n"
		"  --scale X         routed_scaling_factor\n"
		"  --norm 0|1        norm_topk_prob\n"
		"  --dtype D         bf16 | f16 | f32 (default bf16)\n"
		"  --layout L        per_expert | fused (default per_expert)\n"
		"  --shards N        write N shards + model.safetensors.index.json\n"
		"  --skew X          router favours some experts (0 = uniform, default 0)\n"
		"  --zipf S          deepseek_v3: experts chosen with Zipf(S) frequencies over a\n"
		"                    seeded order (sets n_group = topk_group = 1)\n"
		"  --seed N          (default 1)\n");
}

static unsigned long num(const char *opt, const char *s)
{
	char *end;
	unsigned long v = strtoul(s, &end, 10);

	if (!*s || *end) {
		fprintf(stderr, "moe-mkmodel: %s: expected a number, got '%s'\n", opt, s);
		exit(2);
	}
	return v;
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{"family", 1, NULL, 'f'},  {"out", 1, NULL, 'o'},	  {"hidden", 1, NULL, 'H'},
		{"inter", 1, NULL, 'I'},   {"shared-inter", 1, NULL, 'S'}, {"experts", 1, NULL, 'E'},
		{"top-k", 1, NULL, 'K'},   {"layers", 1, NULL, 'L'},	  {"dense-first", 1, NULL, 'D'},
		{"sparse-step", 1, NULL, 'P'}, {"groups", 1, NULL, 'G'}, {"group-limited", 0, NULL, 'g'},
		{"scale", 1, NULL, 'x'},   {"norm", 1, NULL, 'n'},	  {"dtype", 1, NULL, 'd'},
		{"layout", 1, NULL, 'l'},  {"shards", 1, NULL, 's'},	  {"skew", 1, NULL, 'k'}, {"zipf", 1, NULL, 'z'},
		{"seed", 1, NULL, 'r'},	   {"help", 0, NULL, 'h'},	  {0},
	};
	struct moe_synth_opts o;
	const char *out = NULL, *family = NULL;
	char err[MOE_ERRLEN];
	int c, fam;

	/* the family decides the defaults: find it first */
	for (int i = 1; i + 1 < argc; i++)
		if (strcmp(argv[i], "--family") == 0)
			family = argv[i + 1];
	if (!family || (fam = moe_family_parse(family)) < 0) {
		usage(stderr);
		return 2;
	}
	moe_synth_defaults(&o, fam);
	while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
		switch (c) {
		case 'f':
			break;
		case 'o':
			out = optarg;
			break;
		case 'H':
			o.hidden = num("--hidden", optarg);
			break;
		case 'I':
			o.inter = num("--inter", optarg);
			if (fam == MOE_FAM_DEEPSEEK_V2 || fam == MOE_FAM_DEEPSEEK_V3)
				o.shared_inter = o.inter;
			break;
		case 'S':
			o.shared_inter = num("--shared-inter", optarg);
			break;
		case 'E':
			o.experts = num("--experts", optarg);
			break;
		case 'K':
			o.top_k = num("--top-k", optarg);
			break;
		case 'L':
			o.layers = num("--layers", optarg);
			break;
		case 'D':
			o.dense_first = num("--dense-first", optarg);
			break;
		case 'P':
			o.sparse_step = num("--sparse-step", optarg);
			break;
		case 'G':
			if (sscanf(optarg, "%u:%u", &o.n_group, &o.topk_group) != 2) {
				fprintf(stderr, "moe-mkmodel: --groups: expected G:K\n");
				return 2;
			}
			break;
		case 'g':
			o.group_limited = true;
			break;
		case 'x':
			o.routed_scale = strtof(optarg, NULL);
			break;
		case 'n':
			o.norm_topk = num("--norm", optarg) != 0;
			break;
		case 'd':
			if (strcmp(optarg, "bf16") == 0)
				o.dtype = MOE_DT_BF16;
			else if (strcmp(optarg, "f16") == 0)
				o.dtype = MOE_DT_F16;
			else if (strcmp(optarg, "f32") == 0)
				o.dtype = MOE_DT_F32;
			else {
				fprintf(stderr, "moe-mkmodel: --dtype: bf16, f16 or f32\n");
				return 2;
			}
			break;
		case 'l':
			if (strcmp(optarg, "per_expert") && strcmp(optarg, "fused")) {
				fprintf(stderr, "moe-mkmodel: --layout: per_expert or fused\n");
				return 2;
			}
			o.layout = strcmp(optarg, "fused") == 0 ? MOE_LAYOUT_FUSED
								: MOE_LAYOUT_PER_EXPERT;
			break;
		case 's':
			o.shards = num("--shards", optarg);
			break;
		case 'k':
			o.skew = strtof(optarg, NULL);
			break;
		case 'z':
			o.zipf = strtof(optarg, NULL);
			o.n_group = o.topk_group = 1;
			break;
		case 'r':
			o.seed = num("--seed", optarg);
			break;
		case 'h':
			usage(stdout);
			return 0;
		default:
			usage(stderr);
			return 2;
		}
	}
	if (!out) {
		usage(stderr);
		return 2;
	}
	if (moe_synth_write(out, &o, err)) {
		fprintf(stderr, "moe-mkmodel: %s\n", err);
		return 1;
	}
	printf("wrote %s: %s, %u layers, %u experts top-%u, hidden %u, inter %u, %s, "
	       "%.1f MiB of expert weights\n",
	       out, family, o.layers, o.experts, o.top_k, o.hidden, o.inter,
	       moe_dtype_name(o.dtype), (double)moe_synth_expert_bytes(&o) / (1 << 20));
	return 0;
}
