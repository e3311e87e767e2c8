/* tests/test_model.c — config.json and checkpoint layout, per family.
 *
 * Valid checkpoints come from moe_synth_write() with tiny shapes (H 16,
 * I 8, E 8: a few KB each); each error case then breaks one thing (a key of
 * config.json, one tensor, one index entry) and checks that moe_model_open()
 * refuses it with a message that names the file, the key or the tensor, and
 * says what is wrong.
 */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "daemon/engine/model.h"
#include "tests/testutil.h"
#include "tools/synth.h"

#define H 16
#define I 8
#define E 8

static char *root; /* the group's temporary directory */
static unsigned n_dirs;

static int group_setup(void **state)
{
	(void)state;
	root = tu_tmpdir();
	return 0;
}

static int group_teardown(void **state)
{
	(void)state;
	tu_rmtree(root);
	free(root);
	return 0;
}

/* Tiny options for family f. */
static void tiny(struct moe_synth_opts *o, enum moe_family f, enum moe_layout lay)
{
	moe_synth_defaults(o, f);
	o->layout = lay;
	o->hidden = H;
	o->inter = I;
	o->experts = E;
	o->top_k = 2;
	o->layers = 2;
	if (f == MOE_FAM_QWEN2_MOE)
		o->shared_inter = 12;
	if (f == MOE_FAM_DEEPSEEK_V2 || f == MOE_FAM_DEEPSEEK_V3)
		o->shared_inter = 2 * I; /* n_shared_experts 2 */
	if (f == MOE_FAM_DEEPSEEK_V3) {
		o->n_group = 4;
		o->topk_group = 2;
	}
}

/* Writes a checkpoint into a fresh directory; returns its path. */
static char *make(const struct moe_synth_opts *o)
{
	char *dir, err[MOE_ERRLEN];

	assert_true(asprintf(&dir, "%s/m%u", root, n_dirs++) > 0);
	if (moe_synth_write(dir, o, err))
		fail_msg("synth: %s", err);
	return dir;
}

static char *make_tiny(enum moe_family f, enum moe_layout lay)
{
	struct moe_synth_opts o;

	tiny(&o, f, lay);
	return make(&o);
}

static char *path_in(const char *dir, const char *file)
{
	char *p;

	assert_true(asprintf(&p, "%s/%s", dir, file) > 0);
	return p;
}

static struct moe_model *open_ok(const char *dir, const char *family)
{
	struct moe_model_opts opts = {.family = family};
	struct moe_model *m;
	char err[MOE_ERRLEN];

	if (moe_model_open(dir, &opts, &m, err))
		fail_msg("%s", err);
	return m;
}

#define NEEDLES(...) ((const char *const[]){__VA_ARGS__, NULL})

/* moe_model_open(dir) must fail with `code` and every needle in the message. */
static void expect_fail(const char *dir, const char *family, int code, const char *const *needles)
{
	struct moe_model_opts opts = {.family = family};
	struct moe_model *m = NULL;
	char err[MOE_ERRLEN] = "";
	int ret = moe_model_open(dir, &opts, &m, err);

	if (ret == 0) {
		moe_model_free(m);
		fail_msg("%s: opened, expected error %d", dir, code);
	}
	if (ret != code)
		fail_msg("%s: returned %d, expected %d (%s)", dir, ret, code, err);
	for (size_t i = 0; needles[i]; i++)
		if (!strstr(err, needles[i]))
			fail_msg("message lacks \"%s\": %s", needles[i], err);
}

/* ------------------------------------------------------------------------
 * Editing JSON files
 * ------------------------------------------------------------------------ */

static cJSON *json_load(const char *path)
{
	char err[MOE_ERRLEN], *buf;
	cJSON *j;
	size_t len;

	if (moe_read_small_file(path, 1u << 24, &buf, &len, err))
		fail_msg("%s", err);
	j = cJSON_ParseWithLength(buf, len);
	free(buf);
	assert_non_null(j);
	return j;
}

static void json_save(const char *path, cJSON *j)
{
	char *s = cJSON_Print(j);
	FILE *f = fopen(path, "w");

	assert_non_null(s);
	assert_non_null(f);
	assert_true(fputs(s, f) >= 0);
	assert_int_equal(fclose(f), 0);
	free(s);
	cJSON_Delete(j);
}

/* Sets obj.key (obj NULL: the root) to the JSON text val, or deletes the
 * key when val is NULL. */
static void json_edit(const char *path, const char *obj, const char *key, const char *val)
{
	cJSON *j = json_load(path), *t = obj ? cJSON_GetObjectItemCaseSensitive(j, obj) : j;

	assert_non_null(t);
	cJSON_DeleteItemFromObjectCaseSensitive(t, key);
	if (val) {
		cJSON *v = cJSON_Parse(val);

		assert_non_null(v);
		cJSON_AddItemToObject(t, key, v);
	}
	json_save(path, j);
}

static void cfg_edit(const char *dir, const char *key, const char *val)
{
	char *p = path_in(dir, "config.json");

	json_edit(p, NULL, key, val);
	free(p);
}

static void cfg_rename(const char *dir, const char *from, const char *to)
{
	char *p = path_in(dir, "config.json");
	cJSON *j = json_load(p), *v = cJSON_DetachItemFromObjectCaseSensitive(j, from);

	assert_non_null(v);
	cJSON_AddItemToObject(j, to, v);
	json_save(p, j);
	free(p);
}

static void write_text(const char *dir, const char *file, const char *text)
{
	free(tu_write_file(dir, file, text, strlen(text)));
}

/* ------------------------------------------------------------------------
 * Editing model.safetensors: load every tensor, change, write back
 * ------------------------------------------------------------------------ */

struct st_copy {
	char *path;
	size_t n;
	struct moe_st_wtensor *w;
	char **names;
	void **data;
};

static void st_load(const char *dir, struct st_copy *c)
{
	struct moe_st_file *f;
	char err[MOE_ERRLEN];

	c->path = path_in(dir, "model.safetensors");
	if (moe_st_open(c->path, &f, err))
		fail_msg("%s", err);
	c->n = f->hdr.n_tensors;
	c->w = calloc(c->n, sizeof(*c->w));
	c->names = calloc(c->n, sizeof(char *));
	c->data = calloc(c->n, sizeof(void *));
	assert_true(c->w && c->names && c->data);
	for (size_t i = 0; i < c->n; i++) {
		const struct moe_st_tensor *t = &f->hdr.tensors[i];
		uint64_t nb = t->end - t->begin;

		c->names[i] = strdup(t->name);
		c->data[i] = malloc(nb + 1);
		assert_true(c->names[i] && c->data[i]);
		if (moe_st_pread(f, t, 0, nb, c->data[i], err))
			fail_msg("%s", err);
		c->w[i] = (struct moe_st_wtensor){c->names[i], t->dtype, t->ndim, {0}, c->data[i]};
		memcpy(c->w[i].shape, t->shape, sizeof(t->shape));
	}
	moe_st_close(f);
}

static void st_save(struct st_copy *c)
{
	char err[MOE_ERRLEN];

	if (moe_st_write(c->path, c->w, c->n, NULL, err))
		fail_msg("%s", err);
	for (size_t i = 0; i < c->n; i++) {
		free(c->names[i]);
		free(c->data[i]);
	}
	free(c->w);
	free(c->names);
	free(c->data);
	free(c->path);
}

static size_t st_idx(struct st_copy *c, const char *name)
{
	for (size_t i = 0; i < c->n; i++)
		if (strcmp(c->names[i], name) == 0)
			return i;
	fail_msg("no tensor %s", name);
	return 0;
}

static void st_drop(const char *dir, const char *name)
{
	struct st_copy c;
	size_t i;

	st_load(dir, &c);
	i = st_idx(&c, name);
	free(c.names[i]);
	free(c.data[i]);
	c.n--;
	c.w[i] = c.w[c.n];
	c.names[i] = c.names[c.n];
	c.data[i] = c.data[c.n];
	st_save(&c);
}

/* Swaps the last two dimensions (the bytes stay: same size). */
static void st_transpose(const char *dir, const char *name)
{
	struct st_copy c;
	struct moe_st_wtensor *w;
	uint64_t t;

	st_load(dir, &c);
	w = &c.w[st_idx(&c, name)];
	t = w->shape[w->ndim - 1];
	w->shape[w->ndim - 1] = w->shape[w->ndim - 2];
	w->shape[w->ndim - 2] = t;
	st_save(&c);
}

