#include "daemon/engine/checkpoint.h"
#include "daemon/engine/model.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define INDEX_NAME  "model.safetensors.index.json"
#define SINGLE_NAME "model.safetensors"
#define MAX_INDEX_BYTES (256u << 20)

struct moe_ckpt_entry {
	const char *name; /* points into the shard's header */
	uint32_t shard;
	const struct moe_st_tensor *t;
};

static int cmp_entry(const void *a, const void *b)
{
	return strcmp(((const struct moe_ckpt_entry *)a)->name,
		      ((const struct moe_ckpt_entry *)b)->name);
}

/* Reads a whole small file (config.json, the index) into a NUL-terminated buffer. */
int moe_read_small_file(const char *path, size_t max, char **out, size_t *len, char *err)
{
	struct stat st;
	char *buf;
	ssize_t r;
	size_t got = 0;
	int fd = open(path, O_RDONLY | O_CLOEXEC);

	if (fd < 0)
		return moe_err(err, -errno, "%s: %s", path, strerror(errno));
	if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode) || (uint64_t)st.st_size > max) {
		close(fd);
		return moe_err(err, -EINVAL, "%s: not a regular file of at most %zu bytes", path,
			       max);
	}
	buf = malloc((size_t)st.st_size + 1);
	if (!buf) {
		close(fd);
		return moe_err(err, -ENOMEM, "%s: out of memory", path);
	}
	while (got < (size_t)st.st_size) {
		r = read(fd, buf + got, (size_t)st.st_size - got);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			break;
		got += (size_t)r;
	}
	close(fd);
	buf[got] = '\0';
	*out = buf;
	*len = got;
	return 0;
}

static int add_shard(struct moe_ckpt *c, const char *file, char *err)
{
	struct moe_st_file **v;
	char path[4096];
	int ret;

	if (snprintf(path, sizeof(path), "%s/%s", c->dir, file) >= (int)sizeof(path))
		return moe_err(err, -ENAMETOOLONG, "%s/%s: path too long", c->dir, file);
	v = realloc(c->shards, (c->n_shards + 1) * sizeof(*v));
	if (!v)
		return moe_err(err, -ENOMEM, "out of memory");
	c->shards = v;
	ret = moe_st_open(path, &c->shards[c->n_shards], err);
	if (ret)
		return ret;
	c->total_bytes += c->shards[c->n_shards]->id.size;
	c->n_shards++;
	return 0;
}

static int shard_of(struct moe_ckpt *c, const char *file, uint32_t *idx, char *err)
{
	size_t dl = strlen(c->dir);

	for (uint32_t i = 0; i < c->n_shards; i++) {
		if (strcmp(c->shards[i]->path + dl + 1, file) == 0) {
			*idx = i;
			return 0;
		}
	}
	*idx = c->n_shards;
	return add_shard(c, file, err);
}

/* A shard name from the index must be a plain file name in the directory. */
static int check_shard_name(const char *index, const char *tensor, const char *file, char *err)
{
	size_t n = strlen(file);

	if (!n || strchr(file, '/') || strcmp(file, ".") == 0 || strcmp(file, "..") == 0 ||
	    n < 12 || strcmp(file + n - 12, ".safetensors") != 0)
		return moe_err(err, -EINVAL,
			       "%s: weight_map['%s'] = '%s' is not a .safetensors file name in "
			       "the checkpoint directory",
			       index, tensor, file);
	return 0;
}

static int open_index(struct moe_ckpt *c, const char *path, char *err)
{
	const cJSON *map, *e;
	cJSON *root;
	char *buf;
	size_t len;
	int ret, n;

	ret = moe_read_small_file(path, MAX_INDEX_BYTES, &buf, &len, err);
	if (ret)
		return ret;
	root = cJSON_ParseWithLength(buf, len);
	free(buf);
	if (!root)
		return moe_err(err, -EINVAL, "%s: not valid JSON", path);
	map = cJSON_GetObjectItemCaseSensitive(root, "weight_map");
	if (!cJSON_IsObject(map)) {
		ret = moe_err(err, -EINVAL, "%s: no \"weight_map\" object", path);
		goto out;
	}
	n = cJSON_GetArraySize(map);
	c->index = calloc(n ? n : 1, sizeof(*c->index));
	if (!c->index) {
		ret = moe_err(err, -ENOMEM, "out of memory");
		goto out;
	}
	cJSON_ArrayForEach(e, map)
	{
		struct moe_ckpt_entry *en = &c->index[c->n_index];
		const struct moe_st_tensor *t;

		if (!cJSON_IsString(e)) {
			ret = moe_err(err, -EINVAL, "%s: weight_map['%s'] is not a string", path,
				      e->string);
			goto out;
		}
		ret = check_shard_name(path, e->string, e->valuestring, err);
		if (!ret)
			ret = shard_of(c, e->valuestring, &en->shard, err);
		if (ret)
			goto out;
		t = moe_st_find(c->shards[en->shard], e->string);
		if (!t) {
			ret = moe_err(err, -EINVAL, "%s: the index puts tensor '%s' in %s, which "
				      "does not contain it",
				      path, e->string, e->valuestring);
			goto out;
		}
		en->t = t;
		en->name = t->name;
		c->n_index++;
	}
	ret = 0;
out:
	cJSON_Delete(root);
	return ret;
}

