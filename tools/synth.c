#include "tools/synth.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "formats/safetensors.h"
#include "kernels/cpu/convert.h"

uint64_t moe_rng_next(struct moe_rng *r)
{
	/* splitmix64: good enough for weights, trivially seedable */
	uint64_t z = (r->s += 0x9e3779b97f4a7c15ull);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

double moe_rng_uniform(struct moe_rng *r)
{
	return (double)(moe_rng_next(r) >> 11) * (1.0 / 9007199254740992.0);
}

double moe_rng_normal(struct moe_rng *r)
{
	double u = moe_rng_uniform(r), v = moe_rng_uniform(r);

	return sqrt(-2.0 * log(1.0 - u)) * cos(6.283185307179586 * v);
}

void moe_synth_defaults(struct moe_synth_opts *o, enum moe_family f)
{
	*o = (struct moe_synth_opts){
		.family = f,
		.layout = MOE_LAYOUT_PER_EXPERT,
		.dtype = MOE_DT_BF16,
		.hidden = 2048,
		.inter = 1024,
		.experts = 64,
		.top_k = 8,
		.layers = 2,
		.sparse_step = 1,
		.n_group = 1,
		.topk_group = 1,
		.routed_scale = 1.0f,
		.seed = 1,
		.shards = 1,
	};
	if (f == MOE_FAM_MIXTRAL) {
		o->experts = 8;
		o->top_k = 2;
		o->norm_topk = true;
	}
	if (f == MOE_FAM_QWEN2_MOE)
		o->shared_inter = 4 * o->inter;
	if (f == MOE_FAM_QWEN3_MOE || f == MOE_FAM_DEEPSEEK_V3)
		o->norm_topk = true;
	if (f == MOE_FAM_DEEPSEEK_V2 || f == MOE_FAM_DEEPSEEK_V3)
		o->shared_inter = o->inter;
	if (f == MOE_FAM_DEEPSEEK_V3) {
		o->n_group = 8;
		o->topk_group = 4;
		o->routed_scale = 2.5f;
	}
}

uint64_t moe_synth_expert_bytes(const struct moe_synth_opts *o)
{
	uint32_t n = 0;

	for (uint32_t l = 0; l < o->layers; l++) {
		if (o->family == MOE_FAM_QWEN2_MOE || o->family == MOE_FAM_QWEN3_MOE)
			n += (l + 1) % (o->sparse_step ? o->sparse_step : 1) == 0;
		else if (o->family == MOE_FAM_DEEPSEEK_V2 || o->family == MOE_FAM_DEEPSEEK_V3)
			n += l >= o->dense_first;
		else
			n++;
	}
	return (uint64_t)n * o->experts * 3 * o->inter * o->hidden * moe_dtype_size(o->dtype);
}

static bool layer_is_moe(const struct moe_synth_opts *o, uint32_t l)
{
	if (o->family == MOE_FAM_QWEN2_MOE || o->family == MOE_FAM_QWEN3_MOE)
		return (l + 1) % o->sparse_step == 0;
	if (o->family == MOE_FAM_DEEPSEEK_V2 || o->family == MOE_FAM_DEEPSEEK_V3)
		return l >= o->dense_first;
	return true;
}

struct tlist {
	struct moe_st_wtensor *t;
	char **names;
	void **bufs;
	size_t n, cap;
};

static void *tl_add(struct tlist *tl, const char *name, enum moe_st_dtype dt, uint32_t nd,
		    uint64_t d0, uint64_t d1, uint64_t d2)
{
	uint64_t numel = d0 * (nd > 1 ? d1 : 1) * (nd > 2 ? d2 : 1);
	size_t esz = moe_st_dtype_bits(dt) / 8;

	if (tl->n == tl->cap) {
		size_t cap = tl->cap ? 2 * tl->cap : 64;
		void *a = realloc(tl->t, cap * sizeof(*tl->t));
		void *b = a ? realloc(tl->names, cap * sizeof(char *)) : NULL;
		void *c = b ? realloc(tl->bufs, cap * sizeof(void *)) : NULL;

		if (a)
			tl->t = a;
		if (b)
			tl->names = b;
		if (!c)
			return NULL;
		tl->bufs = c;
		tl->cap = cap;
	}
	tl->names[tl->n] = strdup(name);
	tl->bufs[tl->n] = malloc(numel * esz > 0 ? numel * esz : 1);
	if (!tl->names[tl->n] || !tl->bufs[tl->n]) {
		free(tl->names[tl->n]);
		free(tl->bufs[tl->n]);
		return NULL;
	}
	tl->t[tl->n] = (struct moe_st_wtensor){tl->names[tl->n], dt, nd, {d0, d1, d2},
					       tl->bufs[tl->n]};
	return tl->bufs[tl->n++];
}

static void tl_free(struct tlist *tl)
{
	for (size_t i = 0; i < tl->n; i++) {
		free(tl->names[i]);
		free(tl->bufs[i]);
	}
	free(tl->t);
	free(tl->names);
	free(tl->bufs);
}

static enum moe_st_dtype st_dtype(enum moe_dtype dt)
{
	return dt == MOE_DT_F32 ? MOE_ST_F32 : dt == MOE_DT_BF16 ? MOE_ST_BF16 : MOE_ST_F16;
}

/* n values N(0, std^2) * row_scale[row] in dtype dt. */
static void fill(struct moe_rng *r, enum moe_dtype dt, void *dst, uint64_t rows, uint64_t cols,
		 double std, const float *row_scale)
{
	float buf[1024];

	for (uint64_t i = 0; i < rows; i++) {
		double s = std * (row_scale ? row_scale[i] : 1.0);

		for (uint64_t c0 = 0; c0 < cols; c0 += 1024) {
			uint64_t nc = cols - c0 < 1024 ? cols - c0 : 1024;

			for (uint64_t j = 0; j < nc; j++)
				buf[j] = (float)(moe_rng_normal(r) * s);
			moe_cpu_from_f32(dt, buf,
					 (char *)dst + (i * cols + c0) * moe_dtype_size(dt), nc);
		}
	}
}

static int add_mat(struct tlist *tl, struct moe_rng *r, const struct moe_synth_opts *o,
		   const char *name, uint64_t rows, uint64_t cols, double std, const float *rs)
{
	void *p = tl_add(tl, name, st_dtype(o->dtype), 2, rows, cols, 0);

	if (!p)
		return -ENOMEM;
	fill(r, o->dtype, p, rows, cols, std, rs);
	return 0;
}

/* The correction biases that give sigmoid top-k over logits N(0, 4) the
 * selection frequencies K * p_e, p_e Zipf(s) over perm (see synth.h):
 * fixed-point iteration on a fixed sample of tokens, in log space. */
static void zipf_bias(const struct moe_synth_opts *o, const uint32_t *perm, float *bias)
{
	enum { M = 6000, ITERS = 400 };
	uint32_t E = o->experts, K = o->top_k;
	float *sg = malloc(sizeof(float) * M * E);
	double *want = malloc(sizeof(double) * E), *b = calloc(E, sizeof(double)), hs = 0;
	uint32_t *cnt = malloc(sizeof(uint32_t) * E);
	struct moe_rng r = {o->seed * 7919 + 17};

	if (!sg || !want || !b || !cnt)
		goto out;
	for (uint32_t i = 0; i < E; i++)
		hs += pow(i + 1.0, -o->zipf);
	for (uint32_t i = 0; i < E; i++)
		want[perm[i]] = (double)M * K * pow(i + 1.0, -o->zipf) / hs;
	for (size_t i = 0; i < (size_t)M * E; i++)
		sg[i] = (float)(1.0 / (1.0 + exp(-2.0 * moe_rng_normal(&r))));
	for (int it = 0; it < ITERS; it++) {
		memset(cnt, 0, sizeof(uint32_t) * E);
		for (uint32_t t = 0; t < M; t++) {
			const float *s = sg + (size_t)t * E;
			uint32_t top[64];

			for (uint32_t k = 0; k < K && k < 64; k++) {
				int best = -1;

				for (uint32_t e = 0; e < E; e++) {
					bool taken = false;

					for (uint32_t j = 0; j < k; j++)
						taken |= top[j] == e;
					if (!taken && (best < 0 || s[e] + b[e] > s[best] + b[best]))
						best = (int)e;
				}
				top[k] = (uint32_t)best;
				cnt[best]++;
			}
		}
		/* steps clamped: an expert never chosen must not leap over all */
		for (uint32_t e = 0; e < E; e++) {
			double d = log((want[e] + 1) / (cnt[e] + 1.0));

			d = d > 0.2 ? 0.2 : d < -0.2 ? -0.2 : d;
			b[e] += 0.5 * d / (1.0 + it / 100.0);
		}
	}
	for (uint32_t e = 0; e < E; e++)
		bias[e] = (float)b[e];
out:
	free(sg);
	free(want);
	free(b);
	free(cnt);
}

/* The generator of expert x of layer l: its own with expert_seed, else r. */
static struct moe_rng *expert_rng(const struct moe_synth_opts *o, struct moe_rng *r,
				  struct moe_rng *own, uint32_t l, uint32_t x)
{
	uint64_t seed = o->alt && o->alt(o->alt_arg, l, x) ? o->expert_seed_alt : o->expert_seed;

	if (!o->expert_seed)
		return r;
	own->s = seed * 0x9e3779b97f4a7c15ull ^ ((uint64_t)l << 32 | x) * 0xbf58476d1ce4e5b9ull;
	moe_rng_next(own);
	return own;
}

static int add_layer(struct tlist *tl, struct moe_rng *r, const struct moe_synth_opts *o,
		     uint32_t l, const float *router_scale, const float *zbias)
{
	uint32_t H = o->hidden, I = o->inter, E = o->experts, Is = o->shared_inter;
	double sh = 1.0 / sqrt(H), si = 1.0 / sqrt(I);
	enum moe_family f = o->family;
	char name[256];
	int ret = 0;

#define NAME(kind, e) moe_model_tensor_name(f, o->layout, l, kind, e, name, sizeof(name))
	NAME(MOE_T_ROUTER, 0);
	ret = add_mat(tl, r, o, name, E, H, 2.0 * sh, router_scale);
	if (!ret && f == MOE_FAM_DEEPSEEK_V3) {
		float *b;

		NAME(MOE_T_BIAS, 0);
		b = tl_add(tl, name, MOE_ST_F32, 1, E, 0, 0);
		if (!b)
			return -ENOMEM;
		for (uint32_t e = 0; e < E; e++)
			b[e] = zbias ? zbias[e] : (float)(0.05 * moe_rng_normal(r));
	}
	if (!ret && o->layout == MOE_LAYOUT_FUSED) {
		void *gu, *dn;
		size_t esz = moe_dtype_size(o->dtype);

		NAME(MOE_T_FUSED_GATE_UP, 0);
		gu = tl_add(tl, name, st_dtype(o->dtype), 3, E, 2ull * I, H);
		NAME(MOE_T_FUSED_DOWN, 0);
		dn = tl_add(tl, name, st_dtype(o->dtype), 3, E, H, I);
		if (!gu || !dn)
			return -ENOMEM;
		for (uint32_t e = 0; e < E; e++) {
			struct moe_rng own, *er = expert_rng(o, r, &own, l, e);

			fill(er, o->dtype, (char *)gu + (size_t)e * 2 * I * H * esz, 2ull * I, H, sh,
			     NULL);
			fill(er, o->dtype, (char *)dn + (size_t)e * H * I * esz, H, I, si, NULL);
		}
	} else {
		for (uint32_t e = 0; e < E && !ret; e++) {
			struct moe_rng own, *er = expert_rng(o, r, &own, l, e);

			NAME(MOE_T_GATE, e);
			ret = add_mat(tl, er, o, name, I, H, sh, NULL);
			NAME(MOE_T_UP, e);
			ret = ret ? ret : add_mat(tl, er, o, name, I, H, sh, NULL);
			NAME(MOE_T_DOWN, e);
			ret = ret ? ret : add_mat(tl, er, o, name, H, I, si, NULL);
		}
	}
	if (!ret && Is) {
		NAME(MOE_T_SHARED_GATE, 0);
		ret = add_mat(tl, r, o, name, Is, H, sh, NULL);
		NAME(MOE_T_SHARED_UP, 0);
		ret = ret ? ret : add_mat(tl, r, o, name, Is, H, sh, NULL);
		NAME(MOE_T_SHARED_DOWN, 0);
		ret = ret ? ret : add_mat(tl, r, o, name, H, Is, 1.0 / sqrt(Is), NULL);
	}
	if (!ret && Is && f == MOE_FAM_QWEN2_MOE) {
		NAME(MOE_T_SHARED_EXPERT_GATE, 0);
		ret = add_mat(tl, r, o, name, 1, H, sh, NULL);
	}
#undef NAME
	return ret;
}

static int write_config(const char *dir, const struct moe_synth_opts *o, char *err)
{
	cJSON *c = cJSON_CreateObject();
	char path[4096];
	char *s;
	FILE *fp;
	int ret = 0;
	enum moe_family f = o->family;

	if (!c)
		return moe_err(err, -ENOMEM, "out of memory");
	cJSON_AddStringToObject(c, "model_type", moe_family_name(f));
	cJSON_AddStringToObject(c, "hidden_act", "silu");
	cJSON_AddStringToObject(c, "torch_dtype", o->dtype == MOE_DT_F32	   ? "float32"
						  : o->dtype == MOE_DT_BF16 ? "bfloat16"
									    : "float16");
	cJSON_AddNumberToObject(c, "hidden_size", o->hidden);
	cJSON_AddNumberToObject(c, "num_hidden_layers", o->layers);
	cJSON_AddNumberToObject(c, "num_experts_per_tok", o->top_k);
	cJSON_AddStringToObject(c, "moed_synthetic", "MoE blocks only; written by moe-mkmodel");
	switch (f) {
	case MOE_FAM_MIXTRAL:
		cJSON_AddNumberToObject(c, "num_local_experts", o->experts);
		cJSON_AddNumberToObject(c, "intermediate_size", o->inter);
		break;
	case MOE_FAM_QWEN2_MOE:
	case MOE_FAM_QWEN3_MOE:
		cJSON_AddNumberToObject(c, "num_experts", o->experts);
		cJSON_AddNumberToObject(c, "moe_intermediate_size", o->inter);
		cJSON_AddNumberToObject(c, "intermediate_size", 4 * o->inter);
		cJSON_AddNumberToObject(c, "decoder_sparse_step", o->sparse_step);
		cJSON_AddItemToObject(c, "mlp_only_layers", cJSON_CreateArray());
		cJSON_AddBoolToObject(c, "norm_topk_prob", o->norm_topk);
		if (f == MOE_FAM_QWEN2_MOE)
			cJSON_AddNumberToObject(c, "shared_expert_intermediate_size",
						o->shared_inter);
		break;
	case MOE_FAM_OLMOE:
		cJSON_AddNumberToObject(c, "num_experts", o->experts);
		cJSON_AddNumberToObject(c, "intermediate_size", o->inter);
		cJSON_AddBoolToObject(c, "norm_topk_prob", o->norm_topk);
		break;
	case MOE_FAM_DEEPSEEK_V2:
	case MOE_FAM_DEEPSEEK_V3:
		cJSON_AddNumberToObject(c, "n_routed_experts", o->experts);
		cJSON_AddNumberToObject(c, "moe_intermediate_size", o->inter);
		cJSON_AddNumberToObject(c, "intermediate_size", 4 * o->inter);
		cJSON_AddNumberToObject(c, "n_shared_experts",
					o->inter ? o->shared_inter / o->inter : 0);
		cJSON_AddNumberToObject(c, "first_k_dense_replace", o->dense_first);
		cJSON_AddNumberToObject(c, "n_group", o->n_group);
		cJSON_AddNumberToObject(c, "topk_group", o->topk_group);
		cJSON_AddNumberToObject(c, "routed_scaling_factor", o->routed_scale);
		cJSON_AddBoolToObject(c, "norm_topk_prob", o->norm_topk);
		if (f == MOE_FAM_DEEPSEEK_V2)
			cJSON_AddStringToObject(c, "topk_method", o->group_limited
									  ? "group_limited_greedy"
									  : "greedy");
		break;
	default:
		break;
	}
	s = cJSON_Print(c);
	cJSON_Delete(c);
	snprintf(path, sizeof(path), "%s/config.json", dir);
	fp = s ? fopen(path, "w") : NULL;
	if (!fp || fputs(s, fp) < 0 || fputc('\n', fp) < 0)
		ret = moe_err(err, -EIO, "%s: cannot write", path);
	if (fp && fclose(fp) && !ret)
		ret = moe_err(err, -EIO, "%s: cannot write", path);
	free(s);
	return ret;
}

static int write_shards(const char *dir, const struct moe_synth_opts *o, struct tlist *tl,
			char *err)
{
	static const char *const meta[] = {"format", "pt", NULL};
	uint32_t S = o->shards ? o->shards : 1;
	char path[4096], file[128];
	struct moe_st_wtensor *sub;
	cJSON *idx, *map;
	uint64_t total = 0;
	char *s;
	int ret = 0;

	if (S == 1) {
		snprintf(path, sizeof(path), "%s/model.safetensors", dir);
		return moe_st_write(path, tl->t, tl->n, meta, err);
	}
	sub = malloc(tl->n * sizeof(*sub));
	idx = cJSON_CreateObject();
	map = cJSON_CreateObject();
	if (!sub || !idx || !map) {
		ret = moe_err(err, -ENOMEM, "out of memory");
		goto out;
	}
	/* Tensor i goes to shard i * S / n: contiguous runs, every shard used. */
	for (uint32_t sh = 0; sh < S && !ret; sh++) {
		size_t n = 0;

		snprintf(file, sizeof(file), "model-%05u-of-%05u.safetensors", sh + 1, S);
		for (size_t i = 0; i < tl->n; i++) {
			if (i * S / tl->n != sh)
				continue;
			sub[n++] = tl->t[i];
			cJSON_AddStringToObject(map, tl->t[i].name, file);
		}
		snprintf(path, sizeof(path), "%s/%s", dir, file);
		ret = moe_st_write(path, sub, n, meta, err);
	}
	for (size_t i = 0; i < tl->n; i++) {
		uint64_t b = moe_st_dtype_bits(tl->t[i].dtype) / 8;

		for (uint32_t d = 0; d < tl->t[i].ndim; d++)
			b *= tl->t[i].shape[d];
		total += b;
	}
	cJSON_AddNumberToObject(cJSON_AddObjectToObject(idx, "metadata"), "total_size",
				(double)total);
	cJSON_AddItemToObject(idx, "weight_map", map);
	map = NULL;
	if (!ret) {
		FILE *fp;

		s = cJSON_Print(idx);
		snprintf(path, sizeof(path), "%s/model.safetensors.index.json", dir);
		fp = s ? fopen(path, "w") : NULL;
		if (!fp || fputs(s, fp) < 0)
			ret = moe_err(err, -EIO, "%s: cannot write", path);
		if (fp && fclose(fp) && !ret)
			ret = moe_err(err, -EIO, "%s: cannot write", path);
		free(s);
	}
out:
	cJSON_Delete(map);
	cJSON_Delete(idx);
	free(sub);
	return ret;
}

int moe_synth_write(const char *dir, const struct moe_synth_opts *o, char *err)
{
	struct moe_rng r = {o->seed * 0x2545f4914f6cdd1dull + 1};
	struct tlist tl = {0};
	float *rs, *zb = NULL;
	uint32_t *perm;
	int ret = 0;

	if (!o->hidden || !o->inter || !o->experts || !o->top_k || o->top_k > o->experts ||
	    !o->layers || !o->sparse_step || !o->n_group || o->experts % o->n_group)
		return moe_err(err, -EINVAL, "inconsistent model options");
	if (mkdir(dir, 0755) < 0 && errno != EEXIST)
		return moe_err(err, -errno, "%s: %s", dir, strerror(errno));
	rs = malloc(o->experts * sizeof(float));
	perm = malloc(o->experts * sizeof(uint32_t));
	if (!rs || !perm) {
		ret = moe_err(err, -ENOMEM, "out of memory");
		goto out;
	}
	/* popularity falls linearly over a seeded permutation of the experts */
	for (uint32_t e = 0; e < o->experts; e++)
		perm[e] = e;
	for (uint32_t e = o->experts - 1; e > 0; e--) {
		uint32_t j = (uint32_t)(moe_rng_next(&r) % (e + 1)), t = perm[e];

		perm[e] = perm[j];
		perm[j] = t;
	}
	for (uint32_t e = 0; e < o->experts; e++)
		rs[perm[e]] = 1.0f + o->skew * (float)(o->experts - 1 - e) /
					     (float)(o->experts > 1 ? o->experts - 1 : 1);
	if (o->zipf > 0) {
		if (o->family != MOE_FAM_DEEPSEEK_V3 || o->n_group != 1 || o->topk_group != 1 ||
		    o->top_k > 64) {
			ret = moe_err(err, -EINVAL, "zipf: for deepseek_v3 with n_group = topk_group "
				      "= 1 only");
			goto out;
		}
		zb = malloc(o->experts * sizeof(float));
		if (!zb) {
			ret = moe_err(err, -ENOMEM, "out of memory");
			goto out;
		}
		zipf_bias(o, perm, zb);
	}
	for (uint32_t l = 0; l < o->layers && !ret; l++)
		if (layer_is_moe(o, l) && add_layer(&tl, &r, o, l, rs, zb))
			ret = moe_err(err, -ENOMEM, "out of memory generating layer %u", l);
	if (!ret && !tl.n)
		ret = moe_err(err, -EINVAL, "no MoE layer in %u layers", o->layers);
	if (!ret)
		ret = write_config(dir, o, err);
	if (!ret)
		ret = write_shards(dir, o, &tl, err);
out:
	free(rs);
	free(perm);
	free(zb);
	tl_free(&tl);
	return ret;
}
