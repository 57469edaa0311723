/* hostrelay: MAP and UNMAP carried out (§5.13.6.5/§5.13.6.6), once
 * hr_checks.c has passed them.
 *
 * A domain's mappings live in its table and in every VFIO container behind
 * it (one per group, type1v2); an emulated domain is the case of no
 * container.  This file keeps them all agreeing whatever the kernel says: a
 * container refusing part-way is rolled back on the ones already done, and
 * an UNMAP checks that each container removed the bytes the table says it
 * held.  Apart from the checks so that the all-or-nothing logic, the part
 * the fault tests are about, reads on its own.  Kernel behaviour is that of
 * vfio_iommu_type1 (type1v2) as of Linux 6.12.
 *
 * A "container" is either kind of host address space (struct hr_container):
 * a type1 container, or an iommufd IOAS that every iommufd device of the
 * domain is attached to, so a domain of N such devices is one container
 * here and one ioctl per MAP.  The two differ only in c_map and c_unmap.
 */
#include "hr_relay_int.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#ifdef HR_HAVE_IOMMUFD
#include "hr_iommufd.h"
#endif

static int kernel_failed(struct hr_result *res, int err, int container)
{
	res->err = err;
	res->container = container;
	return hr_refuse(res, hr_status_for_errno(err), HR_R_KERNEL);
}

static inline int c_map(struct hr_container *c, uint64_t iova, uint64_t size, uint64_t hva, uint32_t vf)
{
	if (__builtin_expect(c->kind == HR_CONT_TYPE1, 1))
		return hr_vfio_map_dma(c->fd, vf, hva, iova, size);
#ifdef HR_HAVE_IOMMUFD
	/* Fixed IOVA, exactly the range: iommufd never moves or splits what
	 * the guest asked for (Linux >= 6.2 IOMMU_IOAS_MAP_FIXED_IOVA). */
	return hr_iommufd_ioas_map(c->fd, c->ioas, IOMMU_IOAS_MAP_FIXED_IOVA |
				   (vf & VFIO_DMA_MAP_FLAG_READ ? IOMMU_IOAS_MAP_READABLE : 0) |
				   (vf & VFIO_DMA_MAP_FLAG_WRITE ? IOMMU_IOAS_MAP_WRITEABLE : 0),
				   hva, iova, size);
#else
	return -ENOSYS; /* Python never makes an IOAS container in such a build */
#endif
}

/* Unmap every kernel entry inside [iova, iova+size); *got = bytes removed.
 * Both kernels report the removed length (type1v2 Linux >= 3.x; iommufd
 * Linux >= 6.2), which UNMAP checks against the table. */
static inline int c_unmap(struct hr_container *c, uint64_t iova, uint64_t size, uint64_t *got)
{
	if (__builtin_expect(c->kind == HR_CONT_TYPE1, 1))
		return hr_vfio_unmap_dma(c->fd, 0, iova, size, got);
#ifdef HR_HAVE_IOMMUFD
	return hr_iommufd_ioas_unmap(c->fd, c->ioas, iova, size, got);
#else
	*got = 0;
	return -ENOSYS;
#endif
}

/* Map [iova, iova+size) -> guest [gpa, ...) piece by piece into one
 * container; all or nothing.  Returns 0 or -errno. */
static int map_pieces(hr_relay *r, struct hr_container *c, uint64_t iova, uint64_t gpa,
		      uint64_t size, uint32_t vf)
{
	uint64_t done = 0, hva;

	while (done < size) {
		uint64_t len = hr_piece(r, gpa + done, size - done, &hva);
		int rc = len ? c_map(c, iova + done, len, hva, vf) : -EFAULT;
		if (rc < 0) {
			uint64_t unmapped;
			if (done)
				c_unmap(c, iova, done, &unmapped);
			return rc;
		}
		done += len;
	}
	return 0;
}

/* -------------------------------------------------------------------- MAP */

