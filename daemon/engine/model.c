#include "daemon/engine/model.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cpu/convert.h"

#define MAX_CONFIG_BYTES (16u << 20)
#define MAX_HIDDEN	 (1u << 17)
#define MAX_INTER	 (1u << 20)
#define MAX_LAYERS	 4096

static const char *const family_names[MOE_FAM_COUNT] = {
	[MOE_FAM_MIXTRAL] = "mixtral",
	[MOE_FAM_QWEN2_MOE] = "qwen2_moe",
	[MOE_FAM_QWEN3_MOE] = "qwen3_moe",
	[MOE_FAM_OLMOE] = "olmoe",
	[MOE_FAM_DEEPSEEK_V2] = "deepseek_v2",
	[MOE_FAM_DEEPSEEK_V3] = "deepseek_v3",
};

const char *moe_family_name(enum moe_family f)
{
	return (unsigned)f < MOE_FAM_COUNT ? family_names[f] : "?";
}

int moe_family_parse(const char *s)
{
	for (int i = 0; i < MOE_FAM_COUNT; i++)
		if (strcmp(s, family_names[i]) == 0)
			return i;
	return -1;
}

/* ------------------------------------------------------------------------
 * Tensor names
 * ------------------------------------------------------------------------ */

static bool is_deepseek(enum moe_family f)
{
	return f == MOE_FAM_DEEPSEEK_V2 || f == MOE_FAM_DEEPSEEK_V3;
}

/* Mixtral's hub checkpoints use block_sparse_moe and w1/w3/w2; transformers
 * v5 renames the block to mlp when it fuses the experts. */
static int name_with(enum moe_family f, const char *block, enum moe_layout layout,
		     uint32_t layer, enum moe_tensor_kind kind, uint32_t e, char *buf, size_t n)
{
	bool mix = f == MOE_FAM_MIXTRAL;
	const char *shared = is_deepseek(f) ? "shared_experts" : "shared_expert";
	const char *proj[3] = {mix ? "w1" : "gate_proj", mix ? "w3" : "up_proj",
			       mix ? "w2" : "down_proj"};
	const char *sproj[3] = {"gate_proj", "up_proj", "down_proj"};
	int r;

	(void)layout;
	switch (kind) {
	case MOE_T_ROUTER:
		r = snprintf(buf, n, "model.layers.%u.%s.gate.weight", layer, block);
		break;
	case MOE_T_BIAS:
		r = snprintf(buf, n, "model.layers.%u.%s.gate.e_score_correction_bias", layer,
			     block);
		break;
	case MOE_T_GATE:
	case MOE_T_UP:
	case MOE_T_DOWN:
		r = snprintf(buf, n, "model.layers.%u.%s.experts.%u.%s.weight", layer, block, e,
			     proj[kind - MOE_T_GATE]);
		break;
	case MOE_T_FUSED_GATE_UP:
		r = snprintf(buf, n, "model.layers.%u.%s.experts.gate_up_proj", layer, block);
		break;
	case MOE_T_FUSED_DOWN:
		r = snprintf(buf, n, "model.layers.%u.%s.experts.down_proj", layer, block);
		break;
	case MOE_T_SHARED_GATE:
	case MOE_T_SHARED_UP:
	case MOE_T_SHARED_DOWN:
		r = snprintf(buf, n, "model.layers.%u.%s.%s.%s.weight", layer, block, shared,
			     sproj[kind - MOE_T_SHARED_GATE]);
		break;
	case MOE_T_SHARED_EXPERT_GATE:
		r = snprintf(buf, n, "model.layers.%u.%s.shared_expert_gate.weight", layer, block);
		break;
	default:
		return -EINVAL;
	}
	return r < 0 || (size_t)r >= n ? -ENAMETOOLONG : 0;
}

static const char *default_block(enum moe_family f, enum moe_layout layout)
{
	return f == MOE_FAM_MIXTRAL && layout == MOE_LAYOUT_PER_EXPERT ? "block_sparse_moe" : "mlp";
}

int moe_model_tensor_name(enum moe_family f, enum moe_layout layout, uint32_t layer,
			  enum moe_tensor_kind kind, uint32_t expert, char *buf, size_t n)
{
	return name_with(f, default_block(f, layout), layout, layer, kind, expert, buf, n);
}

/* ------------------------------------------------------------------------
 * config.json
 * ------------------------------------------------------------------------ */

struct cfgctx {
	const char *path;
	const cJSON *root;
	char *err;
};