/* Same shape, another dtype, zero data. */
static void st_retype(const char *dir, const char *name, enum moe_st_dtype dt)
{
	struct st_copy c;
	struct moe_st_wtensor *w;
	uint64_t n = 1;
	size_t i;

	st_load(dir, &c);
	i = st_idx(&c, name);
	w = &c.w[i];
	for (uint32_t d = 0; d < w->ndim; d++)
		n *= w->shape[d];
	free(c.data[i]);
	c.data[i] = calloc(1, n * moe_st_dtype_bits(dt) / 8 + 1);
	assert_non_null(c.data[i]);
	w->data = c.data[i];
	w->dtype = dt;
	st_save(&c);
}

/* Replaces `from` by `to` in every tensor name. */
static void st_rename_all(const char *dir, const char *from, const char *to)
{
	struct st_copy c;

	st_load(dir, &c);
	for (size_t i = 0; i < c.n; i++) {
		char *p = strstr(c.names[i], from), *s;

		if (!p)
			continue;
		assert_true(asprintf(&s, "%.*s%s%s", (int)(p - c.names[i]), c.names[i], to,
				     p + strlen(from)) > 0);
		free(c.names[i]);
		c.names[i] = s;
		c.w[i].name = s;
	}
	st_save(&c);
}

static void tname(enum moe_family f, enum moe_layout lay, uint32_t layer,
		  enum moe_tensor_kind kind, uint32_t e, char *buf)
{
	assert_int_equal(moe_model_tensor_name(f, lay, layer, kind, e, buf, 256), 0);
}

/* ------------------------------------------------------------------------
 * Positive: every family, both layouts
 * ------------------------------------------------------------------------ */

static void check_expert_reads(struct moe_model *m)
{
	struct moe_layer_desc *d = &m->layers[m->n_moe_layers - 1];
	struct moe_expert_src *x = &d->experts[E - 1];
	float *a = malloc(H * I * sizeof(float)), *b = malloc(H * I * sizeof(float));
	size_t esz = moe_dtype_size(m->dtype);
	char err[MOE_ERRLEN];

	assert_true(a && b);
	assert_int_equal(x->gate.rows, I);
	assert_int_equal(x->gate.cols, H);
	assert_int_equal(x->up.rows, I);
	assert_int_equal(x->down.rows, H);
	assert_int_equal(x->down.cols, I);
	if (d->layout == MOE_LAYOUT_FUSED) {
		/* gate_up_proj [E, 2I, H]: expert e's gate rows, then its up rows */
		assert_int_equal(x->gate.off, (uint64_t)(E - 1) * 2 * I * H * esz);
		assert_int_equal(x->up.off, ((uint64_t)(E - 1) * 2 * I + I) * H * esz);
		assert_int_equal(x->down.off, (uint64_t)(E - 1) * H * I * esz);
		assert_ptr_equal(x->gate.at.t, x->up.at.t);
	} else {
		assert_int_equal(x->gate.off, 0);
		assert_int_equal(x->down.off, 0);
	}
	/* the f32 widening of a read agrees with the raw read */
	if (moe_model_read_f32(m, &x->up, a, err))
		fail_msg("%s", err);
	if (moe_model_read(m, &x->up, b, err))
		fail_msg("%s", err);
	if (m->dtype == MOE_DT_F32) {
		assert_memory_equal(a, b, I * H * sizeof(float));
	} else {
		const uint16_t *h = (const uint16_t *)b;

		for (size_t i = 0; i < I * H; i++)
			assert_true(a[i] == (m->dtype == MOE_DT_BF16 ? moe_bf16_to_f32(h[i])
								     : moe_f16_to_f32(h[i])));
	}
	free(a);
	free(b);
}

static void check_family(enum moe_family f, enum moe_layout lay, enum moe_dtype dt)
{
	struct moe_synth_opts o;
	struct moe_model *m;
	char *dir;

	tiny(&o, f, lay);
	o.dtype = dt;
	dir = make(&o);
	m = open_ok(dir, NULL);
	assert_int_equal(m->family, f);
	assert_int_equal(m->dtype, dt);
	assert_int_equal(m->hidden, H);
	assert_int_equal(m->inter, I);
	assert_int_equal(m->n_experts, E);
	assert_int_equal(m->top_k, 2);
	assert_int_equal(m->shared_inter, o.shared_inter);
	assert_int_equal(m->n_layers, 2);
	assert_int_equal(m->n_moe_layers, 2);
	assert_int_equal(m->expert_bytes, 3 * I * H * moe_dtype_size(dt));
	assert_int_equal(m->expert_bytes * E * m->n_moe_layers, moe_synth_expert_bytes(&o));
	assert_true(m->identity != 0);
	assert_int_equal(m->route.n_experts, E);
	assert_int_equal(m->route.top_k, 2);
	assert_null(m->route.bias);
	for (uint32_t l = 0; l < m->n_moe_layers; l++) {
		struct moe_layer_desc *d = &m->layers[l];

		assert_int_equal(d->index, l);
		assert_int_equal(moe_model_layer_pos(m, l), (int)l);
		assert_int_equal(d->layout, lay);
		assert_int_equal(d->router.rows, E);
		assert_int_equal(d->router.cols, H);
		assert_int_equal(d->has_bias, f == MOE_FAM_DEEPSEEK_V3);
		assert_int_equal(d->has_shared, o.shared_inter != 0);
		assert_int_equal(d->has_shared_gate, f == MOE_FAM_QWEN2_MOE);
		if (d->has_bias) {
			assert_int_equal(d->bias.cols, E);
			assert_int_equal(d->bias.dtype, MOE_DT_F32);
		}
		if (d->has_shared) {
			assert_int_equal(d->shared.gate.rows, o.shared_inter);
			assert_int_equal(d->shared.down.cols, o.shared_inter);
		}
	}
	assert_int_equal(moe_model_layer_pos(m, 2), -1);
	check_expert_reads(m);
	assert_int_equal(moe_model_close_files(m, NULL), 0);
	moe_model_free(m);
	free(dir);
}

static void test_families(void **state)
{
	static const enum moe_dtype dts[] = {MOE_DT_BF16, MOE_DT_F32, MOE_DT_F16};

	(void)state;
	for (int f = 0; f < MOE_FAM_COUNT; f++) {
		check_family(f, MOE_LAYOUT_PER_EXPERT, dts[f % 3]);
		check_family(f, MOE_LAYOUT_FUSED, dts[(f + 1) % 3]);
	}
}

static void test_family_names(void **state)
{
	(void)state;
	for (int f = 0; f < MOE_FAM_COUNT; f++)
		assert_int_equal(moe_family_parse(moe_family_name(f)), f);
	assert_int_equal(moe_family_parse("llama"), -1);
	assert_int_equal(moe_family_parse("Mixtral"), -1);
	assert_string_equal(moe_family_name(MOE_FAM_COUNT), "?");
}