int hr_relay_map(hr_relay *r, uint32_t domain, uint64_t vs, uint64_t ve, uint64_t ps,
		 uint32_t flags, struct hr_result *res)
{
	struct hr_domain *d = NULL;
	uint64_t pieces = 0, hva = 0;

	hr_result_init(res, HR_T_MAP, domain, vs, ve);
	int rc = hr_check_map(r, domain, vs, ve, ps, flags, res, &d, &pieces, &hva);
	if (rc)
		return rc;
	if (d->custom) {
		if (hr_table_overlaps(d->table, vs, ve))
			return hr_refuse(res, HR_S_INVAL, HR_R_OVERLAP);
		return hr_refuse(res, HR_S_DEFER, HR_R_NONE); /* valid: the caller fans out, then inserts */
	}
	if (!d->ncont || !hr_has_perm(flags)) {
		/* Emulated only (or a mapping that grants no access, which VFIO
		 * cannot express and need not: no access is no mapping). */
		rc = hr_table_insert(d->table, vs, ve, ps, flags);
		if (rc == -EEXIST)
			return hr_refuse(res, HR_S_INVAL, HR_R_OVERLAP); /* D-24 */
		if (rc < 0)
			return hr_refuse(res, HR_S_NOMEM, HR_R_LIMIT);
		return HR_S_OK;
	}
	uint64_t size = ve - vs + 1;
	rc = hr_check_limits(r, d, pieces, size, res);
	if (rc)
		return rc;
	/* Into the table first (its overlap check is the insert's own descent,
	 * and it refuses before VFIO would say EEXIST half-way); taken out
	 * again if a container refuses. */
	rc = hr_table_insert(d->table, vs, ve, ps, flags);
	if (rc == -EEXIST)
		return hr_refuse(res, HR_S_INVAL, HR_R_OVERLAP); /* D-24 */
	if (rc < 0)
		return hr_refuse(res, HR_S_NOMEM, HR_R_LIMIT);
	uint32_t vf = hr_dma_flags(flags);
	for (uint32_t i = 0; i < d->ncont; i++) {
		/* One piece, the usual case: its host address is already known. */
		rc = pieces == 1 ? c_map(d->cont[i], vs, size, hva, vf) : map_pieces(r, d->cont[i], vs, ps, size, vf);
		if (rc < 0) {
			/* Undo the containers already done: all agree again. */
			for (uint32_t j = 0; j < i; j++) {
				uint64_t unmapped;
				c_unmap(d->cont[j], vs, size, &unmapped);
			}
			hr_table_remove_exact(d->table, vs, ve);
			return kernel_failed(res, -rc, (int32_t)i);
		}
	}
	for (uint32_t i = 0; i < d->ncont; i++)
		hr_account_map(r, d->cont[i], pieces, size);
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
		if (hr_in_containers(m.flags)) {
			if (!cv->any)
				cv->first = m.start;
			cv->any = 1;
			cv->last = m.end;
			cv->bytes += m.end - m.start + 1;
			cv->pieces += hr_count_pieces(r, m.phys, m.end - m.start + 1, &hva);
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
		if (hr_in_containers(m.flags))
			map_pieces(r, c, m.start, m.phys, m.end - m.start + 1, hr_dma_flags(m.flags));
		if (m.end == UINT64_MAX)
			break;
		from = m.end + 1;
	}
}

/* ------------------------------------------------------- the dirty log */

/* Record that a device may have written [gpa, gpa+size): merged with the
 * last record when adjacent (a run of pages, an UNMAP of adjacent
 * mappings).  Past HR_DIRTY_MAX records, or without memory, the loss is
 * flagged instead and the caller reports all guest RAM. */