/* Integer key in [lo, hi]. Missing: -ENOENT (no message) when `optional`. */
static int get_u32(struct cfgctx *c, const char *key, bool optional, uint32_t lo, uint32_t hi,
		   uint32_t *out)
{
	const cJSON *v = cJSON_GetObjectItemCaseSensitive(c->root, key);
	double d;

	if (!v || cJSON_IsNull(v)) {
		if (optional)
			return -ENOENT;
		return moe_err(c->err, -EINVAL, "%s: missing key \"%s\"", c->path, key);
	}
	if (!cJSON_IsNumber(v) || floor(v->valuedouble) != v->valuedouble)
		return moe_err(c->err, -EINVAL, "%s: \"%s\" must be an integer", c->path, key);
	d = v->valuedouble;
	if (d < lo || d > hi)
		return moe_err(c->err, -EINVAL, "%s: \"%s\" = %.0f is out of range [%u, %u]",
			       c->path, key, d, lo, hi);
	*out = (uint32_t)d;
	return 0;
}

static int opt_u32(struct cfgctx *c, const char *key, uint32_t lo, uint32_t hi, uint32_t def,
		   uint32_t *out)
{
	int r = get_u32(c, key, true, lo, hi, out);

	if (r == -ENOENT) {
		*out = def;
		return 0;
	}
	return r;
}

static int opt_bool(struct cfgctx *c, const char *key, bool def, bool *out)
{
	const cJSON *v = cJSON_GetObjectItemCaseSensitive(c->root, key);

	if (!v || cJSON_IsNull(v)) {
		*out = def;
		return 0;
	}
	if (!cJSON_IsBool(v))
		return moe_err(c->err, -EINVAL, "%s: \"%s\" must be true or false", c->path, key);
	*out = cJSON_IsTrue(v);
	return 0;
}

static int opt_float(struct cfgctx *c, const char *key, double lo, double hi, double def,
		     float *out)
{
	const cJSON *v = cJSON_GetObjectItemCaseSensitive(c->root, key);

	if (!v || cJSON_IsNull(v)) {
		*out = (float)def;
		return 0;
	}
	if (!cJSON_IsNumber(v) || !(v->valuedouble >= lo && v->valuedouble <= hi))
		return moe_err(c->err, -EINVAL, "%s: \"%s\" must be a number in [%g, %g]", c->path,
			       key, lo, hi);
	*out = (float)v->valuedouble;
	return 0;
}

static const char *opt_string(struct cfgctx *c, const char *key)
{
	const cJSON *v = cJSON_GetObjectItemCaseSensitive(c->root, key);

	return cJSON_IsString(v) ? v->valuestring : NULL;
}

/* A key that, when present, must be a string: a number or a list where a
 * name is expected is an error, not an absent key with a default. */
static int check_string(struct cfgctx *c, const char *key)
{
	const cJSON *v = cJSON_GetObjectItemCaseSensitive(c->root, key);

	if (v && !cJSON_IsNull(v) && !cJSON_IsString(v))
		return moe_err(c->err, -EINVAL, "%s: \"%s\" must be a string", c->path, key);
	return 0;
}

/* First of several alias keys that is present. */
static int get_u32_alias(struct cfgctx *c, const char *a, const char *b, uint32_t lo, uint32_t hi,
			 uint32_t *out)
{
	int r = get_u32(c, a, true, lo, hi, out);

	if (r != -ENOENT)
		return r;
	r = get_u32(c, b, true, lo, hi, out);
	if (r == -ENOENT)
		return moe_err(c->err, -EINVAL, "%s: missing key \"%s\"", c->path, a);
	return r;
}

/* Which decoder layers are MoE (MODELS.md §3). */
static int moe_layer_mask(struct cfgctx *c, struct moe_model *m, bool *is_moe)
{
	uint32_t step, first_dense;

	for (uint32_t l = 0; l < m->n_layers; l++)
		is_moe[l] = true;
	switch (m->family) {
	case MOE_FAM_QWEN2_MOE:
	case MOE_FAM_QWEN3_MOE: {
		const cJSON *only = cJSON_GetObjectItemCaseSensitive(c->root, "mlp_only_layers");
		const cJSON *v;

		if (opt_u32(c, "decoder_sparse_step", 1, MAX_LAYERS, 1, &step))
			return -EINVAL;
		for (uint32_t l = 0; l < m->n_layers; l++)
			is_moe[l] = (l + 1) % step == 0;
		if (only && !cJSON_IsNull(only) && !cJSON_IsArray(only))
			return moe_err(c->err, -EINVAL, "%s: \"mlp_only_layers\" must be a list",
				       c->path);
		cJSON_ArrayForEach(v, only)
		{
			if (!cJSON_IsNumber(v) || v->valuedouble < 0 ||
			    floor(v->valuedouble) != v->valuedouble)
				return moe_err(c->err, -EINVAL,
					       "%s: \"mlp_only_layers\" entries must be integers "
					       ">= 0",
					       c->path);
			if (v->valuedouble < m->n_layers)
				is_moe[(uint32_t)v->valuedouble] = false;
		}
		break;
	}
	case MOE_FAM_DEEPSEEK_V2:
	case MOE_FAM_DEEPSEEK_V3:
		if (opt_u32(c, "first_k_dense_replace", 0, MAX_LAYERS, 0, &first_dense))
			return -EINVAL;
		for (uint32_t l = 0; l < m->n_layers && l < first_dense; l++)
			is_moe[l] = false;
		break;
	default:
		break;
	}
	return 0;
}