static void test_tensor_names(void **state)
{
	char buf[256];

	(void)state;
	tname(MOE_FAM_MIXTRAL, MOE_LAYOUT_PER_EXPERT, 3, MOE_T_GATE, 5, buf);
	assert_string_equal(buf, "model.layers.3.block_sparse_moe.experts.5.w1.weight");
	tname(MOE_FAM_MIXTRAL, MOE_LAYOUT_PER_EXPERT, 3, MOE_T_UP, 5, buf);
	assert_string_equal(buf, "model.layers.3.block_sparse_moe.experts.5.w3.weight");
	tname(MOE_FAM_MIXTRAL, MOE_LAYOUT_PER_EXPERT, 0, MOE_T_DOWN, 0, buf);
	assert_string_equal(buf, "model.layers.0.block_sparse_moe.experts.0.w2.weight");
	tname(MOE_FAM_MIXTRAL, MOE_LAYOUT_PER_EXPERT, 1, MOE_T_ROUTER, 0, buf);
	assert_string_equal(buf, "model.layers.1.block_sparse_moe.gate.weight");
	tname(MOE_FAM_MIXTRAL, MOE_LAYOUT_FUSED, 3, MOE_T_FUSED_GATE_UP, 0, buf);
	assert_string_equal(buf, "model.layers.3.mlp.experts.gate_up_proj");
	tname(MOE_FAM_MIXTRAL, MOE_LAYOUT_FUSED, 3, MOE_T_ROUTER, 0, buf);
	assert_string_equal(buf, "model.layers.3.mlp.gate.weight");
	tname(MOE_FAM_QWEN3_MOE, MOE_LAYOUT_FUSED, 2, MOE_T_FUSED_DOWN, 0, buf);
	assert_string_equal(buf, "model.layers.2.mlp.experts.down_proj");
	tname(MOE_FAM_QWEN3_MOE, MOE_LAYOUT_PER_EXPERT, 47, MOE_T_DOWN, 127, buf);
	assert_string_equal(buf, "model.layers.47.mlp.experts.127.down_proj.weight");
	tname(MOE_FAM_QWEN2_MOE, MOE_LAYOUT_PER_EXPERT, 0, MOE_T_SHARED_EXPERT_GATE, 0, buf);
	assert_string_equal(buf, "model.layers.0.mlp.shared_expert_gate.weight");
	tname(MOE_FAM_QWEN2_MOE, MOE_LAYOUT_PER_EXPERT, 0, MOE_T_SHARED_UP, 0, buf);
	assert_string_equal(buf, "model.layers.0.mlp.shared_expert.up_proj.weight");
	tname(MOE_FAM_OLMOE, MOE_LAYOUT_PER_EXPERT, 0, MOE_T_ROUTER, 0, buf);
	assert_string_equal(buf, "model.layers.0.mlp.gate.weight");
	tname(MOE_FAM_DEEPSEEK_V3, MOE_LAYOUT_PER_EXPERT, 7, MOE_T_BIAS, 0, buf);
	assert_string_equal(buf, "model.layers.7.mlp.gate.e_score_correction_bias");
	tname(MOE_FAM_DEEPSEEK_V2, MOE_LAYOUT_PER_EXPERT, 1, MOE_T_SHARED_DOWN, 0, buf);
	assert_string_equal(buf, "model.layers.1.mlp.shared_experts.down_proj.weight");
	tname(MOE_FAM_DEEPSEEK_V3, MOE_LAYOUT_PER_EXPERT, 4, MOE_T_GATE, 255, buf);
	assert_string_equal(buf, "model.layers.4.mlp.experts.255.gate_proj.weight");
	/* too small a buffer, an unknown kind */
	assert_int_equal(moe_model_tensor_name(MOE_FAM_OLMOE, MOE_LAYOUT_PER_EXPERT, 0,
					       MOE_T_ROUTER, 0, buf, 10),
			 -ENAMETOOLONG);
	assert_int_equal(moe_model_tensor_name(MOE_FAM_OLMOE, MOE_LAYOUT_PER_EXPERT, 0,
					       (enum moe_tensor_kind)99, 0, buf, sizeof(buf)),
			 -EINVAL);
}

/* Mixtral: hub files say block_sparse_moe (per-expert), transformers v5
 * says mlp (fused); a per-expert checkpoint under mlp is accepted too. */
static void test_mixtral_block_names(void **state)
{
	char *per = make_tiny(MOE_FAM_MIXTRAL, MOE_LAYOUT_PER_EXPERT);
	char *fused = make_tiny(MOE_FAM_MIXTRAL, MOE_LAYOUT_FUSED);
	struct moe_model *m;

	(void)state;
	m = open_ok(per, NULL);
	assert_int_equal(m->layers[0].layout, MOE_LAYOUT_PER_EXPERT);
	assert_string_equal(m->layers[0].router.at.t->name,
			    "model.layers.0.block_sparse_moe.gate.weight");
	assert_string_equal(m->layers[1].experts[3].up.at.t->name,
			    "model.layers.1.block_sparse_moe.experts.3.w3.weight");
	moe_model_free(m);

	m = open_ok(fused, NULL);
	assert_int_equal(m->layers[0].layout, MOE_LAYOUT_FUSED);
	assert_string_equal(m->layers[0].router.at.t->name, "model.layers.0.mlp.gate.weight");
	assert_string_equal(m->layers[0].experts[0].gate.at.t->name,
			    "model.layers.0.mlp.experts.gate_up_proj");
	moe_model_free(m);

	st_rename_all(per, ".block_sparse_moe.", ".mlp.");
	m = open_ok(per, NULL);
	assert_int_equal(m->layers[0].layout, MOE_LAYOUT_PER_EXPERT);
	assert_string_equal(m->layers[1].experts[3].up.at.t->name,
			    "model.layers.1.mlp.experts.3.w3.weight");
	moe_model_free(m);
	free(per);
	free(fused);
}

/* ------------------------------------------------------------------------
 * Which layers are MoE
 * ------------------------------------------------------------------------ */

static void expect_layers(const char *dir, const uint32_t *want, uint32_t n)
{
	struct moe_model *m = open_ok(dir, NULL);

	assert_int_equal(m->n_moe_layers, n);
	for (uint32_t i = 0; i < n; i++) {
		assert_int_equal(m->layers[i].index, want[i]);
		assert_int_equal(moe_model_layer_pos(m, want[i]), (int)i);
	}
	moe_model_free(m);
}

static void test_qwen_layers(void **state)
{
	struct moe_synth_opts o;
	char *dir;

	(void)state;
	for (int f = MOE_FAM_QWEN2_MOE; f <= MOE_FAM_QWEN3_MOE; f++) {
		tiny(&o, f, MOE_LAYOUT_PER_EXPERT);
		o.layers = 4; /* tensors for layers 0-3 */
		dir = make(&o);
		expect_layers(dir, (const uint32_t[]){0, 1, 2, 3}, 4);
		cfg_edit(dir, "mlp_only_layers", "[1, 99]");
		expect_layers(dir, (const uint32_t[]){0, 2, 3}, 3);
		/* MoE iff (L + 1) % step == 0 */
		cfg_edit(dir, "mlp_only_layers", "[]");
		cfg_edit(dir, "decoder_sparse_step", "2");
		expect_layers(dir, (const uint32_t[]){1, 3}, 2);
		cfg_edit(dir, "mlp_only_layers", "[3]");
		expect_layers(dir, (const uint32_t[]){1}, 1);
		cfg_edit(dir, "decoder_sparse_step", "3");
		cfg_edit(dir, "mlp_only_layers", "null");
		expect_layers(dir, (const uint32_t[]){2}, 1);
		cfg_edit(dir, "decoder_sparse_step", NULL);
		cfg_edit(dir, "mlp_only_layers", NULL);
		expect_layers(dir, (const uint32_t[]){0, 1, 2, 3}, 4);
		/* every layer dense */
		cfg_edit(dir, "mlp_only_layers", "[0, 1, 2, 3]");
		expect_fail(dir, NULL, -EINVAL, NEEDLES("no MoE layer"));
		free(dir);
	}
}

static void test_deepseek_layers(void **state)
{
	struct moe_synth_opts o;
	char *dir;

	(void)state;
	for (int f = MOE_FAM_DEEPSEEK_V2; f <= MOE_FAM_DEEPSEEK_V3; f++) {
		tiny(&o, f, MOE_LAYOUT_PER_EXPERT);
		o.layers = 4;
		o.dense_first = 1;
		dir = make(&o);
		expect_layers(dir, (const uint32_t[]){1, 2, 3}, 3);
		cfg_edit(dir, "first_k_dense_replace", "3");
		expect_layers(dir, (const uint32_t[]){3}, 1);
		/* moe_layer_freq is not read by transformers */
		cfg_edit(dir, "moe_layer_freq", "2");
		expect_layers(dir, (const uint32_t[]){3}, 1);
		cfg_edit(dir, "first_k_dense_replace", "4");
		expect_fail(dir, NULL, -EINVAL, NEEDLES("no MoE layer"));
		/* layer 0 is now MoE but the checkpoint has no experts for it */
		cfg_edit(dir, "first_k_dense_replace", NULL);
		expect_fail(dir, NULL, -ENOENT,
			    NEEDLES("layer 0", "no experts", "model.layers.0.mlp.experts.0"));
		free(dir);
	}
}

/* ------------------------------------------------------------------------
 * Routing parameters
 * ------------------------------------------------------------------------ */

