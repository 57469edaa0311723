/* hostrelay: the relay handle (see hr_relay.h).
 *
 * Its configuration, the registry of the domains Python mirrors into it,
 * the accounting of what its containers hold, and the statistics read from
 * all that: the state MAP/UNMAP work on, which the control plane sets up
 * and reads.  Apart from the request path (the other files hr_relay_int.h
 * lists) so that neither has to be read to follow the other.  Spec
 * references are to OASIS virtio v1.2+ §5.13; kernel behaviour is that of
 * vfio_iommu_type1 (type1v2) as of Linux 6.12.
 */
#include "hr_relay_int.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

/* The one errno -> status table (hostrelay.dataplane.handle.status_for
 * uses it for an OSError).
 * Follows the Linux guest driver's reverse mapping (viommu_get_req_errno)
 * so the guest sees the errno the host saw where one exists. */
int hr_status_for_errno(int err)
{
	switch (err) {
	case EINVAL:
	case EEXIST: /* type1's overlap */
		return HR_S_INVAL;
	case ERANGE:
		return HR_S_RANGE;
	case ENOENT:
	case ENODEV:
		return HR_S_NOENT;
	case EFAULT:
		return HR_S_FAULT;
	case ENOMEM: /* RLIMIT_MEMLOCK */
	case ENOSPC: /* dma_entry_limit */
		return HR_S_NOMEM;
	case ENOSYS:
	case EOPNOTSUPP:
	case EBUSY:
		return HR_S_UNSUPP;
	default:
		return HR_S_DEVERR;
	}
}

/* --------------------------------------------------------- configuration */

static void domain_changed(const hr_relay *r, struct hr_domain *d);

hr_relay *hr_relay_new(void)
{
	hr_relay *r = calloc(1, sizeof(*r));

	if (!r)
		return NULL;
	if (pthread_mutex_init(&r->lock, NULL)) {
		free(r);
		return NULL;
	}
	r->ghot = &r->mem.r[0]; /* size 0 until memory is set */
	r->granule = 4096;
	r->input_end = UINT64_MAX;
	r->domain_end = UINT32_MAX;
	r->map_flags_mask = HR_MAP_F_READ | HR_MAP_F_WRITE | HR_MAP_F_MMIO;
	r->memlock_limit = UINT64_MAX;
	return r;
}

void hr_relay_free(hr_relay *r)
{
	if (!r)
		return;
	for (uint32_t i = 0; i < r->ndom; i++) {
		free(r->dom[i].resv);
		free(r->dom[i].cont);
	}
	free(r->dom);
	free(r->dirty);
	free(r->dirty_bits);
	pthread_mutex_destroy(&r->lock);
	free(r);
}

void hr_relay_lock(hr_relay *r)
{
	pthread_mutex_lock(&r->lock);
}

void hr_relay_unlock(hr_relay *r)
{
	pthread_mutex_unlock(&r->lock);
}

int hr_relay_set_memory(hr_relay *r, const struct hr_gmem_region *regions, uint32_t n)
{
	int rc = hr_gmem_set(&r->mem, regions, n);

	/* The slots past n hold no region (size 0), so hr_piece's hint needs
	 * no bound check. */
	if (rc == 0)
		memset(&r->mem.r[n], 0, (HR_GMEM_MAX_REGIONS - n) * sizeof(r->mem.r[0]));
	return rc;
}

const struct hr_gmem *hr_relay_memory(const hr_relay *r)
{
	return &r->mem;
}

void hr_relay_configure(hr_relay *r, uint64_t granule, uint64_t input_start, uint64_t input_end,
			uint32_t domain_start, uint32_t domain_end, uint32_t map_flags_mask,
			uint64_t max_mappings, uint64_t max_writable)
{
	/* The granule is page_size_mask's lowest set bit (§5.13.4), a power of
	 * two, so alignment is a mask test (divisions are slow under TCG). */
	r->granule = granule & -granule;
	if (!r->granule)
		r->granule = 1;
	r->input_start = input_start;
	r->input_end = input_end;
	r->domain_start = domain_start;
	r->domain_end = domain_end;
	r->map_flags_mask = map_flags_mask;
	r->max_mappings = max_mappings;
	r->max_writable = max_writable;
	for (uint32_t i = 0; i < r->ndom; i++)
		domain_changed(r, &r->dom[i]);
}