static int parse_routing(struct cfgctx *c, struct moe_model *m)
{
	struct moe_route_params *r = &m->route;
	bool norm = false;
	const char *method;

	r->n_experts = m->n_experts;
	r->top_k = m->top_k;
	r->score = MOE_SCORE_SOFTMAX;
	r->group = MOE_GROUP_NONE;
	r->scale = 1.0f;
	switch (m->family) {
	case MOE_FAM_MIXTRAL:
		r->renormalize = true;
		break;
	case MOE_FAM_QWEN2_MOE:
	case MOE_FAM_QWEN3_MOE:
	case MOE_FAM_OLMOE:
		if (opt_bool(c, "norm_topk_prob", false, &norm))
			return -EINVAL;
		r->renormalize = norm;
		break;
	case MOE_FAM_DEEPSEEK_V2:
		/* transformers' DeepSeek-V2 never renormalises (norm_topk_prob
		 * is not read). */
		m->router_fp32 = true;
		if (opt_float(c, "routed_scaling_factor", 0, 1e6, 1.0, &r->scale))
			return -EINVAL;
		method = opt_string(c, "topk_method");
		if (!method || strcmp(method, "greedy") == 0)
			break;
		if (strcmp(method, "group_limited_greedy") != 0)
			return moe_err(c->err, -EINVAL,
				       "%s: topk_method \"%s\" is not supported (greedy, "
				       "group_limited_greedy)",
				       c->path, method);
		r->group = MOE_GROUP_MAX;
		goto groups;
	case MOE_FAM_DEEPSEEK_V3:
		m->router_fp32 = true;
		r->score = MOE_SCORE_SIGMOID;
		r->group = MOE_GROUP_SUM_TOP2;
		r->renorm_eps = 1e-20f;
		if (opt_bool(c, "norm_topk_prob", true, &norm) ||
		    opt_float(c, "routed_scaling_factor", 0, 1e6, 1.0, &r->scale))
			return -EINVAL;
		r->renormalize = norm;
		goto groups;
	default:
		break;
	}
	return 0;

groups:
	if (opt_u32(c, "n_group", 1, m->n_experts, 1, &r->n_group) ||
	    opt_u32(c, "topk_group", 1, m->n_experts, 1, &r->topk_group))
		return -EINVAL;
	if (m->n_experts % r->n_group)
		return moe_err(c->err, -EINVAL, "%s: %u experts do not split into n_group = %u",
			       c->path, m->n_experts, r->n_group);
	if (r->topk_group > r->n_group)
		return moe_err(c->err, -EINVAL, "%s: topk_group %u > n_group %u", c->path,
			       r->topk_group, r->n_group);
	if (r->group == MOE_GROUP_SUM_TOP2 && m->n_experts / r->n_group < 2 && r->n_group > 1)
		return moe_err(c->err, -EINVAL,
			       "%s: group scores sum the top 2 experts of a group, but groups "
			       "have 1 expert",
			       c->path);
	if (m->top_k > r->topk_group * (m->n_experts / r->n_group))
		return moe_err(c->err, -EINVAL,
			       "%s: top-k %u exceeds the %u experts left in the %u kept groups: "
			       "the choice among the zero-filled experts would be a tie, so this "
			       "configuration cannot be served deterministically",
			       c->path, m->top_k, r->topk_group * (m->n_experts / r->n_group),
			       r->topk_group);
	return 0;
}

