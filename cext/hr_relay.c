/* See hr_relay.h.  Spec references are to OASIS virtio v1.2+ §5.13; kernel
 * behaviour is that of vfio_iommu_type1 (type1v2) as of Linux 6.12. */
#include "hr_relay.h"
#include "hr_vfio.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#define HR_MAP_REQ_SIZE 36         /* head + struct virtio_iommu_req_map body */
#define HR_UNMAP_REQ_SIZE 28

struct hr_domain {
	uint32_t id;
	uint32_t bypass;
	uint32_t custom; /* has a backend only Python can drive: checks here, fan-out there */
	hr_table *table;
	uint32_t nresv;
	uint32_t ncont;
	uint64_t (*resv)[2];          /* inclusive [start, end] pairs */
	struct hr_container **cont;
};

struct hr_relay {
	struct hr_gmem mem;
	uint64_t granule, input_start, input_end, max_mappings;
	uint64_t max_writable; /* the longest writable part answered (relay.MAX_WRITABLE) */
	uint32_t domain_start, domain_end, map_flags_mask;
	uint64_t memlock_limit, memlock_baseline, charged;
	uint32_t ndom, capdom;
	struct hr_domain *dom; /* sorted by id */
	pthread_mutex_t lock;  /* the relay's one lock (hr_relay_lock) */
	uint32_t hot;          /* index of the domain the last request named (find_hot) */
	uint32_t ghot;         /* index of the RAM region the last MAP used (piece) */
};

/* ---------------------------------------------------------------- helpers */

/* The one errno -> status table (Relay's status_for uses it for OSError).
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

static int refuse(struct hr_result *res, int status, int reason)
{
	res->status = status;
	res->reason = reason;
	return status;
}

static int kernel_failed(struct hr_result *res, int err, int container)
{
	res->err = err;
	res->container = container;
	return refuse(res, hr_status_for_errno(err), HR_R_KERNEL);
}

static void result_init(struct hr_result *res, uint32_t type, uint32_t domain, uint64_t vs, uint64_t ve)
{
	/* Field by field: every request pays this, a memset call costs more. */
	res->status = 0;
	res->reason = 0;
	res->err = 0;
	res->got = 0;
	res->container = -1;
	res->req_type = type;
	res->domain = domain;
	res->iova = vs;
	res->size = ve - vs + 1; /* 0 means 2^64 */
}

static struct hr_domain *find(const hr_relay *r, uint32_t id, uint32_t *pos)
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

/* find() for the request path: a burst of requests names one domain over
 * and over, so the last one found is tried first (an index, checked by id,
 * so adding or removing domains cannot leave it dangling). */
static struct hr_domain *find_hot(hr_relay *r, uint32_t id)
{
	uint32_t pos = r->hot;
	struct hr_domain *d;

	if (pos < r->ndom && r->dom[pos].id == id)
		return &r->dom[pos];
	d = find(r, id, &pos);
	if (d)
		r->hot = pos;
	return d;
}

/* Walk [gpa, gpa+size) through guest RAM: the host address and length of
 * the piece at gpa, or 0 if gpa is not RAM.  A MAP spanning two regions
 * (two memfds) is two host ranges, so two VFIO mappings. */
static uint64_t piece(hr_relay *r, uint64_t gpa, uint64_t size, uint64_t *hva)
{
	/* The region of the last MAP first: a guest's MAPs come from one
	 * RAM region nearly always.  r->ghot is an index, checked each time. */
	const struct hr_gmem_region *g = &r->mem.r[r->ghot];

	if (r->ghot >= r->mem.n || gpa - g->gpa >= g->size) {
		g = hr_gmem_find(&r->mem, gpa);
		if (!g)
			return 0;
		r->ghot = (uint32_t)(g - r->mem.r);
	}
	uint64_t left = g->size - (gpa - g->gpa);
	*hva = g->hva + (gpa - g->gpa);
	return size < left ? size : left;
}

/* Number of pieces of [gpa, gpa+size) (size > 0), or 0 if any byte is not
 * RAM; *hva is where the first piece starts. */
static uint64_t count_pieces(hr_relay *r, uint64_t gpa, uint64_t size, uint64_t *hva)
{
	uint64_t len = piece(r, gpa, size, hva), n = 1, h;

	if (!len)
		return 0; /* not RAM (or size 0) */
	while (len < size) { /* rarely: the range goes on in the next region */
		gpa += len;
		size -= len;
		len = piece(r, gpa, size, &h);
		if (!len)
			return 0;
		n++;
	}
	return n;
}

