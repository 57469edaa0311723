/* hostrelay: per-domain mapping table (AVL tree keyed by mapping start).
 *
 * See hr_table.h for the contract.  Why AVL: every operation the relay needs
 * (insert, overlap check, point lookup, straddle check, range removal) is a
 * root-to-leaf descent, and AVL's height bound (< 1.45 log2 n) keeps the cost
 * at 64 Ki live mappings within a few node visits of the cost at 16, which
 * is the relay's performance target.  Recursion depth is bounded by that
 * height (< 100 even for 2^64 nodes), so recursion is safe here.
 */
#include "hr_table.h"

#include <errno.h>
#include <stdlib.h>

struct hr_node {
	struct hr_node *left;
	struct hr_node *right;
	uint64_t start;
	uint64_t end;
	uint64_t phys;
	uint32_t flags;
	int height;
};

struct hr_table {
	struct hr_node *root;
	uint64_t count;
	/* Recycled nodes (linked through ->left): a MAP/UNMAP burst reuses
	 * them instead of going through malloc/free for every request. */
	struct hr_node *spare;
	uint32_t nspare;
};

#define HR_MAX_SPARE 4096

static struct hr_node *hr_node_get(hr_table *t)
{
	struct hr_node *n = t->spare;

	if (n) {
		t->spare = n->left;
		t->nspare--;
		return n;
	}
	return malloc(sizeof(*n));
}

static void hr_node_put(hr_table *t, struct hr_node *n)
{
	if (t->nspare >= HR_MAX_SPARE) {
		free(n);
		return;
	}
	n->left = t->spare;
	t->spare = n;
	t->nspare++;
}

static int hr_height(const struct hr_node *n)
{
	return n ? n->height : 0;
}

static void hr_fix_height(struct hr_node *n)
{
	int hl = hr_height(n->left), hr = hr_height(n->right);
	n->height = 1 + (hl > hr ? hl : hr);
}

static struct hr_node *hr_rotate_right(struct hr_node *y)
{
	struct hr_node *x = y->left;
	y->left = x->right;
	x->right = y;
	hr_fix_height(y);
	hr_fix_height(x);
	return x;
}

static struct hr_node *hr_rotate_left(struct hr_node *x)
{
	struct hr_node *y = x->right;
	x->right = y->left;
	y->left = x;
	hr_fix_height(x);
	hr_fix_height(y);
	return y;
}

/* Restore the AVL invariant at n after one of its subtrees changed height by
 * at most one. */
static struct hr_node *hr_balance(struct hr_node *n)
{
	int bf;

	hr_fix_height(n);
	bf = hr_height(n->left) - hr_height(n->right);
	if (bf > 1) {
		if (hr_height(n->left->left) < hr_height(n->left->right))
			n->left = hr_rotate_left(n->left);
		return hr_rotate_right(n);
	}
	if (bf < -1) {
		if (hr_height(n->right->right) < hr_height(n->right->left))
			n->right = hr_rotate_right(n->right);
		return hr_rotate_left(n);
	}
	return n;
}

/* Insert nn unless it overlaps a mapping, in one descent: the nodes where
 * the path turned right and left last are nn's neighbours in key order, the
 * only ones it can overlap (mappings are disjoint).  On overlap nothing on
 * the path was changed, so the way back up is a no-op. */
static struct hr_node *hr_insert_node(struct hr_node *root, struct hr_node *nn,
                                      const struct hr_node *pred, const struct hr_node *succ,
                                      int *overlap)
{
	if (!root) {
		if ((pred && pred->end >= nn->start) || (succ && succ->start <= nn->end)) {
			*overlap = 1;
			return NULL;
		}
		return nn;
	}
	if (nn->start == root->start) {
		*overlap = 1;
		return root;
	}
	if (nn->start < root->start)
		root->left = hr_insert_node(root->left, nn, pred, root, overlap);
	else
		root->right = hr_insert_node(root->right, nn, root, succ, overlap);
	return *overlap ? root : hr_balance(root);
}

static struct hr_node *hr_remove_min(struct hr_node *n, struct hr_node **min)
{
	if (!n->left) {
		*min = n;
		return n->right;
	}
	n->left = hr_remove_min(n->left, min);
	return hr_balance(n);
}

/* Unlink the node whose start == key (it must exist) and return it in
 * *removed; the node itself is not freed here. */
static struct hr_node *hr_remove_key(struct hr_node *n, uint64_t key,
                                     struct hr_node **removed)
{
	struct hr_node *l, *r, *m;