int moe_model_parse_config(const char *path, const char *json, size_t len,
			   const char *family_override, struct moe_model *m, bool **is_moe_out,
			   char *err)
{
	struct cfgctx c = {.path = path, .err = err};
	const char *mt, *act;
	uint32_t n_shared = 0;
	cJSON *root;
	bool *is_moe = NULL;
	int fam, ret = -EINVAL;

	root = cJSON_ParseWithLength(json, len);
	if (!root)
		return moe_err(err, -EINVAL, "%s: not valid JSON", path);
	if (!cJSON_IsObject(root)) {
		ret = moe_err(err, -EINVAL, "%s: not a JSON object", path);
		goto out;
	}
	c.root = root;
	ret = -EINVAL;
	if (check_string(&c, "model_type") || check_string(&c, "hidden_act") ||
	    check_string(&c, "topk_method"))
		goto out;
	mt = opt_string(&c, "model_type");
	if (family_override) {
		fam = moe_family_parse(family_override);
		if (fam < 0) {
			moe_err(err, -EINVAL, "unknown model family \"%s\"", family_override);
			goto out;
		}
	} else if (!mt) {
		moe_err(err, -EINVAL, "%s: missing key \"model_type\"", path);
		goto out;
	} else if ((fam = moe_family_parse(mt)) < 0) {
		moe_err(err, -EINVAL,
			"%s: model_type \"%s\" is not a supported MoE family (mixtral, qwen2_moe, "
			"qwen3_moe, olmoe, deepseek_v2, deepseek_v3)",
			path, mt);
		goto out;
	}
	m->family = fam;
	act = opt_string(&c, "hidden_act");
	if (act && strcmp(act, "silu") != 0) {
		moe_err(err, -EINVAL, "%s: hidden_act \"%s\" is not supported (silu only)", path,
			act);
		goto out;
	}
	if (get_u32(&c, "hidden_size", false, 1, MAX_HIDDEN, &m->hidden) ||
	    get_u32(&c, "num_hidden_layers", false, 1, MAX_LAYERS, &m->n_layers) ||
	    get_u32(&c, "num_experts_per_tok", false, 1, MOE_MAX_TOPK, &m->top_k))
		goto out;
	switch (m->family) {
	case MOE_FAM_MIXTRAL:
		if (get_u32_alias(&c, "num_local_experts", "num_experts", 1, MOE_MAX_EXPERTS,
				  &m->n_experts) ||
		    get_u32(&c, "intermediate_size", false, 1, MAX_INTER, &m->inter))
			goto out;
		break;
	case MOE_FAM_QWEN2_MOE:
		if (opt_u32(&c, "shared_expert_intermediate_size", 0, MAX_INTER, 0,
			    &m->shared_inter))
			goto out;
		/* fall through */
	case MOE_FAM_QWEN3_MOE:
		/* transformers 5.x writes num_local_experts for Qwen3-MoE; hub
		 * configs say num_experts. */
		if (get_u32_alias(&c, "num_experts", "num_local_experts", 1, MOE_MAX_EXPERTS,
				  &m->n_experts) ||
		    get_u32(&c, "moe_intermediate_size", false, 1, MAX_INTER, &m->inter))
			goto out;
		break;
	case MOE_FAM_OLMOE:
		if (get_u32_alias(&c, "num_experts", "num_local_experts", 1, MOE_MAX_EXPERTS,
				  &m->n_experts) ||
		    get_u32(&c, "intermediate_size", false, 1, MAX_INTER, &m->inter))
			goto out;
		break;
	case MOE_FAM_DEEPSEEK_V2:
	case MOE_FAM_DEEPSEEK_V3:
		if (get_u32(&c, "n_routed_experts", false, 1, MOE_MAX_EXPERTS, &m->n_experts) ||
		    get_u32(&c, "moe_intermediate_size", false, 1, MAX_INTER, &m->inter) ||
		    opt_u32(&c, "n_shared_experts", 0, 64, 0, &n_shared))
			goto out;
		if ((uint64_t)n_shared * m->inter > MAX_INTER) {
			moe_err(err, -EINVAL, "%s: shared expert size is out of range", path);
			goto out;
		}
		m->shared_inter = n_shared * m->inter;
		break;
	default:
		goto out;
	}
	if (m->top_k > m->n_experts) {
		moe_err(err, -EINVAL, "%s: num_experts_per_tok %u > number of experts %u", path,
			m->top_k, m->n_experts);
		goto out;
	}
	if (parse_routing(&c, m))
		goto out;
	is_moe = calloc(m->n_layers, sizeof(bool));
	if (!is_moe) {
		ret = moe_err(err, -ENOMEM, "out of memory");
		goto out;
	}
	if (moe_layer_mask(&c, m, is_moe))
		goto out;
	ret = 0;
out:
	cJSON_Delete(root);
	if (ret)
		free(is_moe);
	else
		*is_moe_out = is_moe;
	return ret;
}

