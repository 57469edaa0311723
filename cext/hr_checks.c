/* hostrelay: what a MAP or UNMAP must pass before anything changes.
 *
 * The request against the device's configuration (flags, domain range,
 * order, granule, input range: §5.13.6.5/§5.13.6.6), against its domain
 * (exists, not bypass, no reserved region), against guest memory (the
 * physical range is RAM, and in how many pieces), and against the host's
 * limits (mapping count, vfio_dma entries, RLIMIT_MEMLOCK).  Apart from
 * hr_fanout.c so that the refusals, none of which may leave anything
 * changed, read as one list in the order they apply, and the code that
 * changes state has only the table's and the kernel's answers to handle.
 */
#include "hr_relay_int.h"

/* flatten: so that hr_gmem_find is inlined here, when this file compiles.
 * Left to LTO, GCC 12 inlines hr_piece into the flattened request path but
 * keeps hr_gmem_find (a header's inline function) a call inside it. */
__attribute__((flatten)) uint64_t hr_piece(hr_relay *r, uint64_t gpa, uint64_t size, uint64_t *hva)
{
	/* A MAP spanning two regions (two memfds) is two host ranges, so two
	 * VFIO mappings.  The region of the last MAP is tried first: a guest's
	 * MAPs come from one RAM region nearly always.  r->ghot is one of the
	 * slots of r->mem.r, checked each time (a slot past mem.n has size 0:
	 * hr_relay_set_memory). */
	const struct hr_gmem_region *g = r->ghot;

	if (gpa - g->gpa >= g->size) {
		g = hr_gmem_find(&r->mem, gpa);
		if (!g)
			return 0;
		r->ghot = g;
	}
	uint64_t left = g->size - (gpa - g->gpa);
	*hva = g->hva + (gpa - g->gpa);
	return size < left ? size : left;
}

uint64_t hr_count_pieces(hr_relay *r, uint64_t gpa, uint64_t size, uint64_t *hva)
{
	uint64_t len = hr_piece(r, gpa, size, hva), n = 1, h;

	if (!len)
		return 0; /* not RAM (or size 0) */
	while (len < size) { /* rarely: the range goes on in the next region */
		gpa += len;
		size -= len;
		len = hr_piece(r, gpa, size, &h);
		if (!len)
			return 0;
		n++;
	}
	return n;
}

int hr_check_map(hr_relay *r, uint32_t domain, uint64_t vs, uint64_t ve, uint64_t ps, uint32_t flags,
		 struct hr_result *res, struct hr_domain **dp, uint64_t *pieces, uint64_t *hva)
{
	if (flags & ~r->map_flags_mask)
		return hr_refuse(res, HR_S_INVAL, HR_R_FLAGS); /* §5.13.6.5 MUST (D-25) */
	if (domain < r->domain_start || domain > r->domain_end)
		return hr_refuse(res, HR_S_RANGE, HR_R_DOMAIN_RANGE);
	if (ve < vs)
		return hr_refuse(res, HR_S_INVAL, HR_R_ORDER);
	if ((vs | ps | (ve + 1)) & (r->granule - 1)) /* ve + 1 wraps to 0 at the top: aligned */
		return hr_refuse(res, HR_S_RANGE, HR_R_ALIGN); /* D-23 */
	if (vs < r->input_start || ve > r->input_end)
		return hr_refuse(res, HR_S_RANGE, HR_R_INPUT_RANGE);
	uint64_t last = ve - vs;
	if (ps + last < ps)
		return hr_refuse(res, HR_S_RANGE, HR_R_PHYS_WRAP);
	struct hr_domain *d = hr_find_hot(r, domain);
	if (!d)
		return hr_refuse(res, HR_S_NOENT, HR_R_NO_DOMAIN); /* D-26 */
	if (d->bypass)
		return hr_refuse(res, HR_S_INVAL, HR_R_BYPASS); /* D-27 */
	for (uint32_t i = 0; i < d->nresv; i++)
		if (vs <= d->resv[i][1] && d->resv[i][0] <= ve)
			return hr_refuse(res, HR_S_INVAL, HR_R_RESERVED); /* D-44 */
	*pieces = 0;
	*hva = 0;
	if (!(flags & HR_MAP_F_MMIO)) {
		/* §5.13.6.5: the physical range lies in guest-physical space. */
		if (last == UINT64_MAX || !(*pieces = hr_count_pieces(r, ps, last + 1, hva)))
			return hr_refuse(res, HR_S_FAULT, HR_R_NOT_RAM);
	} else if (d->ncont) {
		/* Guest MMIO has no host address VFIO could pin. */
		return hr_refuse(res, HR_S_UNSUPP, HR_R_MMIO_VFIO);
	}
	if (r->max_mappings && hr_table_count(d->table) >= r->max_mappings)
		return hr_refuse(res, HR_S_NOMEM, HR_R_LIMIT);
	*dp = d;
	return HR_S_OK;
}

int hr_check_unmap(hr_relay *r, uint32_t domain, uint64_t vs, uint64_t ve, struct hr_result *res,
		   struct hr_domain **dp)
{
	if (domain < r->domain_start || domain > r->domain_end)
		return hr_refuse(res, HR_S_RANGE, HR_R_DOMAIN_RANGE);
	if (ve < vs)
		return hr_refuse(res, HR_S_INVAL, HR_R_ORDER);
	struct hr_domain *d = hr_find_hot(r, domain);
	if (!d)
		return hr_refuse(res, HR_S_NOENT, HR_R_NO_DOMAIN); /* D-30 */
	if (d->bypass)
		return hr_refuse(res, HR_S_INVAL, HR_R_BYPASS); /* D-31 */
	*dp = d;
	return HR_S_OK;
}

int hr_check_limits(const hr_relay *r, const struct hr_domain *d, uint64_t pieces, uint64_t size,
		    struct hr_result *res)
{
	/* Before any ioctl, so nothing is half done when one trips. */
	for (uint32_t i = 0; i < d->ncont; i++) {
		if (d->cont[i]->avail < pieces) {
			res->container = (int32_t)i;
			return hr_refuse(res, HR_S_NOMEM, HR_R_ENTRIES);
		}
	}
	if (!hr_memlock_ok(r, size * d->ncont))
		return hr_refuse(res, HR_S_NOMEM, HR_R_MEMLOCK);
	return HR_S_OK;
}