	if (!n)
		return NULL;
	if (key < n->start) {
		n->left = hr_remove_key(n->left, key, removed);
	} else if (key > n->start) {
		n->right = hr_remove_key(n->right, key, removed);
	} else {
		*removed = n;
		l = n->left;
		r = n->right;
		if (!r)
			return l;
		r = hr_remove_min(r, &m);
		m->left = l;
		m->right = r;
		return hr_balance(m);
	}
	return hr_balance(n);
}

/* The mapping with the greatest start <= key, or NULL. */
static const struct hr_node *hr_floor(const struct hr_node *n, uint64_t key)
{
	const struct hr_node *best = NULL;

	while (n) {
		if (n->start <= key) {
			best = n;
			n = n->right;
		} else {
			n = n->left;
		}
	}
	return best;
}

/* The mapping with the smallest start >= key, or NULL. */
static const struct hr_node *hr_ceil(const struct hr_node *n, uint64_t key)
{
	const struct hr_node *best = NULL;

	while (n) {
		if (n->start >= key) {
			best = n;
			n = n->left;
		} else {
			n = n->right;
		}
	}
	return best;
}

static void hr_free_nodes(struct hr_node *n)
{
	while (n) {
		struct hr_node *right = n->right;
		hr_free_nodes(n->left);
		free(n);
		n = right;
	}
}

static void hr_free_spare(hr_table *t)
{
	while (t->spare) {
		struct hr_node *next = t->spare->left;
		free(t->spare);
		t->spare = next;
	}
	t->nspare = 0;
}

static void hr_export(const struct hr_node *n, struct hr_mapping *out)
{
	out->start = n->start;
	out->end = n->end;
	out->phys = n->phys;
	out->flags = n->flags;
}

hr_table *hr_table_new(void)
{
	return calloc(1, sizeof(struct hr_table));
}

void hr_table_free(hr_table *t)
{
	if (!t)
		return;
	hr_free_nodes(t->root);
	hr_free_spare(t);
	free(t);
}

void hr_table_clear(hr_table *t)
{
	hr_free_nodes(t->root);
	hr_free_spare(t);
	t->root = NULL;
	t->count = 0;
}

uint64_t hr_table_count(const hr_table *t)
{
	return t->count;
}

int hr_table_overlaps(const hr_table *t, uint64_t start, uint64_t end)
{
	const struct hr_node *n;

	if (start > end)
		return -EINVAL;
	/* Mappings are disjoint and sorted, so among those starting at or
	 * before `end` the last one also ends last: if it does not reach
	 * `start`, none does. */
	n = hr_floor(t->root, end);
	return n && n->end >= start;
}

int hr_table_insert(hr_table *t, uint64_t start, uint64_t end, uint64_t phys,
                    uint32_t flags)
{
	struct hr_node *nn;
	int overlap = 0;

	if (start > end)
		return -EINVAL;
	nn = hr_node_get(t);
	if (!nn)
		return -ENOMEM;
	nn->left = nn->right = NULL;
	nn->start = start;
	nn->end = end;
	nn->phys = phys;
	nn->flags = flags;
	nn->height = 1;
	t->root = hr_insert_node(t->root, nn, NULL, NULL, &overlap);
	if (overlap) {
		hr_node_put(t, nn);
		return -EEXIST;
	}
	t->count++;
	return 0;
}

int hr_table_lookup(const hr_table *t, uint64_t addr, struct hr_mapping *out)
{
	const struct hr_node *n = hr_floor(t->root, addr);

	if (!n || n->end < addr)
		return 0;
	hr_export(n, out);
	return 1;
}

int hr_table_next(const hr_table *t, uint64_t from, struct hr_mapping *out)
{
	const struct hr_node *n = hr_ceil(t->root, from);

	if (!n)
		return 0;
	hr_export(n, out);
	return 1;
}

size_t hr_table_dump(const hr_table *t, uint64_t from, struct hr_mapping *out,
                     size_t cap)
{
	size_t i = 0;
	const struct hr_node *n;

	while (i < cap) {
		n = hr_ceil(t->root, from);
		if (!n)
			break;
		hr_export(n, &out[i++]);
		if (n->end == UINT64_MAX)
			break; /* the next `from` would wrap to 0 */
		from = n->end + 1;
	}
	return i;
}

/* 1 if a mapping intersecting [start, end] sticks out of it (the UNMAP would
 * split it).  Only the mapping holding `start` and the one holding `end` can
 * stick out; every mapping strictly between them is covered. */
static int hr_straddles(const hr_table *t, uint64_t start, uint64_t end)
{
	const struct hr_node *lo = hr_floor(t->root, start);
	const struct hr_node *hi = hr_floor(t->root, end);

	if (lo && lo->start < start && lo->end >= start)
		return 1;
	/* hi->start <= end; it intersects the range iff hi->end >= start, and
	 * since end >= start, hi->end > end implies both. */
	if (hi && hi->end > end)
		return 1;
	return 0;
}