static int index_single(struct moe_ckpt *c, char *err)
{
	const struct moe_st_header *h = &c->shards[0]->hdr;

	c->index = calloc(h->n_tensors ? h->n_tensors : 1, sizeof(*c->index));
	if (!c->index)
		return moe_err(err, -ENOMEM, "out of memory");
	for (uint32_t i = 0; i < h->n_tensors; i++)
		c->index[i] = (struct moe_ckpt_entry){h->tensors[i].name, 0, &h->tensors[i]};
	c->n_index = h->n_tensors;
	return 0;
}

int moe_ckpt_open(const char *dir, struct moe_ckpt **out, char *err)
{
	struct moe_ckpt *c;
	char path[4096];
	int ret;

	c = calloc(1, sizeof(*c));
	if (!c || !(c->dir = strdup(dir))) {
		free(c);
		return moe_err(err, -ENOMEM, "out of memory");
	}
	snprintf(path, sizeof(path), "%s/%s", dir, INDEX_NAME);
	if (access(path, F_OK) == 0) {
		ret = open_index(c, path, err);
	} else {
		snprintf(path, sizeof(path), "%s/%s", dir, SINGLE_NAME);
		if (access(path, F_OK) != 0) {
			ret = moe_err(err, -ENOENT, "%s: neither %s nor %s found", dir, INDEX_NAME,
				      SINGLE_NAME);
			goto err_close;
		}
		ret = add_shard(c, SINGLE_NAME, err);
		if (!ret)
			ret = index_single(c, err);
	}
	if (ret)
		goto err_close;
	qsort(c->index, c->n_index, sizeof(*c->index), cmp_entry);
	*out = c;
	return 0;

err_close:
	moe_ckpt_close(c);
	return ret;
}

void moe_ckpt_close(struct moe_ckpt *c)
{
	if (!c)
		return;
	for (uint32_t i = 0; i < c->n_shards; i++)
		moe_st_close(c->shards[i]);
	free(c->shards);
	free(c->index);
	free(c->dir);
	free(c);
}

int moe_ckpt_find(const struct moe_ckpt *c, const char *name, struct moe_ckpt_tensor *out)
{
	struct moe_ckpt_entry key = {.name = name}, *e;

	e = bsearch(&key, c->index, c->n_index, sizeof(key), cmp_entry);
	if (!e)
		return -ENOENT;
	out->shard = e->shard;
	out->t = e->t;
	return 0;
}

int moe_ckpt_read(struct moe_ckpt *c, const struct moe_ckpt_tensor *t, uint64_t off, uint64_t len,
		  void *dst, char *err)
{
	const struct moe_st_file *f = c->shards[t->shard];
	int ret = moe_st_pread(f, t->t, off, len, dst, err);

	c->reads++;
	if (!ret && c->hook)
		c->hook(c->hook_arg, f->path, t->t->name);
	return ret;
}

int moe_ckpt_verify(const struct moe_ckpt *c, char *err)
{
	for (uint32_t i = 0; i < c->n_shards; i++) {
		int ret = moe_st_check_identity(c->shards[i], err);

		if (ret)
			return ret;
	}
	return 0;
}

uint64_t moe_ckpt_identity_hash(const struct moe_ckpt *c)
{
	uint64_t h = 0;

	for (uint32_t i = 0; i < c->n_shards; i++)
		h = moe_st_hash(&c->shards[i]->id, sizeof(c->shards[i]->id), h);
	return h;
}
