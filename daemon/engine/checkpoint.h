/* daemon/engine/checkpoint.h — a Hugging Face checkpoint directory's tensors.
 *
 * Opens `model.safetensors`, or every shard named by
 * `model.safetensors.index.json`, validates each file fully, and resolves
 * tensor names to (shard, tensor). Reads go through pread into caller memory.
 * The identity of every shard (device, inode, size, mtime, header hash) is
 * recorded at open and re-checked by moe_ckpt_verify() after the last read,
 * so a shard rewritten in place during loading fails the load.
 */
#ifndef MOE_CHECKPOINT_H
#define MOE_CHECKPOINT_H

#include "formats/safetensors.h"

struct moe_ckpt_entry;

/* Called after every tensor read (tests use it to rewrite a shard mid-load). */
typedef void (*moe_ckpt_read_hook)(void *arg, const char *shard_path, const char *tensor);

struct moe_ckpt {
	char *dir;
	uint32_t n_shards;
	struct moe_st_file **shards;
	uint64_t total_bytes;	/* of all shard files */
	uint64_t reads;		/* tensor reads so far */
	moe_ckpt_read_hook hook;
	void *hook_arg;
	uint32_t n_index;		/* name -> tensor, sorted by name */
	struct moe_ckpt_entry *index;
};

/* A located tensor: shards[shard]->hdr.tensors[...] */
struct moe_ckpt_tensor {
	uint32_t shard;
	const struct moe_st_tensor *t;
};

int moe_ckpt_open(const char *dir, struct moe_ckpt **out, char *err);
void moe_ckpt_close(struct moe_ckpt *c);
/* 0 and *out filled, or -ENOENT (no message: callers decide if it's an error). */
int moe_ckpt_find(const struct moe_ckpt *c, const char *name, struct moe_ckpt_tensor *out);
int moe_ckpt_read(struct moe_ckpt *c, const struct moe_ckpt_tensor *t, uint64_t off, uint64_t len,
		  void *dst, char *err);
/* Re-checks every shard's identity; -ESTALE with a message if one changed. */
int moe_ckpt_verify(const struct moe_ckpt *c, char *err);
/* Combined identity hash of all shards (for `moed -t` and status). */
uint64_t moe_ckpt_identity_hash(const struct moe_ckpt *c);

#endif