void hr_relay_set_memlock(hr_relay *r, uint64_t limit, uint64_t baseline)
{
	r->memlock_limit = limit;
	r->memlock_baseline = baseline;
}

uint64_t hr_relay_charged(const hr_relay *r)
{
	return r->charged;
}

/* -------------------------------------------------------- domain registry */

/* After any change to what d->plain sums up (the domain range is the
 * configuration's: hr_relay_configure redoes every domain). */
static void domain_changed(const hr_relay *r, struct hr_domain *d)
{
	d->plain = !d->bypass && !d->custom && d->ncont == 1 && d->id >= r->domain_start &&
		   d->id <= r->domain_end;
}

struct hr_domain *hr_find(const hr_relay *r, uint32_t id, uint32_t *pos)
{
	uint32_t lo = 0, hi = r->ndom;

	while (lo < hi) {
		uint32_t mid = (lo + hi) / 2;
		if (r->dom[mid].id < id)
			lo = mid + 1;
		else
			hi = mid;
	}
	if (pos)
		*pos = lo;
	return lo < r->ndom && r->dom[lo].id == id ? &r->dom[lo] : NULL;
}

int hr_relay_domain_add(hr_relay *r, uint32_t id, hr_table *table, int bypass)
{
	uint32_t pos;

	if (hr_find(r, id, &pos))
		return -EEXIST;
	if (r->ndom == r->capdom) {
		uint32_t cap = r->capdom ? 2 * r->capdom : 16;
		struct hr_domain *d = realloc(r->dom, cap * sizeof(*d));
		if (!d)
			return -ENOMEM;
		r->dom = d;
		r->capdom = cap;
	}
	r->hot = NULL; /* r->dom moves */
	memmove(&r->dom[pos + 1], &r->dom[pos], (r->ndom - pos) * sizeof(*r->dom));
	r->dom[pos] = (struct hr_domain){ .id = id, .bypass = !!bypass, .table = table };
	domain_changed(r, &r->dom[pos]);
	r->ndom++;
	return 0;
}

int hr_relay_domain_remove(hr_relay *r, uint32_t id)
{
	uint32_t pos;
	struct hr_domain *d = hr_find(r, id, &pos);

	if (!d)
		return -ENOENT;
	free(d->resv);
	free(d->cont);
	r->hot = NULL; /* r->dom moves */
	memmove(&r->dom[pos], &r->dom[pos + 1], (r->ndom - pos - 1) * sizeof(*r->dom));
	r->ndom--;
	return 0;
}

int hr_relay_domain_set_resv(hr_relay *r, uint32_t id, const uint64_t *pairs, uint32_t n)
{
	struct hr_domain *d = hr_find(r, id, NULL);
	uint64_t (*resv)[2] = NULL;

	if (!d)
		return -ENOENT;
	if (n) {
		resv = malloc(n * sizeof(*resv));
		if (!resv)
			return -ENOMEM;
		memcpy(resv, pairs, n * sizeof(*resv));
	}
	free(d->resv);
	d->resv = resv;
	d->nresv = n;
	return 0;
}

int hr_relay_domain_set_custom(hr_relay *r, uint32_t id, int custom)
{
	struct hr_domain *d = hr_find(r, id, NULL);

	if (!d)
		return -ENOENT;
	d->custom = !!custom;
	domain_changed(r, d);
	return 0;
}

int hr_relay_domain_set_containers(hr_relay *r, uint32_t id, struct hr_container *const *c, uint32_t n)
{
	struct hr_domain *d = hr_find(r, id, NULL);
	struct hr_container **cont = NULL;

	if (!d)
		return -ENOENT;
	if (n) {
		cont = malloc(n * sizeof(*cont));
		if (!cont)
			return -ENOMEM;
		memcpy(cont, c, n * sizeof(*cont));
	}
	free(d->cont);
	d->cont = cont;
	d->ncont = n;
	domain_changed(r, d);
	return 0;
}

/* ------------------------------------------------------------ accounting */

void hr_account_map(hr_relay *r, struct hr_container *c, uint64_t pieces, uint64_t bytes)
{
	c->avail -= (uint32_t)pieces;
	c->entries += pieces;
	c->charged += bytes;
	r->charged += bytes;
}