static struct moe_route_params route_of(const char *dir, bool *fp32)
{
	struct moe_model *m = open_ok(dir, NULL);
	struct moe_route_params r = m->route;

	*fp32 = m->router_fp32;
	moe_model_free(m);
	return r;
}

static void test_routing_softmax_families(void **state)
{
	struct moe_route_params r;
	bool fp32;
	char *dir;

	(void)state;
	/* Mixtral renormalizes whatever norm_topk_prob says */
	dir = make_tiny(MOE_FAM_MIXTRAL, MOE_LAYOUT_PER_EXPERT);
	cfg_edit(dir, "norm_topk_prob", "false");
	r = route_of(dir, &fp32);
	assert_true(r.renormalize);
	assert_false(fp32);
	assert_int_equal(r.score, MOE_SCORE_SOFTMAX);
	assert_int_equal(r.group, MOE_GROUP_NONE);
	assert_true(r.scale == 1.0f);
	free(dir);

	/* Qwen2/Qwen3/OLMoE: renormalize iff norm_topk_prob, default false */
	for (int f = MOE_FAM_QWEN2_MOE; f <= MOE_FAM_OLMOE; f++) {
		dir = make_tiny(f, MOE_LAYOUT_PER_EXPERT);
		cfg_edit(dir, "norm_topk_prob", "true");
		r = route_of(dir, &fp32);
		assert_true(r.renormalize);
		assert_false(fp32);
		assert_int_equal(r.score, MOE_SCORE_SOFTMAX);
		assert_int_equal(r.group, MOE_GROUP_NONE);
		assert_true(r.scale == 1.0f);
		cfg_edit(dir, "norm_topk_prob", "false");
		assert_false(route_of(dir, &fp32).renormalize);
		cfg_edit(dir, "norm_topk_prob", NULL);
		assert_false(route_of(dir, &fp32).renormalize);
		/* a scale is a DeepSeek key: ignored here */
		cfg_edit(dir, "routed_scaling_factor", "3.0");
		assert_true(route_of(dir, &fp32).scale == 1.0f);
		free(dir);
	}
}

static void test_routing_deepseek_v3(void **state)
{
	char *dir = make_tiny(MOE_FAM_DEEPSEEK_V3, MOE_LAYOUT_PER_EXPERT);
	struct moe_route_params r;
	bool fp32;

	(void)state;
	r = route_of(dir, &fp32);
	assert_true(fp32);
	assert_int_equal(r.score, MOE_SCORE_SIGMOID);
	assert_int_equal(r.group, MOE_GROUP_SUM_TOP2);
	assert_int_equal(r.n_group, 4);
	assert_int_equal(r.topk_group, 2);
	assert_true(r.renormalize);
	assert_true(r.renorm_eps == 1e-20f);
	assert_true(r.scale == 2.5f);
	/* scoring_func / topk_method are not read: sigmoid + noaux_tc always */
	cfg_edit(dir, "scoring_func", "\"softmax\"");
	cfg_edit(dir, "topk_method", "\"greedy\"");
	cfg_edit(dir, "norm_topk_prob", "false");
	r = route_of(dir, &fp32);
	assert_int_equal(r.score, MOE_SCORE_SIGMOID);
	assert_int_equal(r.group, MOE_GROUP_SUM_TOP2);
	assert_false(r.renormalize);
	/* norm_topk_prob defaults to true; groups default to one */
	cfg_edit(dir, "norm_topk_prob", NULL);
	cfg_edit(dir, "n_group", NULL);
	cfg_edit(dir, "topk_group", NULL);
	cfg_edit(dir, "routed_scaling_factor", NULL);
	r = route_of(dir, &fp32);
	assert_true(r.renormalize);
	assert_int_equal(r.n_group, 1);
	assert_int_equal(r.topk_group, 1);
	assert_true(r.scale == 1.0f);
	free(dir);
}

static void test_routing_deepseek_v2(void **state)
{
	struct moe_synth_opts o;
	struct moe_route_params r;
	bool fp32;
	char *dir;

	(void)state;
	tiny(&o, MOE_FAM_DEEPSEEK_V2, MOE_LAYOUT_PER_EXPERT);
	o.routed_scale = 16.0f;
	o.norm_topk = true; /* ignored by V2 */
	dir = make(&o);
	r = route_of(dir, &fp32);
	assert_true(fp32);
	assert_int_equal(r.score, MOE_SCORE_SOFTMAX);
	assert_int_equal(r.group, MOE_GROUP_NONE);
	assert_false(r.renormalize);
	assert_true(r.scale == 16.0f);
	cfg_edit(dir, "topk_method", NULL);
	assert_int_equal(route_of(dir, &fp32).group, MOE_GROUP_NONE);
	cfg_edit(dir, "topk_method", "\"group_limited_greedy\"");
	cfg_edit(dir, "n_group", "4");
	cfg_edit(dir, "topk_group", "3");
	r = route_of(dir, &fp32);
	assert_int_equal(r.score, MOE_SCORE_SOFTMAX);
	assert_int_equal(r.group, MOE_GROUP_MAX);
	assert_int_equal(r.n_group, 4);
	assert_int_equal(r.topk_group, 3);
	assert_false(r.renormalize);
	/* groups of one expert are fine for a max score */
	cfg_edit(dir, "n_group", "8");
	assert_int_equal(route_of(dir, &fp32).n_group, 8);
	free(dir);
}

/* ------------------------------------------------------------------------
 * Aliases and the family override
 * ------------------------------------------------------------------------ */

static void test_num_local_experts_alias(void **state)
{
	static const enum moe_family fams[] = {MOE_FAM_QWEN2_MOE, MOE_FAM_QWEN3_MOE,
					       MOE_FAM_OLMOE};
	struct moe_model *m;
	char *dir;

	(void)state;
	for (size_t i = 0; i < 3; i++) {
		dir = make_tiny(fams[i], MOE_LAYOUT_PER_EXPERT);
		cfg_rename(dir, "num_experts", "num_local_experts");
		m = open_ok(dir, NULL);
		assert_int_equal(m->n_experts, E);
		moe_model_free(m);
		/* num_experts wins when both are present */
		cfg_edit(dir, "num_experts", "8");
		cfg_edit(dir, "num_local_experts", "4");
		m = open_ok(dir, NULL);
		assert_int_equal(m->n_experts, E);
		moe_model_free(m);
		free(dir);
	}
	/* and the other way round for Mixtral */
	dir = make_tiny(MOE_FAM_MIXTRAL, MOE_LAYOUT_PER_EXPERT);
	cfg_rename(dir, "num_local_experts", "num_experts");
	m = open_ok(dir, NULL);
	assert_int_equal(m->n_experts, E);
	moe_model_free(m);
	free(dir);
}

static void test_family_override(void **state)
{
	char *dir = make_tiny(MOE_FAM_OLMOE, MOE_LAYOUT_PER_EXPERT);
	struct moe_model *m;

	(void)state;
	cfg_edit(dir, "model_type", "\"my_olmoe_finetune\"");
	expect_fail(dir, NULL, -EINVAL, NEEDLES("my_olmoe_finetune", "not a supported"));
	m = open_ok(dir, "olmoe");
	assert_int_equal(m->family, MOE_FAM_OLMOE);
	moe_model_free(m);
	/* the override wins over a supported model_type too */
	cfg_edit(dir, "model_type", "\"mixtral\"");
	expect_fail(dir, NULL, -ENOENT, NEEDLES("layer 0", "no experts"));
	m = open_ok(dir, "olmoe");
	assert_int_equal(m->family, MOE_FAM_OLMOE);
	moe_model_free(m);
	/* and it needs no model_type at all */
	cfg_edit(dir, "model_type", NULL);
	m = open_ok(dir, "olmoe");
	moe_model_free(m);
	expect_fail(dir, "gpt_oss", -EINVAL, NEEDLES("unknown model family", "gpt_oss"));
	free(dir);
}

/* ------------------------------------------------------------------------
 * config.json errors: through moe_model_open(), and the same text through
 * moe_model_parse_config() must give the same code and message
 * ------------------------------------------------------------------------ */

struct cfg_case {
	enum moe_family fam;
	const char *key, *val;	 /* val NULL: delete the key */
	const char *key2, *val2; /* a second edit, or NULL */
	const char *needles[4];
};