static int has_perm(uint32_t flags)
{
	return flags & (HR_MAP_F_READ | HR_MAP_F_WRITE);
}

static uint32_t vfio_flags(uint32_t flags)
{
	return (flags & HR_MAP_F_READ ? VFIO_DMA_MAP_FLAG_READ : 0) |
	       (flags & HR_MAP_F_WRITE ? VFIO_DMA_MAP_FLAG_WRITE : 0);
}

static int c_map(struct hr_container *c, uint64_t iova, uint64_t size, uint64_t hva, uint32_t vf)
{
	return hr_vfio_map_dma(c->fd, vf, hva, iova, size);
}

/* Map [iova, iova+size) -> guest [gpa, ...) piece by piece into one
 * container; all or nothing.  Returns 0 or -errno. */
static int map_pieces(hr_relay *r, struct hr_container *c, uint64_t iova, uint64_t gpa,
		      uint64_t size, uint32_t vf)
{
	uint64_t done = 0, hva;

	while (done < size) {
		uint64_t len = piece(r, gpa + done, size - done, &hva);
		int rc = len ? c_map(c, iova + done, len, hva, vf) : -EFAULT;
		if (rc < 0) {
			uint64_t unmapped;
			if (done)
				hr_vfio_unmap_dma(c->fd, 0, iova, done, &unmapped);
			return rc;
		}
		done += len;
	}
	return 0;
}

static void account_map(hr_relay *r, struct hr_container *c, uint64_t pieces, uint64_t bytes)
{
	c->avail -= (uint32_t)pieces;
	c->entries += pieces;
	c->charged += bytes;
	r->charged += bytes;
}

static void account_unmap(hr_relay *r, struct hr_container *c, uint64_t pieces, uint64_t bytes)
{
	c->avail += (uint32_t)pieces;
	c->entries -= pieces;
	c->charged -= bytes;
	r->charged -= bytes;
}

/* type1 charges every vfio_dma's pages to the process's locked_vm (Linux
 * >= 3.x vfio_lock_acct), once per container and per mapping; the check is
 * against RLIMIT_MEMLOCK unless the process has CAP_IPC_LOCK. */
static int memlock_ok(const hr_relay *r, uint64_t more)
{
	if (r->memlock_limit == UINT64_MAX)
		return 1;
	uint64_t used = r->memlock_baseline + r->charged;
	return used <= r->memlock_limit && more <= r->memlock_limit - used;
}

/* --------------------------------------------------------- configuration */