static void dirty_add(hr_relay *r, uint64_t gpa, uint64_t size)
{
	if (r->ndirty) {
		struct hr_dirty_range *last = &r->dirty[r->ndirty - 1];
		if (last->gpa + last->size == gpa) {
			last->size += size;
			return;
		}
	}
	if (r->ndirty == r->capdirty) {
		uint64_t cap = r->capdirty ? 2 * r->capdirty : 64;
		struct hr_dirty_range *p = cap <= HR_DIRTY_MAX ? realloc(r->dirty, cap * sizeof(*p)) : NULL;
		if (!p) {
			r->dirty_lost = 1;
			return;
		}
		r->dirty = p;
		r->capdirty = cap;
	}
	r->dirty[r->ndirty++] = (struct hr_dirty_range){ .gpa = gpa, .size = size };
}

/* Unmap one mapping plainly and record every page of it as written if it
 * was writable: what a space the kernel does not log must assume. */
static int unmap_assumed(hr_relay *r, struct hr_container *c, const struct hr_mapping *m, uint64_t *got)
{
	uint64_t size = m->end - m->start + 1;
	int rc = c_unmap(c, m->start, size, got);

	if (rc == 0 && (m->flags & HR_MAP_F_WRITE))
		dirty_add(r, m->phys, size);
	return rc;
}

/* Unmap one mapping from a type1 container the kernel logs, reading its
 * dirty bitmap with the unmap (VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP, Linux
 * >= 5.8: atomic with it, so no write between the read and the unmap is
 * lost), and record the GPA of each page the kernel names.  Linux 6.12's
 * type1 names every page of a vfio-pci device's mapping (no pinned-page
 * scope), which is what docs/dirty-log.md measured. */
static int unmap_bitmap(hr_relay *r, struct hr_container *c, const struct hr_mapping *m, uint64_t *got)
{
	uint64_t pg = c->dirty_pgsize, size = m->end - m->start + 1;
	uint64_t pages = size / pg + !!(size % pg), words = pages / 64 + !!(pages % 64);

	if (words > r->capbits) {
		uint64_t *p = realloc(r->dirty_bits, words * sizeof(*p));
		if (!p)
			return unmap_assumed(r, c, m, got); /* no room for the bitmap */
		r->dirty_bits = p;
		r->capbits = words;
	}
	memset(r->dirty_bits, 0, words * sizeof(uint64_t));
	int rc = hr_vfio_unmap_dma_dirty(c->fd, m->start, size, pg, r->dirty_bits, words * sizeof(uint64_t), got);
	if (rc < 0)
		return rc;
	for (uint64_t w = 0; w < words; w++) {
		for (uint64_t bits = r->dirty_bits[w]; bits; bits &= bits - 1) {
			uint64_t off = (w * 64 + (uint64_t)__builtin_ctzll(bits)) * pg;
			dirty_add(r, m->phys + off, off + pg <= size ? pg : size - off);
		}
	}
	return 0;
}

/* An UNMAP's covered mappings of [vs, ve] out of c while the dirty log
 * runs, one at a time (a bitmap for the whole extent of a sparse UNMAP
 * could be huge), each recording what a device may have written through
 * it: the kernel's bitmap where it logs c, every page of a writable
 * mapping elsewhere (iommufd here has no dirty tracking; see
 * docs/dirty-log.md).  All or nothing: on a failure what was removed is
 * mapped again, so c is as the caller's rollback expects it. */
static int unmap_logged(hr_relay *r, struct hr_container *c, const hr_table *t, uint64_t vs, uint64_t ve,
			uint64_t *got)
{
	struct hr_mapping m;
	uint64_t from = vs, total = 0;

	while (hr_table_next(t, from, &m) && m.start <= ve) {
		if (hr_in_containers(m.flags)) {
			uint64_t one = 0;
			int rc = c->kind == HR_CONT_TYPE1 && c->dirty_pgsize ? unmap_bitmap(r, c, &m, &one)
									     : unmap_assumed(r, c, &m, &one);
			if (rc < 0) {
				if (m.start > vs)
					remap_covered(r, c, t, vs, m.start - 1);
				*got = 0;
				return rc;
			}
			total += one;
		}
		if (m.end == UINT64_MAX)
			break;
		from = m.end + 1;
	}
	*got = total;
	return 0;
}