static const struct cfg_case cfg_cases[] = {
	{MOE_FAM_MIXTRAL, "hidden_size", NULL, NULL, NULL, {"missing key \"hidden_size\""}},
	{MOE_FAM_QWEN3_MOE, "num_experts_per_tok", NULL, NULL, NULL,
	 {"missing key \"num_experts_per_tok\""}},
	{MOE_FAM_OLMOE, "model_type", NULL, NULL, NULL, {"missing key \"model_type\""}},
	{MOE_FAM_DEEPSEEK_V2, "num_hidden_layers", NULL, NULL, NULL,
	 {"missing key \"num_hidden_layers\""}},
	{MOE_FAM_MIXTRAL, "num_local_experts", NULL, NULL, NULL,
	 {"missing key \"num_local_experts\""}},
	{MOE_FAM_QWEN2_MOE, "num_experts", NULL, NULL, NULL, {"missing key \"num_experts\""}},
	{MOE_FAM_QWEN3_MOE, "num_experts", NULL, NULL, NULL, {"missing key \"num_experts\""}},
	{MOE_FAM_OLMOE, "num_experts", NULL, NULL, NULL, {"missing key \"num_experts\""}},
	{MOE_FAM_DEEPSEEK_V2, "n_routed_experts", NULL, NULL, NULL,
	 {"missing key \"n_routed_experts\""}},
	{MOE_FAM_DEEPSEEK_V3, "n_routed_experts", NULL, NULL, NULL,
	 {"missing key \"n_routed_experts\""}},
	{MOE_FAM_QWEN3_MOE, "moe_intermediate_size", NULL, NULL, NULL,
	 {"missing key \"moe_intermediate_size\""}},
	{MOE_FAM_OLMOE, "intermediate_size", NULL, NULL, NULL,
	 {"missing key \"intermediate_size\""}},
	{MOE_FAM_MIXTRAL, "model_type", "\"llama\"", NULL, NULL,
	 {"\"llama\" is not a supported", "mixtral, qwen2_moe, qwen3_moe, olmoe",
	  "deepseek_v2, deepseek_v3"}},
	{MOE_FAM_MIXTRAL, "model_type", "\"gpt_oss\"", NULL, NULL, {"gpt_oss", "mixtral"}},
	{MOE_FAM_QWEN2_MOE, "hidden_act", "\"gelu\"", NULL, NULL,
	 {"hidden_act \"gelu\"", "silu only"}},
	{MOE_FAM_QWEN2_MOE, "hidden_act", "7", NULL, NULL, {"\"hidden_act\" must be a string"}},
	{MOE_FAM_OLMOE, "model_type", "[\"olmoe\"]", NULL, NULL,
	 {"\"model_type\" must be a string"}},
	{MOE_FAM_DEEPSEEK_V2, "topk_method", "1", NULL, NULL, {"\"topk_method\" must be a string"}},
	{MOE_FAM_MIXTRAL, "num_experts_per_tok", "9", NULL, NULL,
	 {"num_experts_per_tok 9 > number of experts 8"}},
	{MOE_FAM_OLMOE, "num_experts_per_tok", "0", NULL, NULL,
	 {"\"num_experts_per_tok\" = 0", "out of range"}},
	{MOE_FAM_MIXTRAL, "hidden_size", "\"16\"", NULL, NULL,
	 {"\"hidden_size\" must be an integer"}},
	{MOE_FAM_MIXTRAL, "hidden_size", "16.5", NULL, NULL,
	 {"\"hidden_size\" must be an integer"}},
	{MOE_FAM_MIXTRAL, "hidden_size", "-16", NULL, NULL, {"\"hidden_size\"", "out of range"}},
	{MOE_FAM_MIXTRAL, "hidden_size", "1e300", NULL, NULL, {"\"hidden_size\"", "out of range"}},
	{MOE_FAM_MIXTRAL, "num_local_experts", "100000", NULL, NULL,
	 {"\"num_local_experts\"", "out of range"}},
	{MOE_FAM_DEEPSEEK_V3, "n_group", "3", NULL, NULL,
	 {"8 experts do not split into n_group = 3"}},
	{MOE_FAM_DEEPSEEK_V3, "topk_group", "5", NULL, NULL, {"topk_group 5 > n_group 4"}},
	{MOE_FAM_DEEPSEEK_V3, "n_group", "9", NULL, NULL, {"\"n_group\"", "out of range"}},
	/* E 8, 4 groups of 2, keep 1: 2 experts left for K 4 */
	{MOE_FAM_DEEPSEEK_V3, "topk_group", "1", "num_experts_per_tok", "4",
	 {"top-k 4", "2 experts left in the 1 kept groups"}},
	{MOE_FAM_DEEPSEEK_V3, "n_group", "8", "topk_group", "2",
	 {"top 2", "groups have 1 expert"}},
	{MOE_FAM_DEEPSEEK_V2, "topk_method", "\"group_limited_greedy\"", "n_group", "5",
	 {"do not split into n_group = 5"}},
	{MOE_FAM_DEEPSEEK_V2, "topk_method", "\"noaux_tc\"", NULL, NULL,
	 {"topk_method \"noaux_tc\" is not supported"}},
	{MOE_FAM_DEEPSEEK_V3, "routed_scaling_factor", "\"2.5\"", NULL, NULL,
	 {"\"routed_scaling_factor\" must be a number"}},
	{MOE_FAM_DEEPSEEK_V3, "routed_scaling_factor", "-1", NULL, NULL,
	 {"\"routed_scaling_factor\" must be a number"}},
	{MOE_FAM_QWEN3_MOE, "norm_topk_prob", "1", NULL, NULL,
	 {"\"norm_topk_prob\" must be true or false"}},
	{MOE_FAM_QWEN2_MOE, "mlp_only_layers", "\"0\"", NULL, NULL,
	 {"\"mlp_only_layers\" must be a list"}},
	{MOE_FAM_QWEN2_MOE, "mlp_only_layers", "[-1]", NULL, NULL,
	 {"\"mlp_only_layers\" entries must be integers >= 0"}},
	{MOE_FAM_QWEN3_MOE, "mlp_only_layers", "[0.5]", NULL, NULL, {"\"mlp_only_layers\""}},
	{MOE_FAM_QWEN3_MOE, "decoder_sparse_step", "0", NULL, NULL,
	 {"\"decoder_sparse_step\"", "out of range"}},
	{MOE_FAM_DEEPSEEK_V2, "first_k_dense_replace", "-1", NULL, NULL,
	 {"\"first_k_dense_replace\"", "out of range"}},
	{MOE_FAM_DEEPSEEK_V2, "n_shared_experts", "65", NULL, NULL,
	 {"\"n_shared_experts\"", "out of range"}},
};

static void check_cfg_case(const struct cfg_case *c)
{
	char *dir = make_tiny(c->fam, MOE_LAYOUT_PER_EXPERT), *cfg = path_in(dir, "config.json");
	char err[MOE_ERRLEN] = "", err2[MOE_ERRLEN] = "", *buf;
	struct moe_model *m = NULL, mm;
	bool *is_moe = NULL;
	size_t len;
	int ret, ret2;

	cfg_edit(dir, c->key, c->val);
	if (c->key2)
		cfg_edit(dir, c->key2, c->val2);
	ret = moe_model_open(dir, NULL, &m, err);
	if (ret == 0) {
		moe_model_free(m);
		fail_msg("%s=%s: opened", c->key, c->val ? c->val : "(deleted)");
	}
	if (ret != -EINVAL)
		fail_msg("%s: returned %d (%s)", c->key, ret, err);
	if (!strstr(err, cfg))
		fail_msg("message does not name %s: %s", cfg, err);
	for (size_t i = 0; i < 4 && c->needles[i]; i++)
		if (!strstr(err, c->needles[i]))
			fail_msg("message lacks \"%s\": %s", c->needles[i], err);

	memset(&mm, 0, sizeof(mm));
	if (moe_read_small_file(cfg, 1u << 20, &buf, &len, err2))
		fail_msg("%s", err2);
	ret2 = moe_model_parse_config(cfg, buf, len, NULL, &mm, &is_moe, err2);
	free(buf);
	assert_int_equal(ret2, ret);
	assert_string_equal(err2, err);
	free(cfg);
	free(dir);
}

