/* hostrelay: the inside of the MAP/UNMAP data plane, shared by its C files.
 *
 * hr_relay.h is what Python sees; this header is what the files behind it
 * share and nothing else may use: the relay's and a domain's layout, and
 * the helpers more than one of them calls.  The files, one job each:
 *
 *   hr_relay.c   the handle: configuration, domain registry, accounting,
 *                statistics
 *   hr_checks.c  what a MAP/UNMAP must pass before anything changes
 *   hr_fanout.c  MAP/UNMAP carried out on the table and every container
 *   hr_frame.c   requests as bytes: decoding, handle_request's door
 *   hr_burst.c   the request virtqueue served in bursts
 *   hr_kick.c    the request virtqueue served from its own thread
 *   hr_bench.c   the benchmarks' entry points
 *
 * Not a cffi header: build_native.py includes only the headers that have a
 * .cdef, so none of this reaches the module source.
 *
 * Speed: the request path is flattened into hr_relay_process and
 * hr_relay_fast across these files (-flto=auto; the functions declared here
 * are hidden by -fvisibility=hidden, so they are direct calls LTO inlines;
 * hr_piece says where LTO needed help).  The one-line helpers every request
 * runs are static inline below, so their inlining does not depend on LTO.
 */
#ifndef HR_RELAY_INT_H
#define HR_RELAY_INT_H

#include <pthread.h>
#include <stdint.h>

#include "hr_relay.h"
#include "hr_table.h"
#include "hr_vfio.h"
#include "hr_vq.h"

#define HR_MAP_REQ_SIZE 36         /* head + struct virtio_iommu_req_map body */
#define HR_UNMAP_REQ_SIZE 28

struct hr_domain {
	uint32_t id;
	uint32_t bypass;
	uint32_t custom; /* has a backend only Python can drive: checks here, fan-out there */
	uint32_t plain;  /* !bypass && !custom && ncont == 1, id in the domain range: the ring's
			  * common case (hr_ring_execute) */
	hr_table *table;
	uint32_t nresv;
	uint32_t ncont;
	uint64_t (*resv)[2];          /* inclusive [start, end] pairs */
	struct hr_container **cont;
};

struct hr_relay {
	struct hr_gmem mem;
	uint64_t granule, input_start, input_end, max_mappings;
	uint64_t max_writable; /* the longest writable part answered (model.config.MAX_WRITABLE) */
	uint32_t domain_start, domain_end, map_flags_mask;
	uint64_t memlock_limit, memlock_baseline, charged;
	uint32_t ndom, capdom;
	struct hr_domain *dom; /* sorted by id */
	pthread_mutex_t lock;  /* the relay's one lock (hr_relay_lock) */
	struct hr_domain *hot; /* the domain the last request named (hr_find_hot), or NULL */
	const struct hr_gmem_region *ghot; /* the slot of mem.r the last MAP used (hr_piece) */
	/* The dirty log (hr_relay_dirty_set): on, what UNMAP recorded, and the
	 * bitmap the kernel fills with an unmap (u64 words). */
	uint32_t dirty_on, dirty_lost;
	struct hr_dirty_range *dirty;
	uint64_t ndirty, capdirty;
	uint64_t *dirty_bits;
	uint64_t capbits;
};

/* A plain MAP/UNMAP (the readable part exactly head + body, the writable
 * part exactly the 4-byte tail), decoded. */
struct hr_req {
	uint8_t type;
	uint32_t domain;
	uint64_t start, end, phys;
	uint32_t flags; /* MAP flags; for UNMAP its reserved field */
};

/* ---- results (every refusal of every file goes through these) */

static inline int hr_refuse(struct hr_result *res, int status, int reason)
{
	res->status = status;
	res->reason = reason;
	return status;
}

static inline void hr_result_init(struct hr_result *res, uint32_t type, uint32_t domain, uint64_t vs,
				  uint64_t ve)
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

/* ---- MAP flags */

static inline int hr_has_perm(uint32_t flags)
{
	return flags & (HR_MAP_F_READ | HR_MAP_F_WRITE);
}

/* Whether a mapping with these flags is one the containers hold: VFIO can
 * express neither a mapping without access nor guest MMIO. */
static inline int hr_in_containers(uint32_t flags)
{
	return hr_has_perm(flags) && !(flags & HR_MAP_F_MMIO);
}