/* ------------------------------------------------------------------------
 * Tensors of one layer
 * ------------------------------------------------------------------------ */

_Static_assert(MOE_DT_F32 == 0 && MOE_DT_BF16 == 1 && MOE_DT_F16 == 2,
	       "moe_st_float_code numbers the dtypes as enum moe_dtype does");

static int st_to_dtype(enum moe_st_dtype dt, enum moe_dtype *out)
{
	int code = moe_st_float_code(dt);

	if (code < 0)
		return -1;
	*out = (enum moe_dtype)code;
	return 0;
}

static void fmt_shape(const uint64_t *s, uint32_t nd, char *buf, size_t n)
{
	size_t o = 0;

	o += (size_t)snprintf(buf + o, n - o, "[");
	for (uint32_t i = 0; i < nd && o < n; i++)
		o += (size_t)snprintf(buf + o, n - o, "%s%llu", i ? ", " : "",
				      (unsigned long long)s[i]);
	if (o < n)
		snprintf(buf + o, n - o, "]");
}

/* Finds `name` and checks its shape is exactly `want` (nd dims). */
static int locate(struct moe_model *m, const char *name, uint32_t nd, const uint64_t *want,
		  struct moe_ckpt_tensor *at, char *err)
{
	const struct moe_st_tensor *t;
	char got[128], exp[128];
	bool transposed;

	if (moe_ckpt_find(m->ckpt, name, at))
		return moe_err(err, -ENOENT, "%s: missing tensor '%s'", m->dir, name);
	t = at->t;
	if (t->ndim == nd && memcmp(t->shape, want, nd * sizeof(*want)) == 0)
		return 0;
	fmt_shape(t->shape, t->ndim, got, sizeof(got));
	fmt_shape(want, nd, exp, sizeof(exp));
	transposed = nd >= 2 && t->ndim == nd && t->shape[nd - 1] == want[nd - 2] &&
		     t->shape[nd - 2] == want[nd - 1];
	return moe_err(err, -EINVAL, "%s: tensor '%s' in %s has shape %s, expected %s%s", m->dir,
		       name, m->ckpt->shards[at->shard]->path, got, exp,
		       transposed ? " (transposed?)" : "");
}

static int mat_at(struct moe_model *m, const struct moe_ckpt_tensor *at, uint64_t off,
		  uint32_t rows, uint32_t cols, bool weight, struct moe_mat_src *s, char *err)
{
	enum moe_dtype dt;

	if (st_to_dtype(at->t->dtype, &dt))
		return moe_err(err, -EINVAL, "%s: tensor '%s' has dtype %s (bf16, f16 or f32 "
			       "supported)",
			       m->ckpt->shards[at->shard]->path, at->t->name,
			       moe_st_dtype_name(at->t->dtype));
	if (weight && dt != m->dtype)
		return moe_err(err, -EINVAL,
			       "%s: tensor '%s' is %s but the model's MoE weights are %s (mixed "
			       "dtypes are not supported)",
			       m->ckpt->shards[at->shard]->path, at->t->name, moe_dtype_name(dt),
			       moe_dtype_name(m->dtype));
	*s = (struct moe_mat_src){*at, off * moe_dtype_size(dt), rows, cols, dt};
	return 0;
}

/* A 2-D weight [rows, cols] stored as its own tensor. */
static int mat_named(struct moe_model *m, const char *block, enum moe_layout lay, uint32_t layer,
		     enum moe_tensor_kind kind, uint32_t e, uint32_t rows, uint32_t cols,
		     bool weight, struct moe_mat_src *s, char *err)
{
	char name[256];
	uint64_t want[2] = {rows, cols};
	struct moe_ckpt_tensor at;
	int ret;

	name_with(m->family, block, lay, layer, kind, e, name, sizeof(name));
	ret = locate(m, name, 2, want, &at, err);
	return ret ? ret : mat_at(m, &at, 0, rows, cols, weight, s, err);
}

static int load_per_expert(struct moe_model *m, const char *block, struct moe_layer_desc *d,
			   char *err)
{
	uint32_t H = m->hidden, I = m->inter;
	int ret = 0;

	for (uint32_t e = 0; e < m->n_experts && !ret; e++) {
		struct moe_expert_src *x = &d->experts[e];

		ret = mat_named(m, block, d->layout, d->index, MOE_T_GATE, e, I, H, true, &x->gate,
				err);
		if (!ret)
			ret = mat_named(m, block, d->layout, d->index, MOE_T_UP, e, I, H, true,
					&x->up, err);
		if (!ret)
			ret = mat_named(m, block, d->layout, d->index, MOE_T_DOWN, e, H, I, true,
					&x->down, err);
	}
	return ret;
}

