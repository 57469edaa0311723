/* hostrelay: per-domain mapping table (B+ tree keyed by mapping start).
 *
 * See hr_table.h for the contract.  Why a B+ tree: every operation the relay
 * needs (insert, overlap check, point lookup, straddle check, range removal)
 * is a root-to-leaf descent, and what a descent costs at 64 Ki live mappings
 * is cache misses, one per node visited.  A binary tree visits ~20 nodes
 * there; with wide nodes the same descent is 3-4 nodes whose keys sit in a
 * few adjacent cache lines, which keeps the cost at 64 Ki within a small
 * factor of the cost at 16 (the relay's performance target).
 *
 * Layout: leaves hold the mappings in parallel arrays (the start[] array is
 * what a search reads, so it is dense) and are chained in key order, so
 * "the next mapping" is usually the next slot and never a second descent.
 * Inner nodes hold separators: every start in child[i] is < key[i] <= every
 * start in child[i + 1].  Separators are only bounds, not copies of live
 * starts, so a removal never has to update them; the price is that a floor
 * search may land one leaf too far right, which the prev link fixes.
 */
#include "hr_table.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

/* 32 mappings (28 bytes each) and 64 children both make a node of about
 * 1 KiB: wide enough that 64 Ki mappings are 3 inner levels, small enough
 * that a leaf insert or removal shifts only a few cache lines. */
#define HR_LEAF_MAX 32
#define HR_LEAF_MIN (HR_LEAF_MAX / 2)
#define HR_INNER_MAX 64 /* children */
#define HR_INNER_MIN (HR_INNER_MAX / 2)
/* Inner levels: every non-root node is at least half full, so 2^64
 * mappings fit in 13; the bound is only for the path arrays. */
#define HR_MAX_DEPTH 16
/* Recycled nodes kept around (each ~1 KiB, up to 32 mappings): enough
 * that a MAP/UNMAP burst splitting and merging leaves never mallocs. */
#define HR_MAX_SPARE 256

struct hr_leaf {
	uint32_t n;
	struct hr_leaf *prev;
	struct hr_leaf *next;
	uint64_t start[HR_LEAF_MAX];
	uint64_t end[HR_LEAF_MAX];
	uint64_t phys[HR_LEAF_MAX];
	uint32_t flags[HR_LEAF_MAX];
};

struct hr_inner {
	uint32_t n; /* children; n - 1 keys */
	uint64_t key[HR_INNER_MAX - 1];
	union hr_node *child[HR_INNER_MAX];
};

/* One allocation size for both kinds, so a single free list serves both. */
union hr_node {
	struct hr_leaf leaf;
	struct hr_inner inner;
	union hr_node *spare_next;
};

struct hr_table {
	union hr_node *root; /* NULL until the first insert */
	int height;          /* inner levels above the leaves */
	uint64_t count;
	/* Recycled nodes (linked through ->spare_next). */
	union hr_node *spare;
	uint32_t nspare;
	/* Where hr_table_find_mark last found its mapping, or where the last
	 * insert put one; any other change to the tree clears it (hr_unmark),
	 * so it is either exact or NULL. */
	struct hr_leaf *mark;
	uint32_t mark_i;
};

static void hr_unmark(hr_table *t)
{
	t->mark = NULL;
}

/* The inner nodes a descent went through and the child taken in each. */
struct hr_path {
	struct hr_inner *node[HR_MAX_DEPTH];
	uint32_t idx[HR_MAX_DEPTH];
};

static union hr_node *hr_node_get(hr_table *t)
{
	union hr_node *n = t->spare;

	if (n) {
		t->spare = n->spare_next;
		t->nspare--;
		return n;
	}
	return malloc(sizeof(*n));
}

static void hr_node_put(hr_table *t, union hr_node *n)
{
	if (t->nspare >= HR_MAX_SPARE) {
		free(n);
		return;
	}
	n->spare_next = t->spare;
	t->spare = n;
	t->nspare++;
}