int64_t hr_table_check_range(const hr_table *t, uint64_t start, uint64_t end)
{
	const struct hr_node *n;
	int64_t covered = 0;
	uint64_t from = start;

	if (start > end)
		return -EINVAL;
	if (hr_straddles(t, start, end))
		return -ERANGE;
	while ((n = hr_ceil(t->root, from)) && n->start <= end) {
		covered++;
		if (n->end == UINT64_MAX)
			break;
		from = n->end + 1;
	}
	return covered;
}

int64_t hr_table_remove_range(hr_table *t, uint64_t start, uint64_t end)
{
	const struct hr_node *n;
	struct hr_node *removed;
	int64_t count = 0;

	if (start > end)
		return -EINVAL;
	/* Check everything before touching anything: D-32 says a straddled
	 * mapping fails the whole request with nothing removed. */
	if (hr_straddles(t, start, end))
		return -ERANGE;
	while ((n = hr_ceil(t->root, start)) && n->start <= end) {
		uint64_t n_end = n->end;

		removed = NULL;
		t->root = hr_remove_key(t->root, n->start, &removed);
		hr_node_put(t, removed);
		t->count--;
		count++;
		/* Covered mappings end inside the range; one ending at `end`
		 * is the last, which saves a descent in the common exact UNMAP. */
		if (n_end >= end)
			break;
		start = n_end + 1;
	}
	return count;
}

/* The common UNMAP names exactly one mapping: find it in one descent.
 * Then no other mapping can intersect [start, end] (they are disjoint). */
int hr_table_find_exact(const hr_table *t, uint64_t start, uint64_t end, struct hr_mapping *out)
{
	const struct hr_node *n = t->root;

	while (n && n->start != start)
		n = start < n->start ? n->left : n->right;
	if (!n || n->end != end)
		return 0;
	if (out)
		hr_export(n, out);
	return 1;
}

/* Like hr_remove_key, but only if the node with start == key ends at `end`;
 * a miss leaves the path untouched (no rebalancing on the way back up). */
static struct hr_node *hr_remove_exact_node(struct hr_node *n, uint64_t key, uint64_t end,
                                            struct hr_node **removed)
{
	struct hr_node *l, *r, *m;

	if (!n)
		return NULL;
	if (key != n->start) {
		if (key < n->start)
			n->left = hr_remove_exact_node(n->left, key, end, removed);
		else
			n->right = hr_remove_exact_node(n->right, key, end, removed);
		return *removed ? hr_balance(n) : n;
	}
	if (n->end != end)
		return n;
	*removed = n;
	l = n->left;
	r = n->right;
	if (!r)
		return l;
	r = hr_remove_min(r, &m);
	m->left = l;
	m->right = r;
	return hr_balance(m);
}

int hr_table_remove_exact(hr_table *t, uint64_t start, uint64_t end)
{
	struct hr_node *removed = NULL;

	/* One descent: the common UNMAP names exactly one mapping. */
	t->root = hr_remove_exact_node(t->root, start, end, &removed);
	if (!removed)
		return 0;
	hr_node_put(t, removed);
	t->count--;
	return 1;
}

int hr_table_translate(const hr_table *t, uint64_t iova, uint64_t size,
                       uint32_t need, uint64_t *gpa, uint64_t *fault_addr)
{
	const struct hr_node *n;
	uint64_t last, next_phys;

	if (size == 0 || iova > UINT64_MAX - (size - 1))
		return -EINVAL;
	last = iova + (size - 1);
	n = hr_floor(t->root, iova);
	if (!n || n->end < iova) {
		*fault_addr = iova;
		return -ENOENT;
	}
	if ((n->flags & need) != need) {
		*fault_addr = iova;
		return -EACCES;
	}
	*gpa = n->phys + (iova - n->start);
	/* Walk on while the span extends past this mapping: the next mapping
	 * must start right after it (no IOVA hole) and continue its GPA range
	 * (a GPA jump cannot be returned as one address). */
	while (last > n->end) {
		uint64_t next_iova = n->end + 1; /* n->end < last: no wrap */
		next_phys = n->phys + (n->end - n->start) + 1;
		n = hr_floor(t->root, next_iova);
		if (!n || n->start != next_iova) {
			*fault_addr = next_iova;
			return -ENOENT;
		}
		if ((n->flags & need) != need) {
			*fault_addr = next_iova;
			return -EACCES;
		}
		if (n->phys != next_phys) {
			*fault_addr = next_iova;
			return -EXDEV;
		}
	}
	return 0;
}