static int load_fused(struct moe_model *m, const char *block, struct moe_layer_desc *d, char *err)
{
	uint32_t H = m->hidden, I = m->inter, E = m->n_experts;
	uint64_t want_gu[3] = {E, 2ull * I, H}, want_d[3] = {E, H, I};
	struct moe_ckpt_tensor gu, dn;
	char name[256];
	int ret;

	name_with(m->family, block, d->layout, d->index, MOE_T_FUSED_GATE_UP, 0, name,
		  sizeof(name));
	ret = locate(m, name, 3, want_gu, &gu, err);
	if (ret)
		return ret;
	name_with(m->family, block, d->layout, d->index, MOE_T_FUSED_DOWN, 0, name, sizeof(name));
	ret = locate(m, name, 3, want_d, &dn, err);
	for (uint32_t e = 0; e < E && !ret; e++) {
		struct moe_expert_src *x = &d->experts[e];
		uint64_t base = (uint64_t)e * 2 * I * H;

		/* gate rows first, then up rows */
		ret = mat_at(m, &gu, base, I, H, true, &x->gate, err);
		if (!ret)
			ret = mat_at(m, &gu, base + (uint64_t)I * H, I, H, true, &x->up, err);
		if (!ret)
			ret = mat_at(m, &dn, (uint64_t)e * H * I, H, I, true, &x->down, err);
	}
	return ret;
}

/* Which block name and layout this layer uses: the first candidate whose
 * router (per-expert: expert 0's gate) exists. */
static int detect_layout(struct moe_model *m, uint32_t layer, const char **block,
			 enum moe_layout *lay)
{
	static const char *const blocks[] = {"mlp", "block_sparse_moe"};
	struct moe_ckpt_tensor at;
	char name[256];

	for (int b = 0; b < (m->family == MOE_FAM_MIXTRAL ? 2 : 1); b++) {
		name_with(m->family, blocks[b], MOE_LAYOUT_PER_EXPERT, layer, MOE_T_GATE, 0, name,
			  sizeof(name));
		if (!moe_ckpt_find(m->ckpt, name, &at)) {
			*block = blocks[b], *lay = MOE_LAYOUT_PER_EXPERT;
			return 0;
		}
		name_with(m->family, blocks[b], MOE_LAYOUT_FUSED, layer, MOE_T_FUSED_GATE_UP, 0,
			  name, sizeof(name));
		if (!moe_ckpt_find(m->ckpt, name, &at)) {
			*block = blocks[b], *lay = MOE_LAYOUT_FUSED;
			return 0;
		}
	}
	return -ENOENT;
}