void hr_account_unmap(hr_relay *r, struct hr_container *c, uint64_t pieces, uint64_t bytes)
{
	c->avail += (uint32_t)pieces;
	c->entries -= pieces;
	c->charged -= bytes;
	r->charged -= bytes;
}

void hr_relay_account(hr_relay *r, struct hr_container *c, int64_t pieces, int64_t bytes)
{
	/* For mappings the control plane makes itself (ATTACH replay, DETACH,
	 * bypass identity maps), so one set of counters holds everything. */
	if (pieces >= 0)
		hr_account_map(r, c, (uint64_t)pieces, (uint64_t)bytes);
	else
		hr_account_unmap(r, c, (uint64_t)-pieces, (uint64_t)-bytes);
}

/* ------------------------------------------------------------- statistics */

struct range {
	uint64_t start, last;
};

static int cmp_range(const void *a, const void *b)
{
	const struct range *x = a, *y = b;
	return x->start < y->start ? -1 : x->start > y->start;
}

/* Guest bytes pinned at least once (each page counted once however many
 * IOVAs or containers map it) by one domain (domain >= 0), by all of them
 * (-1) or by none (-2: only the extra ranges), together with `nextra` more inclusive [start, end] GPA ranges (the
 * bypass identity maps, which belong to no domain).  *mapped gets the plain
 * sum of the domains' mapping sizes, what type1 pins per container. */
uint64_t hr_relay_pinned(const hr_relay *r, int64_t domain, const uint64_t *extra, uint32_t nextra,
			 uint64_t *mapped)
{
	uint64_t n = nextra, total = 0, sum = 0;

	for (uint32_t i = 0; i < r->ndom; i++)
		if ((domain == -1 || (domain >= 0 && r->dom[i].id == (uint64_t)domain)) && r->dom[i].ncont)
			n += hr_table_count(r->dom[i].table);
	if (mapped)
		*mapped = 0;
	if (!n)
		return 0;
	struct range *v = malloc(n * sizeof(*v));
	if (!v)
		return UINT64_MAX;
	uint64_t k = 0;
	for (uint32_t i = 0; i < nextra; i++)
		v[k++] = (struct range){ extra[2 * i], extra[2 * i + 1] };
	for (uint32_t i = 0; i < r->ndom; i++) {
		const struct hr_domain *d = &r->dom[i];
		if (!(domain == -1 || (domain >= 0 && d->id == (uint64_t)domain)) || !d->ncont)
			continue;
		struct hr_mapping m;
		uint64_t from = 0;
		while (k < n && hr_table_next(d->table, from, &m)) {
			if (hr_in_containers(m.flags)) {
				v[k++] = (struct range){ m.phys, m.phys + (m.end - m.start) };
				sum += m.end - m.start + 1;
			}
			if (m.end == UINT64_MAX)
				break;
			from = m.end + 1;
		}
	}
	qsort(v, k, sizeof(*v), cmp_range);
	for (uint64_t i = 0, cur_s = 0, cur_l = 0, open = 0; i <= k; i++) {
		if (i < k && open && v[i].start <= cur_l + 1 && cur_l != UINT64_MAX) {
			if (v[i].last > cur_l)
				cur_l = v[i].last;
			continue;
		}
		if (open)
			total += cur_l - cur_s + 1;
		if (i < k) {
			cur_s = v[i].start;
			cur_l = v[i].last;
			open = 1;
		}
	}
	free(v);
	if (mapped)
		*mapped = sum;
	return total;
}

void hr_relay_dirty_set(hr_relay *r, int on)
{
	r->dirty_on = !!on;
	r->ndirty = 0;
	r->dirty_lost = 0;
	if (!on) {
		free(r->dirty);
		free(r->dirty_bits);
		r->dirty = NULL;
		r->dirty_bits = NULL;
		r->capdirty = r->capbits = 0;
	}
}

uint64_t hr_relay_dirty_take(hr_relay *r, struct hr_dirty_range *out, uint64_t cap, uint32_t *lost)
{
	uint64_t n = r->ndirty < cap ? r->ndirty : cap;

	if (n)
		memcpy(out, r->dirty, n * sizeof(*out));
	if (r->ndirty > n)
		memmove(r->dirty, r->dirty + n, (r->ndirty - n) * sizeof(*out));
	r->ndirty -= n;
	*lost = r->dirty_lost;
	r->dirty_lost = 0;
	return n;
}