/* Number of keys[0..n) that are <= key (keys sorted, distinct). */
static uint32_t hr_upper(const uint64_t *keys, uint32_t n, uint64_t key)
{
	uint32_t lo = 0, hi = n;

	while (lo < hi) {
		uint32_t mid = (lo + hi) / 2;

		if (keys[mid] <= key)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo;
}

/* Number of keys[0..n) that are < key. */
static uint32_t hr_lower(const uint64_t *keys, uint32_t n, uint64_t key)
{
	uint32_t lo = 0, hi = n;

	while (lo < hi) {
		uint32_t mid = (lo + hi) / 2;

		if (keys[mid] < key)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo;
}

/* The leaf whose key range holds `key`, recording the path if asked; NULL
 * for an empty table. */
static struct hr_leaf *hr_descend(const hr_table *t, uint64_t key, struct hr_path *p)
{
	union hr_node *n = t->root;
	int d;

	if (!n)
		return NULL;
	for (d = 0; d < t->height; d++) {
		struct hr_inner *in = &n->inner;
		uint32_t i = hr_upper(in->key, in->n - 1, key);

		if (p) {
			p->node[d] = in;
			p->idx[d] = i;
		}
		n = in->child[i];
	}
	return &n->leaf;
}

/* A position in the leaf chain: slot i of leaf l (l NULL: none). */
struct hr_pos {
	const struct hr_leaf *l;
	uint32_t i;
};

/* The mapping with the greatest start <= key.  The descent's leaf holds
 * only starts >= its lower separator (<= key), so if none of them is <= key
 * the answer is the last slot of the previous leaf. */
static struct hr_pos hr_floor(const hr_table *t, uint64_t key)
{
	const struct hr_leaf *l = hr_descend(t, key, NULL);
	uint32_t i;

	if (!l)
		return (struct hr_pos){ NULL, 0 };
	i = hr_upper(l->start, l->n, key);
	if (i)
		return (struct hr_pos){ l, i - 1 };
	l = l->prev;
	return (struct hr_pos){ l, l ? l->n - 1 : 0 };
}

/* The mapping with the smallest start >= key (the next leaf, if this one
 * has none, starts above the separator, which is > key). */
static struct hr_pos hr_ceil(const hr_table *t, uint64_t key)
{
	const struct hr_leaf *l = hr_descend(t, key, NULL);
	uint32_t i;

	if (!l)
		return (struct hr_pos){ NULL, 0 };
	i = hr_lower(l->start, l->n, key);
	if (i < l->n)
		return (struct hr_pos){ l, i };
	return (struct hr_pos){ l->next, 0 };
}

/* Step to the next mapping in key order.  Non-root leaves are never empty,
 * so slot 0 of the next leaf exists. */
static struct hr_pos hr_succ(struct hr_pos p)
{
	if (++p.i < p.l->n)
		return p;
	return (struct hr_pos){ p.l->next, 0 };
}

static void hr_export(struct hr_pos p, struct hr_mapping *out)
{
	out->start = p.l->start[p.i];
	out->end = p.l->end[p.i];
	out->phys = p.l->phys[p.i];
	out->flags = p.l->flags[p.i] & ~HR_TABLE_F_NOTE;
}

/* Move n mappings from slot si of s to slot di of d (memmove: s may be d). */
static void hr_leaf_move(struct hr_leaf *d, uint32_t di, const struct hr_leaf *s, uint32_t si,
                         uint32_t n)
{
	if (!n)
		return; /* the common append at the end / removal of the last slot */
	memmove(&d->start[di], &s->start[si], n * sizeof(d->start[0]));
	memmove(&d->end[di], &s->end[si], n * sizeof(d->end[0]));
	memmove(&d->phys[di], &s->phys[si], n * sizeof(d->phys[0]));
	memmove(&d->flags[di], &s->flags[si], n * sizeof(d->flags[0]));
}

static void hr_free_nodes(union hr_node *n, int height)
{
	uint32_t i;

	if (height > 0) {
		for (i = 0; i < n->inner.n; i++)
			hr_free_nodes(n->inner.child[i], height - 1);
	}
	free(n);
}

static void hr_free_spare(hr_table *t)
{
	while (t->spare) {
		union hr_node *next = t->spare->spare_next;
		free(t->spare);
		t->spare = next;
	}
	t->nspare = 0;
}

hr_table *hr_table_new(void)
{
	return calloc(1, sizeof(struct hr_table));
}

void hr_table_free(hr_table *t)
{
	if (!t)
		return;
	hr_table_clear(t);
	free(t);
}

void hr_table_clear(hr_table *t)
{
	hr_unmark(t);
	if (t->root)
		hr_free_nodes(t->root, t->height);
	hr_free_spare(t);
	t->root = NULL;
	t->height = 0;
	t->count = 0;
}

uint64_t hr_table_count(const hr_table *t)
{
	return t->count;
}

int hr_table_overlaps(const hr_table *t, uint64_t start, uint64_t end)
{
	struct hr_pos p;

	if (start > end)
		return -EINVAL;
	/* Mappings are disjoint and sorted, so among those starting at or
	 * before `end` the last one also ends last: if it does not reach
	 * `start`, none does. */
	p = hr_floor(t, end);
	return p.l && p.l->end[p.i] >= start;
}

/* Add (key, child) right after child idx of inner node path->node[d],
 * splitting it (and on up) when full.  A split of the root grows the tree
 * by one level.  The nodes for every split were taken beforehand, so this
 * cannot fail half-way. */
static void hr_inner_insert(hr_table *t, struct hr_path *path, int d, uint64_t key,
                            union hr_node *child, union hr_node **fresh)
{
	for (; d >= 0; d--) {
		struct hr_inner *in = path->node[d];
		uint32_t at = path->idx[d] + 1; /* new child's slot */
		uint64_t keys[HR_INNER_MAX];
		union hr_node *kids[HR_INNER_MAX + 1];
		struct hr_inner *right;
		uint32_t h;

		if (in->n < HR_INNER_MAX) {
			memmove(&in->key[at], &in->key[at - 1], (in->n - at) * sizeof(in->key[0]));
			memmove(&in->child[at + 1], &in->child[at], (in->n - at) * sizeof(in->child[0]));
			in->key[at - 1] = key;
			in->child[at] = child;
			in->n++;
			return;
		}
		/* Full: lay out the MAX + 1 children in order, then cut in
		 * half; the key between the halves moves up. */
		memcpy(keys, in->key, (at - 1) * sizeof(keys[0]));
		keys[at - 1] = key;
		memcpy(&keys[at], &in->key[at - 1], (HR_INNER_MAX - at) * sizeof(keys[0]));
		memcpy(kids, in->child, at * sizeof(kids[0]));
		kids[at] = child;
		memcpy(&kids[at + 1], &in->child[at], (HR_INNER_MAX - at) * sizeof(kids[0]));
		h = (HR_INNER_MAX + 1) / 2;
		right = &(*fresh++)->inner;
		memcpy(in->key, keys, (h - 1) * sizeof(keys[0]));
		memcpy(in->child, kids, h * sizeof(kids[0]));
		in->n = h;
		memcpy(right->key, &keys[h], (HR_INNER_MAX - h) * sizeof(keys[0]));
		memcpy(right->child, &kids[h], (HR_INNER_MAX + 1 - h) * sizeof(kids[0]));
		right->n = HR_INNER_MAX + 1 - h;
		key = keys[h - 1];
		child = (union hr_node *)right;
	}
	/* The root split: a new root over the two halves. */
	{
		struct hr_inner *root = &(*fresh)->inner;

		root->n = 2;
		root->key[0] = key;
		root->child[0] = t->root;
		root->child[1] = child;
		t->root = (union hr_node *)root;
		t->height++;
	}
}

int hr_table_insert(hr_table *t, uint64_t start, uint64_t end, uint64_t phys,
                    uint32_t flags)
{
	struct hr_path path;
	struct hr_leaf *l, *r;
	union hr_node *fresh[HR_MAX_DEPTH + 2];
	uint32_t i, nfresh = 0, h;
	int d;

	if (start > end)
		return -EINVAL;
	/* No hr_unmark: a refusal changes nothing, and a success marks. */
	if (!t->root) {
		t->root = hr_node_get(t);
		if (!t->root)
			return -ENOMEM;
		l = &t->root->leaf;
		l->n = 0;
		l->prev = l->next = NULL;
	}
	l = hr_descend(t, start, &path);
	/* The new mapping's neighbours in key order are the only ones it can
	 * overlap (mappings are disjoint): slot i - 1 (or the previous leaf's
	 * last) and slot i (or the next leaf's first). */
	i = hr_lower(l->start, l->n, start);
	if (i > 0 ? l->end[i - 1] >= start : (l->prev && l->prev->end[l->prev->n - 1] >= start))
		return -EEXIST;
	if (i < l->n ? l->start[i] <= end : (l->next && l->next->start[0] <= end))
		return -EEXIST;
	if (l->n == HR_LEAF_MAX) {
		/* Take every node the split can need first (one per full
		 * level, plus a new root), so an allocation failure leaves
		 * the tree untouched. */
		nfresh = 1;
		for (d = t->height - 1; d >= 0 && path.node[d]->n == HR_INNER_MAX; d--)
			nfresh++;
		if (d < 0)
			nfresh++;
		for (h = 0; h < nfresh; h++) {
			fresh[h] = hr_node_get(t);
			if (!fresh[h]) {
				while (h--)
					hr_node_put(t, fresh[h]);
				return -ENOMEM;
			}
		}
		/* Split the leaf in half and insert into the half that
		 * covers `start`. */
		r = &fresh[0]->leaf;
		h = HR_LEAF_MAX / 2;
		hr_leaf_move(r, 0, l, h, HR_LEAF_MAX - h);
		r->n = HR_LEAF_MAX - h;
		l->n = h;
		r->next = l->next;
		r->prev = l;
		if (l->next)
			l->next->prev = r;
		l->next = r;
		hr_inner_insert(t, &path, t->height - 1, r->start[0], (union hr_node *)r, &fresh[1]);
		if (i > h) {
			l = r;
			i -= h;
		}
	}
	hr_leaf_move(l, i + 1, l, i, l->n - i);
	l->start[i] = start;
	l->end[i] = end;
	l->phys[i] = phys;
	l->flags[i] = flags;
	l->n++;
	t->count++;
	/* Marked, as hr_table_find_mark would: the relay's UNMAP of a mapping
	 * it has just made then finds it with no descent. */
	t->mark = l;
	t->mark_i = i;
	return 0;
}

/* Rebalance inner node path->node[d]'s child idx after it lost an entry and
 * may be under half full; walks up while merges leave parents short.  A
 * root left with a single child is replaced by it. */
static void hr_rebalance(hr_table *t, struct hr_path *path, int d)
{
	for (; d >= 0; d--) {
		struct hr_inner *p = path->node[d];
		uint32_t idx = path->idx[d];
		int leaves = d == t->height - 1;
		union hr_node *c = p->child[idx];
		union hr_node *ls = idx > 0 ? p->child[idx - 1] : NULL;
		union hr_node *rs = idx + 1 < p->n ? p->child[idx + 1] : NULL;
		union hr_node *left, *right; /* the pair to merge */
		uint32_t sep;                /* key index between left and right */

		if (leaves) {
			struct hr_leaf *cl = &c->leaf;

			if (cl->n >= HR_LEAF_MIN)
				return;
			/* Borrow one mapping from a sibling that can spare it;
			 * the separator becomes the new boundary start. */
			if (ls && ls->leaf.n > HR_LEAF_MIN) {
				hr_leaf_move(cl, 1, cl, 0, cl->n);
				hr_leaf_move(cl, 0, &ls->leaf, ls->leaf.n - 1, 1);
				ls->leaf.n--;
				cl->n++;
				p->key[idx - 1] = cl->start[0];
				return;
			}
			if (rs && rs->leaf.n > HR_LEAF_MIN) {
				hr_leaf_move(cl, cl->n, &rs->leaf, 0, 1);
				cl->n++;
				hr_leaf_move(&rs->leaf, 0, &rs->leaf, 1, rs->leaf.n - 1);
				rs->leaf.n--;
				p->key[idx] = rs->leaf.start[0];
				return;
			}
		} else {
			struct hr_inner *ci = &c->inner;

			if (ci->n >= HR_INNER_MIN)
				return;
			/* Rotate one child through the parent's separator. */
			if (ls && ls->inner.n > HR_INNER_MIN) {
				struct hr_inner *li = &ls->inner;

				memmove(&ci->key[1], &ci->key[0], (ci->n - 1) * sizeof(ci->key[0]));
				memmove(&ci->child[1], &ci->child[0], ci->n * sizeof(ci->child[0]));
				ci->key[0] = p->key[idx - 1];
				ci->child[0] = li->child[li->n - 1];
				ci->n++;
				p->key[idx - 1] = li->key[li->n - 2];
				li->n--;
				return;
			}
			if (rs && rs->inner.n > HR_INNER_MIN) {
				struct hr_inner *ri = &rs->inner;

				ci->key[ci->n - 1] = p->key[idx];
				ci->child[ci->n] = ri->child[0];
				ci->n++;
				p->key[idx] = ri->key[0];
				memmove(&ri->key[0], &ri->key[1], (ri->n - 2) * sizeof(ri->key[0]));
				memmove(&ri->child[0], &ri->child[1], (ri->n - 1) * sizeof(ri->child[0]));
				ri->n--;
				return;
			}
		}
		/* Neither sibling can spare one: merge with one of them (both
		 * at the minimum, so the pair fits in one node). */
		if (ls) {
			left = ls;
			right = c;
			sep = idx - 1;
		} else if (rs) {
			left = c;
			right = rs;
			sep = idx;
		} else {
			return; /* only child: p is the root, handled below */
		}
		if (leaves) {
			struct hr_leaf *ll = &left->leaf, *rl = &right->leaf;

			hr_leaf_move(ll, ll->n, rl, 0, rl->n);
			ll->n += rl->n;
			ll->next = rl->next;
			if (rl->next)
				rl->next->prev = ll;
		} else {
			struct hr_inner *li = &left->inner, *ri = &right->inner;

			li->key[li->n - 1] = p->key[sep];
			memcpy(&li->key[li->n], ri->key, (ri->n - 1) * sizeof(ri->key[0]));
			memcpy(&li->child[li->n], ri->child, ri->n * sizeof(ri->child[0]));
			li->n += ri->n;
		}
		hr_node_put(t, right);
		/* Drop separator sep and child sep + 1 (the right one). */
		memmove(&p->key[sep], &p->key[sep + 1], (p->n - 2 - sep) * sizeof(p->key[0]));
		memmove(&p->child[sep + 1], &p->child[sep + 2], (p->n - 2 - sep) * sizeof(p->child[0]));
		p->n--;
	}
	if (t->height > 0 && t->root->inner.n == 1) {
		union hr_node *old = t->root;

		t->root = old->inner.child[0];
		t->height--;
		hr_node_put(t, old);
	}
}

/* Remove slot i of leaf l, reached through path. */
static void hr_remove_at(hr_table *t, struct hr_path *path, struct hr_leaf *l, uint32_t i)
{
	hr_unmark(t);
	hr_leaf_move(l, i, l, i + 1, l->n - i - 1);
	l->n--;
	t->count--;
	if (t->height > 0 && l->n < HR_LEAF_MIN)
		hr_rebalance(t, path, t->height - 1);
}

int hr_table_lookup(const hr_table *t, uint64_t addr, struct hr_mapping *out)
{
	struct hr_pos p = hr_floor(t, addr);

	if (!p.l || p.l->end[p.i] < addr)
		return 0;
	hr_export(p, out);
	return 1;
}

int hr_table_next(const hr_table *t, uint64_t from, struct hr_mapping *out)
{
	struct hr_pos p = hr_ceil(t, from);

	if (!p.l)
		return 0;
	hr_export(p, out);
	return 1;
}

size_t hr_table_dump(const hr_table *t, uint64_t from, struct hr_mapping *out,
                     size_t cap)
{
	size_t i = 0;
	struct hr_pos p;

	if (!cap)
		return 0;
	/* One descent, then along the leaf chain. */
	for (p = hr_ceil(t, from); p.l && i < cap; p = hr_succ(p))
		hr_export(p, &out[i++]);
	return i;
}

/* 1 if a mapping intersecting [start, end] sticks out of it (the UNMAP would
 * split it).  Only the mapping holding `start` and the one holding `end` can
 * stick out; every mapping strictly between them is covered. */
static int hr_straddles(const hr_table *t, uint64_t start, uint64_t end)
{
	struct hr_pos lo = hr_floor(t, start);
	struct hr_pos hi;

	if (lo.l && lo.l->start[lo.i] < start && lo.l->end[lo.i] >= start)
		return 1;
	hi = hr_floor(t, end);
	/* hi's start <= end; it intersects the range iff its end >= start,
	 * and since end >= start, an end > `end` implies both. */
	if (hi.l && hi.l->end[hi.i] > end)
		return 1;
	return 0;
}

int64_t hr_table_check_range(const hr_table *t, uint64_t start, uint64_t end)
{
	struct hr_pos p;
	int64_t covered = 0;

	if (start > end)
		return -EINVAL;
	if (hr_straddles(t, start, end))
		return -ERANGE;
	for (p = hr_ceil(t, start); p.l && p.l->start[p.i] <= end; p = hr_succ(p))
		covered++;
	return covered;
}

int64_t hr_table_remove_range(hr_table *t, uint64_t start, uint64_t end)
{
	struct hr_path path;
	struct hr_leaf *l;
	int64_t count = 0;
	uint32_t i;

	if (start > end)
		return -EINVAL;
	/* The common UNMAP names exactly one mapping: if the first mapping at
	 * or after `start` is exactly [start, end], nothing else can intersect
	 * the range, so it goes in the one descent that found it. */
	l = hr_descend(t, start, &path);
	if (l) {
		i = hr_lower(l->start, l->n, start);
		if (i < l->n && l->start[i] == start && l->end[i] == end) {
			hr_remove_at(t, &path, l, i);
			return 1;
		}
	}
	/* Check everything before touching anything: D-32 says a straddled
	 * mapping fails the whole request with nothing removed. */
	if (hr_straddles(t, start, end))
		return -ERANGE;
	/* One descent per removed mapping: a merge below may move the next
	 * one to another leaf, so the path is taken afresh each time.  The
	 * descent for `start` lands on the leaf holding the first covered
	 * mapping, or on the one before it (then it is the next leaf's
	 * first: descend again for that start). */
	while ((l = hr_descend(t, start, &path))) {
		uint64_t n_end;

		i = hr_lower(l->start, l->n, start);
		if (i == l->n) {
			if (!l->next || l->next->start[0] > end)
				break;
			start = l->next->start[0];
			continue;
		}
		if (l->start[i] > end)
			break;
		n_end = l->end[i];
		hr_remove_at(t, &path, l, i);
		count++;
		/* Covered mappings end inside the range; one ending at `end`
		 * is the last, which saves a descent in the common exact UNMAP. */
		if (n_end >= end)
			break;
		start = n_end + 1;
	}
	return count;
}

/* The common UNMAP names exactly one mapping: find it in one descent (its
 * start is a live key, so it is in the descent's leaf, never a neighbour).
 * Then no other mapping can intersect [start, end] (they are disjoint).
 * The leaf and *i of the mapping exactly [start, end], or NULL. */
static struct hr_leaf *hr_exact(const hr_table *t, uint64_t start, uint64_t end, uint32_t *i)
{
	const struct hr_leaf *l = hr_descend(t, start, NULL);

	if (!l)
		return NULL;
	*i = hr_lower(l->start, l->n, start);
	if (*i == l->n || l->start[*i] != start || l->end[*i] != end)
		return NULL;
	return (struct hr_leaf *)l;
}

int hr_table_find_exact(const hr_table *t, uint64_t start, uint64_t end, struct hr_mapping *out)
{
	uint32_t i = 0;
	const struct hr_leaf *l = hr_exact(t, start, end, &i);

	if (l && out)
		hr_export((struct hr_pos){ l, i }, out);
	return l != NULL;
}

/* Mark the mapping that is exactly [start, end] and return its leaf (its
 * slot in t->mark_i), or clear the mark and return NULL. */
static struct hr_leaf *hr_mark(hr_table *t, uint64_t start, uint64_t end)
{
	uint32_t i = t->mark_i;
	struct hr_leaf *l = t->mark;

	/* Already marked (a mark is exact: any change clears or moves it). */
	if (!l || l->start[i] != start || l->end[i] != end)
		l = hr_exact(t, start, end, &i);
	t->mark = l;
	t->mark_i = i;
	return l;
}

int hr_table_find_mark(hr_table *t, uint64_t start, uint64_t end, struct hr_mapping *out)
{
	struct hr_leaf *l = hr_mark(t, start, end);

	if (l && out)
		hr_export((struct hr_pos){ l, t->mark_i }, out);
	return l != NULL;
}

int64_t hr_table_mark_flags(hr_table *t, uint64_t start, uint64_t end)
{
	struct hr_leaf *l = hr_mark(t, start, end);

	return l ? (int64_t)l->flags[t->mark_i] : -1;
}

int hr_table_remove_marked(hr_table *t)
{
	struct hr_leaf *l = t->mark;

	if (t->height && l->n <= HR_LEAF_MIN)
		return hr_table_remove_exact(t, l->start[t->mark_i], l->end[t->mark_i]);
	hr_unmark(t);
	hr_leaf_move(l, t->mark_i, l, t->mark_i + 1, l->n - t->mark_i - 1);
	l->n--;
	t->count--;
	return 1;
}

int hr_table_remove_exact(hr_table *t, uint64_t start, uint64_t end)
{
	struct hr_path path;
	struct hr_leaf *l = t->mark;
	uint32_t i = t->mark_i;

	/* Marked by hr_table_find_mark and nothing changed since: remove it
	 * there, unless the leaf would fall under half full (the rebalance
	 * needs the path, so that case takes the descent below). */
	if (l && l->start[i] == start && l->end[i] == end && (t->height == 0 || l->n > HR_LEAF_MIN)) {
		hr_unmark(t);
		hr_leaf_move(l, i, l, i + 1, l->n - i - 1);
		l->n--;
		t->count--;
		return 1;
	}
	l = hr_descend(t, start, &path);

	/* One descent: the common UNMAP names exactly one mapping. */
	if (!l)
		return 0;
	i = hr_lower(l->start, l->n, start);
	if (i == l->n || l->start[i] != start || l->end[i] != end)
		return 0;
	hr_remove_at(t, &path, l, i);
	return 1;
}

int hr_table_translate(const hr_table *t, uint64_t iova, uint64_t size,
                       uint32_t need, uint64_t *gpa, uint64_t *fault_addr)
{
	struct hr_pos p;
	uint64_t last;

	if (size == 0 || iova > UINT64_MAX - (size - 1))
		return -EINVAL;
	last = iova + (size - 1);
	p = hr_floor(t, iova);
	if (!p.l || p.l->end[p.i] < iova) {
		*fault_addr = iova;
		return -ENOENT;
	}
	if ((p.l->flags[p.i] & need) != need) {
		*fault_addr = iova;
		return -EACCES;
	}
	*gpa = p.l->phys[p.i] + (iova - p.l->start[p.i]);
	/* Walk on while the span extends past this mapping: the next mapping
	 * must start right after it (no IOVA hole) and continue its GPA range
	 * (a GPA jump cannot be returned as one address). */
	while (last > p.l->end[p.i]) {
		uint64_t next_iova = p.l->end[p.i] + 1; /* end < last: no wrap */
		uint64_t next_phys = p.l->phys[p.i] + (p.l->end[p.i] - p.l->start[p.i]) + 1;

		p = hr_succ(p);
		if (!p.l || p.l->start[p.i] != next_iova) {
			*fault_addr = next_iova;
			return -ENOENT;
		}
		if ((p.l->flags[p.i] & need) != need) {
			*fault_addr = next_iova;
			return -EACCES;
		}
		if (p.l->phys[p.i] != next_phys) {
			*fault_addr = next_iova;
			return -EXDEV;
		}
	}
	return 0;
}