static void test_config_errors(void **state)
{
	(void)state;
	for (size_t i = 0; i < sizeof(cfg_cases) / sizeof(cfg_cases[0]); i++)
		check_cfg_case(&cfg_cases[i]);
}

static void test_config_missing(void **state)
{
	char *dir = make_tiny(MOE_FAM_MIXTRAL, MOE_LAYOUT_PER_EXPERT);
	char *cfg = path_in(dir, "config.json");

	(void)state;
	assert_int_equal(unlink(cfg), 0);
	expect_fail(dir, NULL, -ENOENT, NEEDLES(cfg, "No such file"));
	/* a directory where the file should be */
	assert_int_equal(mkdir(cfg, 0755), 0);
	expect_fail(dir, NULL, -EINVAL, NEEDLES(cfg, "not a regular file"));
	assert_int_equal(rmdir(cfg), 0);
	free(cfg);
	free(dir);
}

static void test_config_not_json(void **state)
{
	char *dir = make_tiny(MOE_FAM_MIXTRAL, MOE_LAYOUT_PER_EXPERT);
	char *cfg = path_in(dir, "config.json");

	(void)state;
	write_text(dir, "config.json", "{\"model_type\": \"mixtral\",");
	expect_fail(dir, NULL, -EINVAL, NEEDLES(cfg, "not valid JSON"));
	write_text(dir, "config.json", "");
	expect_fail(dir, NULL, -EINVAL, NEEDLES(cfg, "not valid JSON"));
	write_text(dir, "config.json", "[{\"model_type\": \"mixtral\"}]");
	expect_fail(dir, NULL, -EINVAL, NEEDLES(cfg, "not a JSON object"));
	write_text(dir, "config.json", "\"mixtral\"");
	expect_fail(dir, NULL, -EINVAL, NEEDLES(cfg, "not a JSON object"));
	free(cfg);
	free(dir);
}

/* moe_model_parse_config() on JSON written by hand. */
static void test_parse_config_memory(void **state)
{
	static const char mix[] = "{\"model_type\":\"mixtral\",\"hidden_size\":4096,"
				  "\"intermediate_size\":14336,\"num_local_experts\":8,"
				  "\"num_experts_per_tok\":2,\"num_hidden_layers\":32,"
				  "\"hidden_act\":\"silu\"}";
	static const char v3[] = "{\"model_type\":\"deepseek_v3\",\"hidden_size\":7168,"
				 "\"moe_intermediate_size\":2048,\"n_routed_experts\":256,"
				 "\"n_shared_experts\":1,\"num_experts_per_tok\":8,\"n_group\":8,"
				 "\"topk_group\":4,\"routed_scaling_factor\":2.5,"
				 "\"first_k_dense_replace\":3,\"num_hidden_layers\":61}";
	struct moe_model m;
	char err[MOE_ERRLEN];
	bool *is_moe;

	(void)state;
	memset(&m, 0, sizeof(m));
	if (moe_model_parse_config("mix.json", mix, sizeof(mix) - 1, NULL, &m, &is_moe, err))
		fail_msg("%s", err);
	assert_int_equal(m.family, MOE_FAM_MIXTRAL);
	assert_int_equal(m.hidden, 4096);
	assert_int_equal(m.inter, 14336);
	assert_int_equal(m.n_layers, 32);
	for (int l = 0; l < 32; l++)
		assert_true(is_moe[l]);
	free(is_moe);

	memset(&m, 0, sizeof(m));
	if (moe_model_parse_config("v3.json", v3, sizeof(v3) - 1, NULL, &m, &is_moe, err))
		fail_msg("%s", err);
	assert_int_equal(m.family, MOE_FAM_DEEPSEEK_V3);
	assert_int_equal(m.n_experts, 256);
	assert_int_equal(m.shared_inter, 2048);
	assert_int_equal(m.route.n_group, 8);
	assert_true(m.route.renormalize);
	for (int l = 0; l < 61; l++)
		assert_int_equal(is_moe[l], l >= 3);
	free(is_moe);

	/* the length bounds the text: a cut copy is not JSON */
	memset(&m, 0, sizeof(m));
	assert_int_equal(moe_model_parse_config("mix.json", mix, 20, NULL, &m, &is_moe, err),
			 -EINVAL);
	assert_non_null(strstr(err, "mix.json: not valid JSON"));
	/* an override of an unknown family */
	memset(&m, 0, sizeof(m));
	assert_int_equal(moe_model_parse_config("mix.json", mix, sizeof(mix) - 1, "llama4", &m,
						&is_moe, err),
			 -EINVAL);
	assert_non_null(strstr(err, "unknown model family \"llama4\""));
	/* the override reinterprets the keys: Qwen3 takes num_local_experts as
	 * an alias but wants moe_intermediate_size */
	memset(&m, 0, sizeof(m));
	assert_int_equal(moe_model_parse_config("mix.json", mix, sizeof(mix) - 1, "qwen3_moe", &m,
						&is_moe, err),
			 -EINVAL);
	assert_non_null(strstr(err, "missing key \"moe_intermediate_size\""));
}

/* ------------------------------------------------------------------------
 * Tensor errors
 * ------------------------------------------------------------------------ */

static void test_missing_tensor(void **state)
{
	static const struct {
		enum moe_family f;
		enum moe_layout lay;
		uint32_t layer;
		enum moe_tensor_kind kind;
		uint32_t e;
	} cases[] = {
		{MOE_FAM_MIXTRAL, MOE_LAYOUT_PER_EXPERT, 1, MOE_T_UP, 3},
		{MOE_FAM_MIXTRAL, MOE_LAYOUT_PER_EXPERT, 0, MOE_T_ROUTER, 0},
		{MOE_FAM_QWEN3_MOE, MOE_LAYOUT_PER_EXPERT, 1, MOE_T_DOWN, E - 1},
		{MOE_FAM_QWEN2_MOE, MOE_LAYOUT_PER_EXPERT, 0, MOE_T_SHARED_EXPERT_GATE, 0},
		{MOE_FAM_QWEN2_MOE, MOE_LAYOUT_FUSED, 1, MOE_T_SHARED_DOWN, 0},
		{MOE_FAM_DEEPSEEK_V3, MOE_LAYOUT_PER_EXPERT, 1, MOE_T_BIAS, 0},
		{MOE_FAM_DEEPSEEK_V2, MOE_LAYOUT_PER_EXPERT, 0, MOE_T_SHARED_GATE, 0},
		{MOE_FAM_OLMOE, MOE_LAYOUT_FUSED, 1, MOE_T_FUSED_DOWN, 0},
	};
	char name[256];

	(void)state;
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		char *dir = make_tiny(cases[i].f, cases[i].lay);

		tname(cases[i].f, cases[i].lay, cases[i].layer, cases[i].kind, cases[i].e, name);
		st_drop(dir, name);
		expect_fail(dir, NULL, -ENOENT, NEEDLES(dir, "missing tensor", name));
		free(dir);
	}
}

/* Without expert 0's gate nor a fused tensor, the layer has no experts. */
static void test_layer_without_experts(void **state)
{
	char *dir = make_tiny(MOE_FAM_OLMOE, MOE_LAYOUT_FUSED), name[256];

	(void)state;
	tname(MOE_FAM_OLMOE, MOE_LAYOUT_FUSED, 1, MOE_T_FUSED_GATE_UP, 0, name);
	st_drop(dir, name);
	expect_fail(dir, NULL, -ENOENT, NEEDLES("layer 1", "no experts"));
	free(dir);
}

static void test_transposed(void **state)
{
	char *dir, name[256];

	(void)state;
	/* per-expert down_proj [H, I] stored as [I, H] */
	dir = make_tiny(MOE_FAM_QWEN3_MOE, MOE_LAYOUT_PER_EXPERT);
	tname(MOE_FAM_QWEN3_MOE, MOE_LAYOUT_PER_EXPERT, 0, MOE_T_DOWN, 2, name);
	st_transpose(dir, name);
	expect_fail(dir, NULL, -EINVAL,
		    NEEDLES(name, "model.safetensors", "[8, 16]", "expected [16, 8]",
			    "transposed"));
	free(dir);
	/* fused down_proj [E, H, I] stored as [E, I, H] */
	dir = make_tiny(MOE_FAM_DEEPSEEK_V2, MOE_LAYOUT_FUSED);
	tname(MOE_FAM_DEEPSEEK_V2, MOE_LAYOUT_FUSED, 1, MOE_T_FUSED_DOWN, 0, name);
	st_transpose(dir, name);
	expect_fail(dir, NULL, -EINVAL,
		    NEEDLES(name, "[8, 8, 16]", "expected [8, 16, 8]", "transposed"));
	free(dir);
	/* the router [E, H] */
	dir = make_tiny(MOE_FAM_MIXTRAL, MOE_LAYOUT_PER_EXPERT);
	tname(MOE_FAM_MIXTRAL, MOE_LAYOUT_PER_EXPERT, 0, MOE_T_ROUTER, 0, name);
	st_transpose(dir, name);
	expect_fail(dir, NULL, -EINVAL, NEEDLES(name, "expected [8, 16]", "transposed"));
	free(dir);
}