static inline uint32_t hr_dma_flags(uint32_t flags)
{
	return (flags & HR_MAP_F_READ ? VFIO_DMA_MAP_FLAG_READ : 0) |
	       (flags & HR_MAP_F_WRITE ? VFIO_DMA_MAP_FLAG_WRITE : 0);
}

/* ---- the domain registry (hr_relay.c) */

/* The domain with this id, or NULL; *pos (if given) is where it is or would
 * go in r->dom. */
struct hr_domain *hr_find(const hr_relay *r, uint32_t id, uint32_t *pos);

/* hr_find for the request path: a burst of requests names one domain over
 * and over, so the last one found is tried first (checked by id; adding or
 * removing a domain, which moves r->dom, clears it). */
static inline struct hr_domain *hr_find_hot(hr_relay *r, uint32_t id)
{
	struct hr_domain *d = r->hot;

	if (d && d->id == id)
		return d;
	d = hr_find(r, id, NULL);
	if (d)
		r->hot = d;
	return d;
}

/* ---- accounting (hr_relay.c): what the relay predicts the kernel holds */

void hr_account_map(hr_relay *r, struct hr_container *c, uint64_t pieces, uint64_t bytes);
void hr_account_unmap(hr_relay *r, struct hr_container *c, uint64_t pieces, uint64_t bytes);

/* ---- checks and limits (hr_checks.c) */

/* Each returns 0 if the request may go on, else the status it is refused
 * with (res says why).  A refusal has changed nothing. */

/* Everything a MAP must pass before the table is touched; *d, *pieces (the
 * guest RAM pieces of the physical range, 0 for MMIO) and *hva (where the
 * first starts) are for carrying it out. */
int hr_check_map(hr_relay *r, uint32_t domain, uint64_t vs, uint64_t ve, uint64_t ps, uint32_t flags,
		 struct hr_result *res, struct hr_domain **d, uint64_t *pieces, uint64_t *hva);
/* The same for UNMAP (its straddle check is the table's, in hr_fanout.c). */
int hr_check_unmap(hr_relay *r, uint32_t domain, uint64_t vs, uint64_t ve, struct hr_result *res,
		   struct hr_domain **d);
/* The host's limits on a MAP of `pieces` VFIO entries and `size` bytes into
 * each of d's containers. */
int hr_check_limits(const hr_relay *r, const struct hr_domain *d, uint64_t pieces, uint64_t size,
		    struct hr_result *res);

/* Whether RLIMIT_MEMLOCK leaves room for `more` bytes (type1 charges every
 * vfio_dma's pages to locked_vm, Linux >= 3.x vfio_lock_acct, once per
 * container and per mapping; unless the process has CAP_IPC_LOCK). */
static inline int hr_memlock_ok(const hr_relay *r, uint64_t more)
{
	if (r->memlock_limit == UINT64_MAX)
		return 1;
	uint64_t used = r->memlock_baseline + r->charged;
	return used <= r->memlock_limit && more <= r->memlock_limit - used;
}

/* The host address and length of the guest RAM piece at gpa (at most size),
 * or 0 if gpa is not RAM. */
uint64_t hr_piece(hr_relay *r, uint64_t gpa, uint64_t size, uint64_t *hva);
/* Number of pieces of [gpa, gpa+size) (size > 0), or 0 if any byte is not
 * RAM; *hva is where the first piece starts. */
uint64_t hr_count_pieces(hr_relay *r, uint64_t gpa, uint64_t size, uint64_t *hva);

/* ---- the ring's common case (hr_fanout.c) */

/* hr_execute for the ring (hr_relay_process): the common MAP/UNMAP (a plain
 * domain, a MAP of one RAM piece, an UNMAP naming exactly one mapping) done
 * by one specialised path, anything else by hr_execute.  Same statuses,
 * same changes, same kernel calls; but res is filled only when the status
 * is not HR_S_OK (the ring reads it only then). */
int hr_ring_execute(hr_relay *r, const struct hr_req *q, struct hr_result *res);

/* ---- framing (hr_frame.c) */

/* Decode a plain request into q: 1, or 0 if it is anything else. */
int hr_parse_plain(const uint8_t *req, uint64_t rlen, uint64_t wlen, struct hr_req *q);
/* The status of a plain request, once carried out (or HR_S_DEFER). */
int hr_execute(hr_relay *r, const struct hr_req *q, struct hr_result *res);
/* Zeros then a 4-byte tail, at the end of a writable part of n bytes. */
void hr_put_reply(const struct hr_chain *c, uint64_t n, const uint8_t *tail);

#endif