static int load_layer(struct moe_model *m, uint32_t layer, struct moe_layer_desc *d, char *err)
{
	uint32_t H = m->hidden, E = m->n_experts, Is = m->shared_inter;
	const char *block;
	char name[256];
	int ret;

	d->index = layer;
	if (detect_layout(m, layer, &block, &d->layout)) {
		moe_model_tensor_name(m->family, MOE_LAYOUT_PER_EXPERT, layer, MOE_T_GATE, 0, name,
				      sizeof(name));
		return moe_err(err, -ENOENT,
			       "%s: layer %u should be MoE but has no experts (missing tensor "
			       "'%s' and its fused form)",
			       m->dir, layer, name);
	}
	/* The model's dtype is its experts' (the first expert tensor of the
	 * first MoE layer; every other expert and shared-expert tensor must
	 * match it). The router may hold another: transformers keeps
	 * DeepSeek's in F32 (_keep_in_fp32_modules_strict) in a bf16 model,
	 * and save_pretrained writes it so since 5.25; older versions, and
	 * model.to(bfloat16), write it in bf16. Both are read as they are. */
	if (m->n_moe_layers == 0) {
		struct moe_ckpt_tensor at;

		name_with(m->family, block, d->layout, layer,
			  d->layout == MOE_LAYOUT_FUSED ? MOE_T_FUSED_GATE_UP : MOE_T_GATE, 0, name,
			  sizeof(name));
		if (moe_ckpt_find(m->ckpt, name, &at))
			return moe_err(err, -ENOENT, "%s: tensor '%s' not found", m->dir, name);
		if (st_to_dtype(at.t->dtype, &m->dtype))
			return moe_err(err, -EINVAL, "%s: expert tensor '%s' has dtype %s (bf16, "
				       "f16 or f32 supported)",
				       m->dir, name, moe_st_dtype_name(at.t->dtype));
	}
	name_with(m->family, block, d->layout, layer, MOE_T_ROUTER, 0, name, sizeof(name));
	{
		uint64_t want[2] = {E, H};
		struct moe_ckpt_tensor at;

		ret = locate(m, name, 2, want, &at, err);
		if (ret)
			return ret;
		ret = mat_at(m, &at, 0, E, H, false, &d->router, err);
		if (ret)
			return ret;
	}
	d->experts = calloc(E, sizeof(*d->experts));
	if (!d->experts)
		return moe_err(err, -ENOMEM, "out of memory");
	ret = d->layout == MOE_LAYOUT_FUSED ? load_fused(m, block, d, err)
					    : load_per_expert(m, block, d, err);
	if (ret)
		return ret;
	if (m->family == MOE_FAM_DEEPSEEK_V3) {
		uint64_t want[1] = {E};
		struct moe_ckpt_tensor at;

		name_with(m->family, block, d->layout, layer, MOE_T_BIAS, 0, name, sizeof(name));
		ret = locate(m, name, 1, want, &at, err);
		if (ret)
			return ret;
		ret = mat_at(m, &at, 0, 1, E, false, &d->bias, err);
		if (ret)
			return ret;
		d->has_bias = true;
	}
	if (Is) {
		struct moe_expert_src *x = &d->shared;

		d->has_shared = true;
		ret = mat_named(m, block, d->layout, layer, MOE_T_SHARED_GATE, 0, Is, H, true,
				&x->gate, err);
		if (!ret)
			ret = mat_named(m, block, d->layout, layer, MOE_T_SHARED_UP, 0, Is, H, true,
					&x->up, err);
		if (!ret)
			ret = mat_named(m, block, d->layout, layer, MOE_T_SHARED_DOWN, 0, H, Is,
					true, &x->down, err);
		if (ret)
			return ret;
	}
	if (m->family == MOE_FAM_QWEN2_MOE && Is) {
		d->has_shared_gate = true;
		ret = mat_named(m, block, d->layout, layer, MOE_T_SHARED_EXPERT_GATE, 0, 1, H,
				true, &d->shared_gate, err);
	}
	return ret;
}

int moe_model_open(const char *dir, const struct moe_model_opts *opts, struct moe_model **out,
		   char *err)
{
	struct moe_model *m;
	bool *is_moe = NULL;
	char path[4096], *buf;
	uint32_t n = 0;
	size_t len;
	int ret;

	m = calloc(1, sizeof(*m));
	if (!m || !(m->dir = strdup(dir))) {
		free(m);
		return moe_err(err, -ENOMEM, "out of memory");
	}
	snprintf(path, sizeof(path), "%s/config.json", dir);
	ret = moe_read_small_file(path, MAX_CONFIG_BYTES, &buf, &len, err);
	if (ret)
		goto err_free;
	ret = moe_model_parse_config(path, buf, len, opts ? opts->family : NULL, m, &is_moe, err);
	free(buf);
	if (ret)
		goto err_free;
	ret = moe_ckpt_open(dir, &m->ckpt, err);
	if (ret)
		goto err_free;
	if (opts) {
		m->ckpt->hook = opts->hook;
		m->ckpt->hook_arg = opts->hook_arg;
	}
	m->identity = moe_ckpt_identity_hash(m->ckpt);
	for (uint32_t l = 0; l < m->n_layers; l++)
		n += is_moe[l];
	if (!n) {
		ret = moe_err(err, -EINVAL, "%s: the config has no MoE layer", dir);
		goto err_free;
	}
	m->layers = calloc(n, sizeof(*m->layers));
	if (!m->layers) {
		ret = moe_err(err, -ENOMEM, "out of memory");
		goto err_free;
	}
	for (uint32_t l = 0; l < m->n_layers; l++) {
		if (!is_moe[l])
			continue;
		ret = load_layer(m, l, &m->layers[m->n_moe_layers], err);
		m->n_moe_layers++;
		if (ret)
			goto err_free;
	}
	m->expert_bytes = 3ull * m->inter * m->hidden * moe_dtype_size(m->dtype);
	m->layer_fixed_bytes = (uint64_t)m->n_experts * m->hidden * sizeof(float) +
			       (m->family == MOE_FAM_DEEPSEEK_V3 ? m->n_experts * sizeof(float) : 0) +
			       3ull * m->shared_inter * m->hidden * moe_dtype_size(m->dtype) +
			       (m->family == MOE_FAM_QWEN2_MOE && m->shared_inter
					? m->hidden * sizeof(float)
					: 0);
	free(is_moe);
	*out = m;
	return 0;

err_free:
	free(is_moe);
	moe_model_free(m);
	return ret;
}