static void test_shape_mismatch(void **state)
{
	char *dir = make_tiny(MOE_FAM_MIXTRAL, MOE_LAYOUT_PER_EXPERT), name[256];

	(void)state;
	/* hidden_size 32 in config.json, 16 in the tensors */
	cfg_edit(dir, "hidden_size", "32");
	tname(MOE_FAM_MIXTRAL, MOE_LAYOUT_PER_EXPERT, 0, MOE_T_ROUTER, 0, name);
	expect_fail(dir, NULL, -EINVAL, NEEDLES(name, "shape [8, 16]", "expected [8, 32]"));
	/* and an intermediate size that differs */
	cfg_edit(dir, "hidden_size", "16");
	cfg_edit(dir, "intermediate_size", "4");
	tname(MOE_FAM_MIXTRAL, MOE_LAYOUT_PER_EXPERT, 0, MOE_T_GATE, 0, name);
	expect_fail(dir, NULL, -EINVAL, NEEDLES(name, "shape [8, 16]", "expected [4, 16]"));
	/* and fewer experts than the router has rows */
	cfg_edit(dir, "intermediate_size", "8");
	cfg_edit(dir, "num_local_experts", "4");
	tname(MOE_FAM_MIXTRAL, MOE_LAYOUT_PER_EXPERT, 0, MOE_T_ROUTER, 0, name);
	expect_fail(dir, NULL, -EINVAL, NEEDLES(name, "expected [4, 16]"));
	free(dir);
	/* a shared expert size that differs from the tensors */
	dir = make_tiny(MOE_FAM_DEEPSEEK_V3, MOE_LAYOUT_PER_EXPERT);
	cfg_edit(dir, "n_shared_experts", "1");
	tname(MOE_FAM_DEEPSEEK_V3, MOE_LAYOUT_PER_EXPERT, 0, MOE_T_SHARED_GATE, 0, name);
	expect_fail(dir, NULL, -EINVAL, NEEDLES(name, "expected [8, 16]"));
	free(dir);
}

static void test_bad_dtype(void **state)
{
	char *dir, name[256];

	(void)state;
	/* an I32 expert weight */
	dir = make_tiny(MOE_FAM_QWEN3_MOE, MOE_LAYOUT_PER_EXPERT);
	tname(MOE_FAM_QWEN3_MOE, MOE_LAYOUT_PER_EXPERT, 1, MOE_T_GATE, 1, name);
	st_retype(dir, name, MOE_ST_I32);
	expect_fail(dir, NULL, -EINVAL,
		    NEEDLES(name, "model.safetensors", "I32", "bf16, f16 or f32"));
	free(dir);
	/* an F64 router: the model's dtype is unsupported */
	dir = make_tiny(MOE_FAM_MIXTRAL, MOE_LAYOUT_PER_EXPERT);
	tname(MOE_FAM_MIXTRAL, MOE_LAYOUT_PER_EXPERT, 0, MOE_T_ROUTER, 0, name);
	st_retype(dir, name, MOE_ST_F64);
	expect_fail(dir, NULL, -EINVAL, NEEDLES(name, "F64", "bf16, f16 or f32"));
	free(dir);
	/* an F8 fused tensor */
	dir = make_tiny(MOE_FAM_OLMOE, MOE_LAYOUT_FUSED);
	tname(MOE_FAM_OLMOE, MOE_LAYOUT_FUSED, 0, MOE_T_FUSED_DOWN, 0, name);
	st_retype(dir, name, MOE_ST_F8_E4M3);
	expect_fail(dir, NULL, -EINVAL, NEEDLES(name, "F8_E4M3"));
	free(dir);
	/* a V3 correction bias in I64 */
	dir = make_tiny(MOE_FAM_DEEPSEEK_V3, MOE_LAYOUT_PER_EXPERT);
	tname(MOE_FAM_DEEPSEEK_V3, MOE_LAYOUT_PER_EXPERT, 0, MOE_T_BIAS, 0, name);
	st_retype(dir, name, MOE_ST_I64);
	expect_fail(dir, NULL, -EINVAL, NEEDLES(name, "I64"));
	free(dir);
}

static void test_mixed_dtypes(void **state)
{
	struct moe_model *m;
	char *dir, name[256];

	(void)state;
	/* one expert's down_proj in f32 in a bf16 model */
	dir = make_tiny(MOE_FAM_MIXTRAL, MOE_LAYOUT_PER_EXPERT);
	tname(MOE_FAM_MIXTRAL, MOE_LAYOUT_PER_EXPERT, 1, MOE_T_DOWN, 5, name);
	st_retype(dir, name, MOE_ST_F32);
	expect_fail(dir, NULL, -EINVAL, NEEDLES(name, "f32", "bf16", "mixed dtypes"));
	free(dir);
	/* a shared expert in f16 */
	dir = make_tiny(MOE_FAM_QWEN2_MOE, MOE_LAYOUT_PER_EXPERT);
	tname(MOE_FAM_QWEN2_MOE, MOE_LAYOUT_PER_EXPERT, 0, MOE_T_SHARED_UP, 0, name);
	st_retype(dir, name, MOE_ST_F16);
	expect_fail(dir, NULL, -EINVAL, NEEDLES(name, "mixed dtypes"));
	free(dir);
	/* a router in another dtype than the experts' is read as it is (the
	 * model's dtype is the experts'): transformers >= 5.25 writes
	 * DeepSeek's router F32 in a bf16 model; any family may have one */
	dir = make_tiny(MOE_FAM_OLMOE, MOE_LAYOUT_PER_EXPERT);
	tname(MOE_FAM_OLMOE, MOE_LAYOUT_PER_EXPERT, 1, MOE_T_ROUTER, 0, name);
	st_retype(dir, name, MOE_ST_F32);
	m = open_ok(dir, NULL);
	assert_int_equal(m->dtype, MOE_DT_BF16);
	assert_int_equal(m->layers[1].router.dtype, MOE_DT_F32);
	assert_int_equal(m->layers[0].router.dtype, MOE_DT_BF16);
	moe_model_free(m);
	free(dir);
	for (int f = 0; f < 2; f++) {
		enum moe_family fam = f ? MOE_FAM_DEEPSEEK_V3 : MOE_FAM_DEEPSEEK_V2;

		uint32_t first;

		dir = make_tiny(fam, MOE_LAYOUT_PER_EXPERT);
		m = open_ok(dir, NULL);
		first = m->layers[0].index;
		moe_model_free(m);
		tname(fam, MOE_LAYOUT_PER_EXPERT, first, MOE_T_ROUTER, 0, name);
		st_retype(dir, name, MOE_ST_F32);
		m = open_ok(dir, NULL);
		assert_int_equal(m->dtype, MOE_DT_BF16);
		assert_int_equal(m->layers[0].router.dtype, MOE_DT_F32);
		moe_model_free(m);
		free(dir);
	}
	/* the first expert tensor sets the model's dtype; a later one that
	 * differs is named */
	dir = make_tiny(MOE_FAM_MIXTRAL, MOE_LAYOUT_PER_EXPERT);
	tname(MOE_FAM_MIXTRAL, MOE_LAYOUT_PER_EXPERT, 0, MOE_T_GATE, 0, name);
	st_retype(dir, name, MOE_ST_F32);
	tname(MOE_FAM_MIXTRAL, MOE_LAYOUT_PER_EXPERT, 0, MOE_T_UP, 0, name);
	expect_fail(dir, NULL, -EINVAL, NEEDLES(name, "bf16", "f32", "mixed dtypes"));
	free(dir);
	/* the V3 bias is kept in fp32 whatever the weights are */
	dir = make_tiny(MOE_FAM_DEEPSEEK_V3, MOE_LAYOUT_PER_EXPERT);
	tname(MOE_FAM_DEEPSEEK_V3, MOE_LAYOUT_PER_EXPERT, 0, MOE_T_BIAS, 0, name);
	st_retype(dir, name, MOE_ST_BF16);
	m = open_ok(dir, NULL);
	assert_int_equal(m->layers[0].bias.dtype, MOE_DT_BF16);
	assert_int_equal(m->layers[1].bias.dtype, MOE_DT_F32);
	moe_model_free(m);
	free(dir);
}