hr_relay *hr_relay_new(void)
{
	hr_relay *r = calloc(1, sizeof(*r));

	if (!r)
		return NULL;
	if (pthread_mutex_init(&r->lock, NULL)) {
		free(r);
		return NULL;
	}
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
	return hr_gmem_set(&r->mem, regions, n);
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

int hr_relay_domain_add(hr_relay *r, uint32_t id, hr_table *table, int bypass)
{
	uint32_t pos;

	if (find(r, id, &pos))
		return -EEXIST;
	if (r->ndom == r->capdom) {
		uint32_t cap = r->capdom ? 2 * r->capdom : 16;
		struct hr_domain *d = realloc(r->dom, cap * sizeof(*d));
		if (!d)
			return -ENOMEM;
		r->dom = d;
		r->capdom = cap;
	}
	memmove(&r->dom[pos + 1], &r->dom[pos], (r->ndom - pos) * sizeof(*r->dom));
	r->dom[pos] = (struct hr_domain){ .id = id, .bypass = !!bypass, .table = table };
	r->ndom++;
	return 0;
}

int hr_relay_domain_remove(hr_relay *r, uint32_t id)
{
	uint32_t pos;
	struct hr_domain *d = find(r, id, &pos);

	if (!d)
		return -ENOENT;
	free(d->resv);
	free(d->cont);
	memmove(&r->dom[pos], &r->dom[pos + 1], (r->ndom - pos - 1) * sizeof(*r->dom));
	r->ndom--;
	return 0;
}

int hr_relay_domain_set_resv(hr_relay *r, uint32_t id, const uint64_t *pairs, uint32_t n)
{
	struct hr_domain *d = find(r, id, NULL);
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
	struct hr_domain *d = find(r, id, NULL);

	if (!d)
		return -ENOENT;
	d->custom = !!custom;
	return 0;
}

int hr_relay_domain_set_containers(hr_relay *r, uint32_t id, struct hr_container *const *c, uint32_t n)
{
	struct hr_domain *d = find(r, id, NULL);
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
	return 0;
}

/* -------------------------------------------------------------------- MAP */

int hr_relay_map(hr_relay *r, uint32_t domain, uint64_t vs, uint64_t ve, uint64_t ps,
		 uint32_t flags, struct hr_result *res)
{
	result_init(res, HR_T_MAP, domain, vs, ve);
	if (flags & ~r->map_flags_mask)
		return refuse(res, HR_S_INVAL, HR_R_FLAGS); /* §5.13.6.5 MUST (D-25) */
	if (domain < r->domain_start || domain > r->domain_end)
		return refuse(res, HR_S_RANGE, HR_R_DOMAIN_RANGE);
	if (ve < vs)
		return refuse(res, HR_S_INVAL, HR_R_ORDER);
	if ((vs | ps | (ve + 1)) & (r->granule - 1)) /* ve + 1 wraps to 0 at the top: aligned */
		return refuse(res, HR_S_RANGE, HR_R_ALIGN); /* D-23 */
	if (vs < r->input_start || ve > r->input_end)
		return refuse(res, HR_S_RANGE, HR_R_INPUT_RANGE);
	uint64_t last = ve - vs;
	if (ps + last < ps)
		return refuse(res, HR_S_RANGE, HR_R_PHYS_WRAP);
	struct hr_domain *d = find_hot(r, domain);
	if (!d)
		return refuse(res, HR_S_NOENT, HR_R_NO_DOMAIN); /* D-26 */
	if (d->bypass)
		return refuse(res, HR_S_INVAL, HR_R_BYPASS); /* D-27 */
	for (uint32_t i = 0; i < d->nresv; i++)
		if (vs <= d->resv[i][1] && d->resv[i][0] <= ve)
			return refuse(res, HR_S_INVAL, HR_R_RESERVED); /* D-44 */
	uint64_t pieces = 0, hva = 0;
	if (!(flags & HR_MAP_F_MMIO)) {
		/* §5.13.6.5: the physical range lies in guest-physical space. */
		if (last == UINT64_MAX || !(pieces = count_pieces(r, ps, last + 1, &hva)))
			return refuse(res, HR_S_FAULT, HR_R_NOT_RAM);
	} else if (d->ncont) {
		/* Guest MMIO has no host address VFIO could pin. */
		return refuse(res, HR_S_UNSUPP, HR_R_MMIO_VFIO);
	}
	if (r->max_mappings && hr_table_count(d->table) >= r->max_mappings)
		return refuse(res, HR_S_NOMEM, HR_R_LIMIT);
	if (d->custom) {
		if (hr_table_overlaps(d->table, vs, ve))
			return refuse(res, HR_S_INVAL, HR_R_OVERLAP);
		return refuse(res, HR_S_DEFER, HR_R_NONE); /* valid: the caller fans out, then inserts */
	}
	if (!d->ncont || !has_perm(flags)) {
		/* Emulated only (or a mapping that grants no access, which VFIO
		 * cannot express and need not: no access is no mapping). */
		int rc = hr_table_insert(d->table, vs, ve, ps, flags);
		if (rc == -EEXIST)
			return refuse(res, HR_S_INVAL, HR_R_OVERLAP); /* D-24 */
		if (rc < 0)
			return refuse(res, HR_S_NOMEM, HR_R_LIMIT);
		return HR_S_OK;
	}
	uint64_t size = last + 1;
	/* Limits before any ioctl, so nothing is half done when one trips. */
	for (uint32_t i = 0; i < d->ncont; i++) {
		if (d->cont[i]->avail < pieces) {
			res->container = (int32_t)i;
			return refuse(res, HR_S_NOMEM, HR_R_ENTRIES);
		}
	}
	if (!memlock_ok(r, size * d->ncont))
		return refuse(res, HR_S_NOMEM, HR_R_MEMLOCK);
	/* Into the table first (its overlap check is the insert's own descent,
	 * and it refuses before VFIO would say EEXIST half-way); taken out
	 * again if a container refuses. */
	int rc = hr_table_insert(d->table, vs, ve, ps, flags);
	if (rc == -EEXIST)
		return refuse(res, HR_S_INVAL, HR_R_OVERLAP); /* D-24 */
	if (rc < 0)
		return refuse(res, HR_S_NOMEM, HR_R_LIMIT);
	uint32_t vf = vfio_flags(flags);
	for (uint32_t i = 0; i < d->ncont; i++) {
		/* One piece, the usual case: its host address is already known. */
		rc = pieces == 1 ? c_map(d->cont[i], vs, size, hva, vf) : map_pieces(r, d->cont[i], vs, ps, size, vf);
		if (rc < 0) {
			/* Undo the containers already done: all agree again. */
			for (uint32_t j = 0; j < i; j++) {
				uint64_t unmapped;
				hr_vfio_unmap_dma(d->cont[j]->fd, 0, vs, size, &unmapped);
			}
			hr_table_remove_exact(d->table, vs, ve);
			return kernel_failed(res, -rc, (int32_t)i);
		}
	}
	for (uint32_t i = 0; i < d->ncont; i++)
		account_map(r, d->cont[i], pieces, size);
	return HR_S_OK;
}

/* ------------------------------------------------------------------ UNMAP */

/* What the covered mappings of [vs, ve] are in the containers: total bytes,
 * VFIO entries, and the extent one unmap ioctl must cover. */
struct cover {
	uint64_t bytes, pieces, first, last;
	int any;
};

static void covered(hr_relay *r, const hr_table *t, uint64_t vs, uint64_t ve, struct cover *cv)
{
	struct hr_mapping m;
	uint64_t from = vs, hva;

	memset(cv, 0, sizeof(*cv));
	while (hr_table_next(t, from, &m) && m.start <= ve) {
		if (has_perm(m.flags) && !(m.flags & HR_MAP_F_MMIO)) {
			if (!cv->any)
				cv->first = m.start;
			cv->any = 1;
			cv->last = m.end;
			cv->bytes += m.end - m.start + 1;
			cv->pieces += count_pieces(r, m.phys, m.end - m.start + 1, &hva);
		}
		if (m.end == UINT64_MAX)
			break;
		from = m.end + 1;
	}
}

/* Re-map the covered mappings of [vs, ve] into c (UNMAP rollback). */
static void remap_covered(hr_relay *r, struct hr_container *c, const hr_table *t, uint64_t vs,
			  uint64_t ve)
{
	struct hr_mapping m;
	uint64_t from = vs;

	while (hr_table_next(t, from, &m) && m.start <= ve) {
		if (has_perm(m.flags) && !(m.flags & HR_MAP_F_MMIO))
			map_pieces(r, c, m.start, m.phys, m.end - m.start + 1, vfio_flags(m.flags));
		if (m.end == UINT64_MAX)
			break;
		from = m.end + 1;
	}
}

int hr_relay_unmap(hr_relay *r, uint32_t domain, uint64_t vs, uint64_t ve, struct hr_result *res)
{
	result_init(res, HR_T_UNMAP, domain, vs, ve);
	if (domain < r->domain_start || domain > r->domain_end)
		return refuse(res, HR_S_RANGE, HR_R_DOMAIN_RANGE);
	if (ve < vs)
		return refuse(res, HR_S_INVAL, HR_R_ORDER);
	struct hr_domain *d = find_hot(r, domain);
	if (!d)
		return refuse(res, HR_S_NOENT, HR_R_NO_DOMAIN); /* D-30 */
	if (d->bypass)
		return refuse(res, HR_S_INVAL, HR_R_BYPASS); /* D-31 */
	if (!d->ncont && !d->custom) {
		/* Emulated only: the removal is atomic by itself (RANGE and
		 * nothing removed on a straddle); an UNMAP naming exactly one
		 * mapping, the common case, needs no range walk at all. */
		if (hr_table_remove_exact(d->table, vs, ve))
			return HR_S_OK;
		if (hr_table_remove_range(d->table, vs, ve) < 0)
			return refuse(res, HR_S_RANGE, HR_R_STRADDLE);
		return HR_S_OK;
	}
	struct hr_mapping one;
	struct cover cv;
	uint64_t hva;
	int64_t n;
	if (!d->custom && hr_table_find_mark(d->table, vs, ve, &one)) {
		/* One mapping, exactly named: nothing can straddle. */
		n = 1;
		memset(&cv, 0, sizeof(cv));
		if (has_perm(one.flags) && !(one.flags & HR_MAP_F_MMIO)) {
			cv = (struct cover){ .bytes = ve - vs + 1, .first = vs, .last = ve, .any = 1,
					     .pieces = count_pieces(r, one.phys, ve - vs + 1, &hva) };
		}
	} else {
		/* Atomic: a straddled mapping refuses the whole UNMAP (D-32)
		 * before any container is touched; holes are fine (D-33). */
		n = hr_table_check_range(d->table, vs, ve);
		if (n < 0)
			return refuse(res, HR_S_RANGE, HR_R_STRADDLE);
		if (d->custom)
			return refuse(res, HR_S_DEFER, HR_R_NONE); /* valid: the caller fans out, then removes */
		if (n > 0)
			covered(r, d->table, vs, ve, &cv);
	}
	int mismatch = 0;
	if (n > 0 && d->ncont) {
		for (uint32_t i = 0; cv.any && i < d->ncont; i++) {
			struct hr_container *c = d->cont[i];
			uint64_t got = 0;
			/* One ioctl for the whole run: type1v2 removes every
			 * vfio_dma inside it and reports the bytes it removed. */
			int rc = hr_vfio_unmap_dma(c->fd, 0, cv.first, cv.last - cv.first + 1, &got);
			if (rc < 0) {
				for (uint32_t j = 0; j < i; j++) {
					remap_covered(r, d->cont[j], d->table, vs, ve);
					account_map(r, d->cont[j], cv.pieces, cv.bytes);
				}
				return kernel_failed(res, -rc, (int32_t)i);
			}
			account_unmap(r, c, cv.pieces, cv.bytes);
			if (got != cv.bytes && !mismatch) {
				/* The kernel held something else than the table:
				 * converge on "unmapped" everywhere, then report. */
				mismatch = 1;
				res->container = (int32_t)i;
				res->got = got;
			}
		}
	}
	if (n == 1 && cv.first == vs && cv.last == ve)
		hr_table_remove_exact(d->table, vs, ve);
	else
		hr_table_remove_range(d->table, vs, ve);
	if (mismatch) {
		res->size = ve - vs + 1;
		return refuse(res, HR_S_DEVERR, HR_R_MISMATCH);
	}
	return HR_S_OK;
}

/* ------------------------------------------------------------ accounting */

void hr_relay_account(hr_relay *r, struct hr_container *c, int64_t pieces, int64_t bytes)
{
	/* For mappings the control plane makes itself (ATTACH replay, DETACH,
	 * bypass identity maps), so one set of counters holds everything. */
	if (pieces >= 0)
		account_map(r, c, (uint64_t)pieces, (uint64_t)bytes);
	else
		account_unmap(r, c, (uint64_t)-pieces, (uint64_t)-bytes);
}

/* ---------------------------------------------------------------- framing */

static uint32_t le32(const uint8_t *p)
{
	uint32_t v;
	memcpy(&v, p, 4);
	return v; /* little-endian host (hr_vq.h) */
}

static uint64_t le64(const uint8_t *p)
{
	uint64_t v;
	memcpy(&v, p, 8);
	return v;
}

/* A plain MAP/UNMAP (the readable part exactly head + body, the writable
 * part exactly the 4-byte tail), decoded. */
struct hr_req {
	uint8_t type;
	uint32_t domain;
	uint64_t start, end, phys;
	uint32_t flags; /* MAP flags; for UNMAP its reserved field */
};

/* Decode a plain request: 1, or 0 if it is anything else.  req may be
 * guest memory the driver can rewrite while we read it: every field is
 * read exactly once, into q, and only q is checked and used. */
static int parse_plain(const uint8_t *req, uint64_t rlen, uint64_t wlen, struct hr_req *q)
{
	if (rlen < 1 || wlen != 4)
		return 0;
	q->type = __atomic_load_n(req, __ATOMIC_RELAXED);
	const uint8_t *b = req + 4; /* head.reserved ignored (D-09) */
	if (q->type == HR_T_MAP && rlen == HR_MAP_REQ_SIZE) {
		q->phys = le64(b + 20);
		q->flags = le32(b + 28);
	} else if (q->type == HR_T_UNMAP && rlen == HR_UNMAP_REQ_SIZE) {
		q->flags = le32(b + 20);
	} else {
		return 0;
	}
	q->domain = le32(b);
	q->start = le64(b + 4);
	q->end = le64(b + 12);
	return 1;
}

/* The status of a plain request, once carried out (or HR_S_DEFER). */
static int execute(hr_relay *r, const struct hr_req *q, struct hr_result *res)
{
	if (q->type == HR_T_MAP)
		return hr_relay_map(r, q->domain, q->start, q->end, q->phys, q->flags, res);
	if (q->flags) {
		/* D-29: INVAL; a rejected request changes nothing. */
		result_init(res, HR_T_UNMAP, q->domain, q->start, q->end);
		return refuse(res, HR_S_INVAL, HR_R_RESERVED_FIELD);
	}
	return hr_relay_unmap(r, q->domain, q->start, q->end, res);
}

int64_t hr_relay_request(hr_relay *r, const uint8_t *req, uint64_t rlen, uint64_t wlen, uint8_t *tail,
			 struct hr_result *res)
{
	struct hr_req q;

	memset(tail, 0, 4);
	if (parse_plain(req, rlen, wlen, &q)) {
		tail[0] = (uint8_t)execute(r, &q, res);
		return 4;
	}
	if (rlen < 1)
		return -1;
	uint8_t type = __atomic_load_n(req, __ATOMIC_RELAXED);
	if (type != HR_T_MAP && type != HR_T_UNMAP)
		return -1; /* the control plane's (Python) request */
	/* A MAP/UNMAP split any other way is refused undecoded. */
	result_init(res, type, 0, 0, 0);
	if (rlen < 4 || wlen < 4 || wlen > r->max_writable)
		return 0; /* no place for a tail: used length 0 */
	tail[0] = (uint8_t)refuse(res, HR_S_INVAL, HR_R_FRAMING);
	return (int64_t)wlen;
}

__attribute__((flatten)) int hr_relay_fast(hr_relay *r, const uint8_t *req, uint64_t rlen, uint64_t wlen,
					   struct hr_result *res)
{
	/* Only the plain case: a well-framed MAP/UNMAP whose reply is the 4-byte
	 * tail.  Anything else returns -1 having changed nothing.  The lock is
	 * taken here, so the Python caller needs no lock of its own. */
	struct hr_req q;

	if (!parse_plain(req, rlen, wlen, &q))
		return -1;
	pthread_mutex_lock(&r->lock);
	int st = execute(r, &q, res);
	if (st != HR_S_DEFER && (res->reason == HR_R_KERNEL || res->reason == HR_R_MISMATCH))
		return HR_FAST_REPORT | st; /* still locked: the caller reports *res, then unlocks */
	pthread_mutex_unlock(&r->lock);
	return st == HR_S_DEFER ? -1 : st; /* DEFER: nothing was changed, the caller takes the full path */
}

/* Write len bytes of reply into the chain's writable part and complete it. */
void hr_relay_complete(struct hr_vq *vq, const struct hr_chain *c, const uint8_t *reply, uint64_t len)
{
	hr_chain_write(c, reply, len);
	hr_vq_push(vq, c->head, (uint32_t)len);
}

/* Zeros then a 4-byte tail, at the end of a writable part of n bytes. */
static void put_reply(const struct hr_chain *c, uint64_t n, const uint8_t *tail)
{
	uint64_t pos = 0;

	for (uint32_t i = 0; i < c->nwrite && pos < n; i++) {
		uint8_t *dst = (uint8_t *)(uintptr_t)c->wr[i].hva;
		for (uint32_t k = 0; k < c->wr[i].len && pos < n; k++, pos++)
			dst[k] = pos + 4 >= n ? tail[pos - (n - 4)] : 0;
	}
}

/* Hand a two-descriptor request the fast path took to the caller, in the
 * same form hr_vq_pop gives. */
static void pair_to_chain(const struct hr_pair *p, struct hr_chain *c)
{
	c->head = p->head;
	c->nread = c->nwrite = 1;
	c->rd[0] = (struct hr_seg){ (uint64_t)(uintptr_t)p->rd, p->rlen };
	c->wr[0] = (struct hr_seg){ (uint64_t)(uintptr_t)p->wr, p->wlen };
	c->read_len = p->rlen;
	c->write_len = p->wlen;
}

static int process_exit(struct hr_queue *q, int code, uint32_t completed, uint32_t nerrs)
{
	hr_vq_publish(&q->vq);
	q->nerrs = nerrs;
	return code | (nerrs ? HR_PROCESS_ERRORS : 0) | (int)(completed << HR_PROCESS_SHIFT);
}

int hr_relay_process_locked(hr_relay *r, struct hr_queue *q)
{
	pthread_mutex_lock(&r->lock);
	int rc = hr_relay_process(r, q);
	if (!(rc & (HR_PROCESS_CODE | HR_PROCESS_ERRORS)))
		pthread_mutex_unlock(&r->lock);
	return rc; /* otherwise still locked: the caller finishes, then unlocks */
}

/* Requests decoded ahead of carrying them out (hr_relay_process). */
#define HR_BURST 64

/* flatten: the whole request path (decode, checks, table, ioctl wrappers)
 * inlined into one function.  Measured under TCG, where every return is an
 * indirect jump the emulator has to look up, this is worth more than the
 * instructions it saves. */
__attribute__((flatten)) int hr_relay_process(hr_relay *r, struct hr_queue *q)
{
	/* The hot path of the whole relay, in bursts of three phases: decode
	 * every available plain MAP/UNMAP, carry them out in order, then write
	 * their tails and used elements.  The ring's pages are touched in two
	 * tight passes rather than between ioctls, and the used index is
	 * published once per call (§2.7.8 allows it).  A request the driver
	 * made available is read once: the driver may not change it until it is
	 * used (virtio 1.2 "Supplying Buffers to The Device"). */
	struct hr_vq *vq = &q->vq;
	struct hr_req burst[HR_BURST];
	struct hr_pair pairs[HR_BURST];
	uint8_t status[HR_BURST];
	uint8_t buf[64], tail[4];
	struct hr_result res;
	uint32_t completed = 0, nerrs = 0;
	uint16_t avail_idx = vq->last_avail;
	static const struct hr_gmem_region none; /* size 0: the first lookup searches */
	const struct hr_gmem_region *hot = &none;
	int why;

	q->nerrs = 0;
	if (!vq->ready)
		return HR_PROCESS_IDLE;
	if (vq->broken)
		return HR_PROCESS_BROKEN;
	for (;;) {
		if (vq->last_avail == avail_idx) {
			avail_idx = __atomic_load_n(&vq->avail->idx, __ATOMIC_ACQUIRE);
			if (vq->last_avail == avail_idx)
				return process_exit(q, HR_PROCESS_IDLE, completed, nerrs);
			if (!hr_vq_avail_ok(vq, avail_idx))
				return process_exit(q, HR_PROCESS_BROKEN, completed, nerrs);
		}
		if (nerrs == HR_QUEUE_ERRS)
			return process_exit(q, HR_PROCESS_FULL, completed, nerrs);

		/* 1: decode.  A chain of another shape or a request of another
		 * kind ends the burst and is given back untouched. */
		uint32_t n = 0, done;
		while (n < HR_BURST && vq->last_avail != avail_idx &&
		       hr_vq_take_pair(vq, &pairs[n], HR_MAP_REQ_SIZE, &hot)) {
			if (!parse_plain(pairs[n].rd, pairs[n].rlen, pairs[n].wlen, &burst[n])) {
				vq->last_avail--;
				break;
			}
			n++;
		}
		/* 2: carry out, in order. */
		int deferred = 0;
		for (done = 0; done < n && nerrs < HR_QUEUE_ERRS; done++) {
			int st = execute(r, &burst[done], &res);
			if (st == HR_S_DEFER) {
				deferred = 1; /* nothing was changed: the caller's */
				break;
			}
			status[done] = (uint8_t)st;
			if (res.reason == HR_R_KERNEL || res.reason == HR_R_MISMATCH)
				q->errs[nerrs++] = res;
		}
		/* 3: complete.  The tail is the status and three zero bytes. */
		for (uint32_t i = 0; i < done; i++) {
			uint32_t t = status[i]; /* little-endian host (hr_vq.h) */
			__builtin_memcpy(pairs[i].wr, &t, 4);
			hr_vq_put(vq, pairs[i].head, 4);
		}
		completed += done;
		if (done < n) {
			/* Give back what was decoded but not carried out (the
			 * taken chains are the last n - done avail slots)... */
			if (deferred && done == 0) {
				/* ...but a deferred first one stays taken: it is
				 * the caller's now. */
				vq->last_avail -= (uint16_t)(n - 1);
				pair_to_chain(&pairs[0], &q->chain);
				return process_exit(q, HR_PROCESS_CALLER, completed, nerrs);
			}
			vq->last_avail -= (uint16_t)(n - done);
			continue;
		}
		if (n)
			continue;

		/* Anything else, one chain at a time. */
		struct hr_chain *c = &q->chain;
		int got = hr_vq_pop(vq, c, &why);
		if (vq->broken)
			return process_exit(q, HR_PROCESS_BROKEN, completed, nerrs);
		if (got == 0) {
			/* The index in guest memory no longer says there is one
			 * (the driver, or the device's own reply over a ring the
			 * guest overlapped, rewrote it): read it again. */
			avail_idx = vq->last_avail;
			continue;
		}
		if (got < 0) {
			/* Malformed chain: complete it with used length 0. */
			hr_vq_put(vq, c->head, 0);
			completed++;
			continue;
		}
		hr_chain_read(c, buf, sizeof(buf));
		int64_t reply = hr_relay_request(r, buf, c->read_len, c->write_len, tail, &res);
		if (reply < 0 || res.status == HR_S_DEFER)
			return process_exit(q, HR_PROCESS_CALLER, completed, nerrs);
		if (reply > 0)
			put_reply(c, (uint64_t)reply, tail);
		hr_vq_put(vq, c->head, (uint32_t)reply);
		completed++;
		if (res.reason == HR_R_KERNEL || res.reason == HR_R_MISMATCH)
			q->errs[nerrs++] = res;
	}
}

/* ------------------------------------------------------------- benchmarks */

__attribute__((flatten)) int hr_relay_bench_map_unmap(hr_relay *r, uint32_t domain, uint64_t iova, uint64_t gpa, uint64_t size,
			     uint32_t count, uint32_t spread)
{
	/* The data plane's own cost: MAP+UNMAP pairs straight into
	 * hr_relay_map/hr_relay_unmap, no ring and no Python, cycling over
	 * `spread` pages like tests/bench_vfio.py's other loops. */
	struct hr_result res;

	for (uint32_t i = 0; i < count; i++) {
		uint64_t off = spread ? (i % spread) * size : 0;
		int st = hr_relay_map(r, domain, iova + off, iova + off + size - 1, gpa + off,
				      HR_MAP_F_READ | HR_MAP_F_WRITE, &res);
		if (st)
			return -st;
		st = hr_relay_unmap(r, domain, iova + off, iova + off + size - 1, &res);
		if (st)
			return -st;
	}
	return 0;
}

int hr_relay_bench_ring(hr_relay *r, struct hr_queue *q, const uint16_t *heads, uint32_t n, uint32_t batches)
{
	/* The ring with the driver's side done in C too: publish the same n
	 * chain heads, serve them, count the used elements; batches times.
	 * What process_queue costs without any Python between batches. */
	struct hr_vq *vq = &q->vq;

	for (uint32_t b = 0; b < batches; b++) {
		uint16_t idx = vq->avail->idx;
		for (uint32_t i = 0; i < n; i++)
			vq->avail->ring[(uint16_t)(idx + i) & (vq->size - 1)] = heads[i];
		__atomic_store_n(&vq->avail->idx, (uint16_t)(idx + n), __ATOMIC_RELEASE);
		int rc = hr_relay_process(r, q);
		if ((rc & (HR_PROCESS_CODE | HR_PROCESS_ERRORS)) || (uint32_t)(rc >> HR_PROCESS_SHIFT) != n)
			return -1;
	}
	return 0;
}

__attribute__((flatten)) int hr_relay_bench_floor(hr_relay *r, struct hr_queue *q, int container_fd)
{
	/* The floor under hr_relay_process, for the benchmark only: the same
	 * walk over the same ring, but each plain MAP/UNMAP goes straight to
	 * one container's ioctl with none of the relay's work (no checks, no
	 * table, no accounting, no lock).  What the ring would cost if the
	 * relay did nothing but forward; never a way to serve a guest.
	 * Returns the requests completed, or -errno (-EINVAL: a request the
	 * floor does not handle, left available; -EIO: an UNMAP removed other
	 * than the bytes it named). */
	struct hr_vq *vq = &q->vq;
	static const struct hr_gmem_region none;
	const struct hr_gmem_region *hot = &none;
	struct hr_pair p;
	struct hr_req rq;
	int done = 0;
	uint16_t avail_idx = __atomic_load_n(&vq->avail->idx, __ATOMIC_ACQUIRE);

	while (vq->last_avail != avail_idx) {
		if (!hr_vq_take_pair(vq, &p, HR_MAP_REQ_SIZE, &hot) || !parse_plain(p.rd, p.rlen, p.wlen, &rq)) {
			done = -EINVAL;
			break;
		}
		uint64_t size = rq.end - rq.start + 1, hva = 0, got = 0;
		int rc;
		if (rq.type == HR_T_UNMAP) {
			rc = hr_vfio_unmap_dma(container_fd, 0, rq.start, size, &got);
			if (rc == 0 && got != size)
				rc = -EIO; /* as the raw loop (hr_vfio_bench_map_unmap) checks */
		} else {
			rc = piece(r, rq.phys, size, &hva) == size
				     ? hr_vfio_map_dma(container_fd, vfio_flags(rq.flags), hva, rq.start, size)
				     : -EFAULT;
		}
		if (rc < 0) {
			done = rc;
			break;
		}
		uint32_t t = HR_S_OK;
		__builtin_memcpy(p.wr, &t, 4);
		hr_vq_put(vq, p.head, 4);
		done++;
	}
	hr_vq_publish(vq);
	return done;
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
			if (has_perm(m.flags) && !(m.flags & HR_MAP_F_MMIO)) {
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