int moe_model_close_files(struct moe_model *m, char *err)
{
	int ret = 0;

	if (!m->ckpt)
		return 0;
	ret = moe_ckpt_verify(m->ckpt, err);
	moe_ckpt_close(m->ckpt);
	m->ckpt = NULL;
	return ret;
}

int moe_model_reopen_files(struct moe_model *m, char *err)
{
	struct moe_ckpt *c;
	int ret;

	if (m->ckpt)
		return 0;
	ret = moe_ckpt_open(m->dir, &c, err);
	if (ret)
		return ret;
	if (moe_ckpt_identity_hash(c) != m->identity) {
		moe_ckpt_close(c);
		return moe_err(err, -ESTALE, "%s: the checkpoint changed since it was loaded", m->dir);
	}
	m->ckpt = c;
	/* the tensors' places again: the same names in the same files, whose
	 * headers now live in the new open (only the engine reads these) */
	for (uint32_t l = 0; l < m->n_moe_layers; l++) {
		struct moe_layer_desc *d = &m->layers[l], nd = {0};

		ret = load_layer(m, d->index, &nd, err);
		if (ret) {
			free(nd.experts);
			moe_ckpt_close(m->ckpt);
			m->ckpt = NULL;
			return ret;
		}
		free(d->experts);
		d->experts = nd.experts;
		d->router = nd.router;
		d->bias = nd.bias;
		d->shared = nd.shared;
		d->shared_gate = nd.shared_gate;
	}
	return 0;
}

void moe_model_free(struct moe_model *m)
{
	if (!m)
		return;
	for (uint32_t i = 0; i < m->n_moe_layers; i++)
		free(m->layers[i].experts);
	free(m->layers);
	moe_ckpt_close(m->ckpt);
	free(m->dir);
	free(m);
}

int moe_model_layer_pos(const struct moe_model *m, uint32_t index)
{
	uint32_t lo = 0, hi = m->n_moe_layers;

	while (lo < hi) {
		uint32_t mid = (lo + hi) / 2;

		if (m->layers[mid].index == index)
			return (int)mid;
		if (m->layers[mid].index < index)
			lo = mid + 1;
		else
			hi = mid;
	}
	return -1;
}

/* The first element of x[n] (dtype) that is a NaN or an Inf, or n. */
static size_t first_nonfinite(enum moe_dtype dt, const void *x, size_t n)
{
	if (dt == MOE_DT_F32) {
		const uint32_t *u = x;

		for (size_t i = 0; i < n; i++)
			if ((u[i] & 0x7f800000u) == 0x7f800000u)
				return i;
	} else {
		const uint16_t *h = x;
		uint16_t mask = dt == MOE_DT_BF16 ? 0x7f80 : 0x7c00;

		for (size_t i = 0; i < n; i++)
			if ((h[i] & mask) == mask)
				return i;
	}
	return n;
}

int moe_model_read(struct moe_model *m, const struct moe_mat_src *s, void *dst, char *err)
{
	size_t n = (size_t)s->rows * s->cols, bad;
	int ret;

	if (!m->ckpt)
		return moe_err(err, -EBADF, "%s: checkpoint files are closed", m->dir);
	ret = moe_ckpt_read(m->ckpt, &s->at, s->off, n * moe_dtype_size(s->dtype), dst, err);
	if (ret || !m->check_finite || (bad = first_nonfinite(s->dtype, dst, n)) == n)
		return ret;
	bad += s->off / moe_dtype_size(s->dtype);
	return moe_err(err, -EDOM, "%s: tensor '%s' holds a NaN or an Inf (element %zu)", m->dir,
		       s->at.t->name, bad);
}

int moe_model_read_f32(struct moe_model *m, const struct moe_mat_src *s, float *dst, char *err)
{
	size_t n = (size_t)s->rows * s->cols;
	void *tmp = dst;
	int ret;

	if (s->dtype != MOE_DT_F32 && !(tmp = malloc(n * moe_dtype_size(s->dtype))))
		return moe_err(err, -ENOMEM, "out of memory");
	ret = moe_model_read(m, s, tmp, err);
	if (!ret && s->dtype != MOE_DT_F32)
		moe_cpu_to_f32(s->dtype, tmp, dst, n);
	if (tmp != dst)
		free(tmp);
	return ret;
}