int hr_relay_unmap(hr_relay *r, uint32_t domain, uint64_t vs, uint64_t ve, struct hr_result *res)
{
	struct hr_domain *d = NULL;

	hr_result_init(res, HR_T_UNMAP, domain, vs, ve);
	int rc = hr_check_unmap(r, domain, vs, ve, res, &d);
	if (rc)
		return rc;
	if (!d->ncont && !d->custom) {
		/* Emulated only: the removal is atomic by itself (RANGE and
		 * nothing removed on a straddle); an UNMAP naming exactly one
		 * mapping, the common case, needs no range walk at all. */
		if (hr_table_remove_exact(d->table, vs, ve))
			return HR_S_OK;
		if (hr_table_remove_range(d->table, vs, ve) < 0)
			return hr_refuse(res, HR_S_RANGE, HR_R_STRADDLE);
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
		if (hr_in_containers(one.flags)) {
			cv = (struct cover){ .bytes = ve - vs + 1, .first = vs, .last = ve, .any = 1,
					     .pieces = hr_count_pieces(r, one.phys, ve - vs + 1, &hva) };
		}
	} else {
		/* Atomic: a straddled mapping refuses the whole UNMAP (D-32)
		 * before any container is touched; holes are fine (D-33). */
		n = hr_table_check_range(d->table, vs, ve);
		if (n < 0)
			return hr_refuse(res, HR_S_RANGE, HR_R_STRADDLE);
		if (d->custom)
			return hr_refuse(res, HR_S_DEFER, HR_R_NONE); /* valid: the caller fans out, then removes */
		if (n > 0)
			covered(r, d->table, vs, ve, &cv);
	}
	int mismatch = 0;
	if (n > 0 && d->ncont) {
		for (uint32_t i = 0; cv.any && i < d->ncont; i++) {
			struct hr_container *c = d->cont[i];
			uint64_t got = 0;
			/* One ioctl for the whole run: type1v2 removes every
			 * vfio_dma inside it, iommufd every area inside it
			 * (none straddles: the table refused that), and both
			 * report the bytes they removed. */
			rc = __builtin_expect(r->dirty_on, 0) ? unmap_logged(r, c, d->table, vs, ve, &got)
							       : c_unmap(c, cv.first, cv.last - cv.first + 1, &got);
			if (rc < 0) {
				for (uint32_t j = 0; j < i; j++) {
					remap_covered(r, d->cont[j], d->table, vs, ve);
					hr_account_map(r, d->cont[j], cv.pieces, cv.bytes);
				}
				return kernel_failed(res, -rc, (int32_t)i);
			}
			hr_account_unmap(r, c, cv.pieces, cv.bytes);
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
		return hr_refuse(res, HR_S_DEVERR, HR_R_MISMATCH);
	}
	return HR_S_OK;
}

/* ------------------------------------------------- the ring's common case */

/* What nearly every MAP through the ring is: a domain of one container
 * (d->plain), flags granting access to RAM, one RAM piece.  Every check of
 * hr_check_map and hr_check_limits is here, in their order, but a request
 * failing one is not refused here: -1 sends it to hr_relay_map, which
 * refuses it the same way (nothing has changed yet; r->hot and r->ghot are
 * only hints).  Past the checks this path is the request's. */
static int map_common(hr_relay *r, const struct hr_req *q, struct hr_result *res)
{
	uint64_t vs = q->start, ve = q->end, ps = q->phys, hva;
	uint32_t flags = q->flags, domain = q->domain;

	/* flags READ, WRITE or both (hr_in_containers), all of them allowed;
	 * the domain range is in d->plain. */
	if (flags - 1 > 2 || (flags & ~r->map_flags_mask) || ve < vs)
		return -1;
	if ((vs | ps | (ve + 1)) & (r->granule - 1))
		return -1;
	if (vs < r->input_start || ve > r->input_end)
		return -1;
	uint64_t last = ve - vs;
	if (ps + last < ps || last == UINT64_MAX)
		return -1;
	struct hr_domain *d = hr_find_hot(r, domain);
	if (!d || !d->plain)
		return -1;
	for (uint32_t i = 0; i < d->nresv; i++)
		if (vs <= d->resv[i][1] && d->resv[i][0] <= ve)
			return -1;
	uint64_t size = last + 1;
	if (hr_piece(r, ps, size, &hva) != size)
		return -1; /* not RAM, or more than one piece */
	if (r->max_mappings && hr_table_count(d->table) >= r->max_mappings)
		return -1;
	struct hr_container *c = d->cont[0];
	if (c->avail < 1 || !hr_memlock_ok(r, size))
		return -1;
	/* hr_relay_map from here on, for one container and one piece.  The
	 * note tells unmap_common that the kernel holds it as one entry, so
	 * that its UNMAP needs no look at guest memory. */
	int rc = hr_table_insert(d->table, vs, ve, ps, flags | HR_TABLE_F_NOTE);
	if (rc < 0) {
		hr_result_init(res, HR_T_MAP, domain, vs, ve);
		if (rc == -EEXIST)
			return hr_refuse(res, HR_S_INVAL, HR_R_OVERLAP); /* D-24 */
		return hr_refuse(res, HR_S_NOMEM, HR_R_LIMIT);
	}
	rc = c_map(c, vs, size, hva, hr_dma_flags(flags));
	if (rc < 0) {
		hr_table_remove_exact(d->table, vs, ve);
		hr_result_init(res, HR_T_MAP, domain, vs, ve);
		return kernel_failed(res, -rc, 0);
	}
	hr_account_map(r, c, 1, size);
	return HR_S_OK;
}

/* What nearly every UNMAP through the ring is: exactly one mapping that
 * map_common made (HR_TABLE_F_NOTE: one RAM piece granting READ and/or
 * WRITE, one kernel entry) in a plain domain.  As map_common: -1 (nothing
 * changed) sends anything else to hr_relay_unmap. */
static int unmap_common(hr_relay *r, const struct hr_req *q, struct hr_result *res)
{
	uint64_t vs = q->start, ve = q->end, got = 0;
	uint32_t domain = q->domain;

	if (q->flags || ve < vs || r->dirty_on)
		return -1; /* the dirty log: hr_relay_unmap records what it removes */
	struct hr_domain *d = hr_find_hot(r, domain);
	if (!d || !d->plain)
		return -1;
	uint64_t size = ve - vs + 1;
	int64_t f = size ? hr_table_mark_flags(d->table, vs, ve) : -1;
	if (f < 0 || !(f & HR_TABLE_F_NOTE))
		return -1;
	/* hr_relay_unmap from here on, for one container and one piece. */
	struct hr_container *c = d->cont[0];
	int rc = c_unmap(c, vs, size, &got);
	if (rc < 0) {
		hr_result_init(res, HR_T_UNMAP, domain, vs, ve);
		return kernel_failed(res, -rc, 0);
	}
	hr_account_unmap(r, c, 1, size);
	hr_table_remove_marked(d->table); /* found above, unchanged since */
	if (got != size) {
		hr_result_init(res, HR_T_UNMAP, domain, vs, ve);
		res->container = 0;
		res->got = got;
		return hr_refuse(res, HR_S_DEVERR, HR_R_MISMATCH);
	}
	return HR_S_OK;
}

int hr_ring_execute(hr_relay *r, const struct hr_req *q, struct hr_result *res)
{
	int st = q->type == HR_T_MAP ? map_common(r, q, res) : unmap_common(r, q, res);

	return st >= 0 ? st : hr_execute(r, q, res);
}