/* ------------------------------------------------------------------------
 * Sharded checkpoints and the index
 * ------------------------------------------------------------------------ */

static char *make_sharded(void)
{
	struct moe_synth_opts o;

	tiny(&o, MOE_FAM_QWEN3_MOE, MOE_LAYOUT_PER_EXPERT);
	o.shards = 3;
	return make(&o);
}

static void test_sharded_ok(void **state)
{
	char *dir = make_sharded(), err[MOE_ERRLEN];
	struct moe_model *m = open_ok(dir, NULL);
	float buf[H * I];

	(void)state;
	assert_int_equal(m->ckpt->n_shards, 3);
	assert_int_equal(m->n_moe_layers, 2);
	/* the first and last tensors live in the first and last shards */
	assert_int_equal(m->layers[0].router.at.shard, 0);
	assert_int_equal(m->layers[1].experts[E - 1].down.at.shard, 2);
	if (moe_model_read_f32(m, &m->layers[1].experts[E - 1].down, buf, err))
		fail_msg("%s", err);
	assert_int_equal(moe_model_close_files(m, err), 0);
	assert_null(m->ckpt);
	/* reads after closing are refused, with the directory named */
	assert_int_equal(moe_model_read(m, &m->layers[0].router, buf, err), -EBADF);
	assert_non_null(strstr(err, dir));
	moe_model_free(m);
	free(dir);
}

static const char *const shard2 = "model-00002-of-00003.safetensors";

static void test_shard_missing_on_disk(void **state)
{
	char *dir = make_sharded(), *p = path_in(dir, shard2);

	(void)state;
	assert_int_equal(unlink(p), 0);
	expect_fail(dir, NULL, -ENOENT, NEEDLES(p, "No such file"));
	free(p);
	free(dir);
}

static void test_index_names_missing_shard(void **state)
{
	char *dir = make_sharded(), *idx = path_in(dir, "model.safetensors.index.json");
	char name[256];

	(void)state;
	tname(MOE_FAM_QWEN3_MOE, MOE_LAYOUT_PER_EXPERT, 1, MOE_T_UP, 4, name);
	json_edit(idx, "weight_map", name, "\"model-00009-of-00009.safetensors\"");
	expect_fail(dir, NULL, -ENOENT,
		    NEEDLES("model-00009-of-00009.safetensors", "No such file"));
	free(idx);
	free(dir);
}

static void test_index_wrong_shard(void **state)
{
	char *dir = make_sharded(), *idx = path_in(dir, "model.safetensors.index.json");
	char name[256];

	(void)state;
	/* the router of layer 0 is in shard 1 */
	tname(MOE_FAM_QWEN3_MOE, MOE_LAYOUT_PER_EXPERT, 0, MOE_T_ROUTER, 0, name);
	json_edit(idx, "weight_map", name, "\"model-00003-of-00003.safetensors\"");
	expect_fail(dir, NULL, -EINVAL,
		    NEEDLES(idx, name, "model-00003-of-00003.safetensors", "does not contain it"));
	free(idx);
	free(dir);
}

static void test_index_bad_file_names(void **state)
{
	static const char *const bad[] = {"\"../x.safetensors\"", "\"sub/x.safetensors\"",
					  "\"/etc/x.safetensors\"", "\"..\"", "\"model.bin\"",
					  "\"\"", "\"x.safetensors.bak\""};
	char *dir = make_sharded(), *idx = path_in(dir, "model.safetensors.index.json");
	char name[256];

	(void)state;
	tname(MOE_FAM_QWEN3_MOE, MOE_LAYOUT_PER_EXPERT, 0, MOE_T_ROUTER, 0, name);
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		json_edit(idx, "weight_map", name, bad[i]);
		expect_fail(dir, NULL, -EINVAL,
			    NEEDLES(idx, name, "not a .safetensors file name"));
	}
	json_edit(idx, "weight_map", name, "7");
	expect_fail(dir, NULL, -EINVAL, NEEDLES(idx, name, "not a string"));
	free(idx);
	free(dir);
}

static void test_index_not_json(void **state)
{
	char *dir = make_sharded(), *idx = path_in(dir, "model.safetensors.index.json");

	(void)state;
	write_text(dir, "model.safetensors.index.json", "{\"weight_map\": {");
	expect_fail(dir, NULL, -EINVAL, NEEDLES(idx, "not valid JSON"));
	write_text(dir, "model.safetensors.index.json", "{\"metadata\": {\"total_size\": 1}}");
	expect_fail(dir, NULL, -EINVAL, NEEDLES(idx, "weight_map"));
	write_text(dir, "model.safetensors.index.json", "{\"weight_map\": [\"a\"]}");
	expect_fail(dir, NULL, -EINVAL, NEEDLES(idx, "weight_map"));
	write_text(dir, "model.safetensors.index.json", "[]");
	expect_fail(dir, NULL, -EINVAL, NEEDLES(idx, "weight_map"));
	/* an empty map opens, but then every tensor is missing */
	write_text(dir, "model.safetensors.index.json", "{\"weight_map\": {}}");
	expect_fail(dir, NULL, -ENOENT, NEEDLES("no experts"));
	free(idx);
	free(dir);
}

static void test_no_weights(void **state)
{
	char *dir = make_tiny(MOE_FAM_MIXTRAL, MOE_LAYOUT_PER_EXPERT);
	char *p = path_in(dir, "model.safetensors");

	(void)state;
	assert_int_equal(unlink(p), 0);
	expect_fail(dir, NULL, -ENOENT,
		    NEEDLES(dir, "model.safetensors.index.json", "model.safetensors"));
	/* a broken model.safetensors is reported as the file's own error */
	free(tu_write_file(dir, "model.safetensors", "\x02\0\0", 3));
	expect_fail(dir, NULL, -EINVAL, NEEDLES(p, "too short"));
	free(p);
	free(dir);
}

/* The checkpoint changed between open and close_files. */
static void test_changed_before_close(void **state)
{
	char *dir = make_tiny(MOE_FAM_OLMOE, MOE_LAYOUT_PER_EXPERT), err[MOE_ERRLEN];
	char *p = path_in(dir, "model.safetensors");
	struct moe_model *m = open_ok(dir, NULL);

	(void)state;
	assert_int_equal(truncate(p, 100), 0);
	assert_int_equal(moe_model_close_files(m, err), -ESTALE);
	assert_non_null(strstr(err, p));
	assert_null(m->ckpt);
	moe_model_free(m);
	free(p);
	free(dir);
}

#define T(fn) cmocka_unit_test(fn)

int main(void)
{
	const struct CMUnitTest tests[] = {
		T(test_families),
		T(test_family_names),
		T(test_tensor_names),
		T(test_mixtral_block_names),
		T(test_qwen_layers),
		T(test_deepseek_layers),
		T(test_routing_softmax_families),
		T(test_routing_deepseek_v3),
		T(test_routing_deepseek_v2),
		T(test_num_local_experts_alias),
		T(test_family_override),
		T(test_config_errors),
		T(test_config_missing),
		T(test_config_not_json),
		T(test_parse_config_memory),
		T(test_missing_tensor),
		T(test_layer_without_experts),
		T(test_transposed),
		T(test_shape_mismatch),
		T(test_bad_dtype),
		T(test_mixed_dtypes),
		T(test_sharded_ok),
		T(test_shard_missing_on_disk),
		T(test_index_names_missing_shard),
		T(test_index_wrong_shard),
		T(test_index_bad_file_names),
		T(test_index_not_json),
		T(test_no_weights),
		T(test_changed_before_close),
	};

	return cmocka_run_group_tests_name("model", tests, group_setup, group_teardown);
}
