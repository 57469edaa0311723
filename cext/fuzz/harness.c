/* See harness.h. */
#include "harness.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hr_vfio.h"

void fz_fail(const char *file, int line, const char *what)
{
	fprintf(stderr, "%s:%d: invariant broken: %s\n", file, line, what);
	abort();
}

/* ------------------------------------------------------- the fake kernel */

#define FK_MAX 4096

struct fk_entry {
	uint64_t iova, size;
};

static struct fk_container {
	uint32_t n;
	struct fk_entry e[FK_MAX];
} fk[FZ_NCONT];

static uint32_t fk_limit = FK_MAX; /* vfio_iommu_type1.dma_entry_limit */
static int fk_err;
static uint32_t fk_nth;

void fk_fail_next(uint32_t nth, int err)
{
	fk_nth = nth;
	fk_err = err;
}

void fk_reset(uint32_t entry_limit)
{
	memset(fk, 0, sizeof(fk));
	fk_limit = entry_limit && entry_limit < FK_MAX ? entry_limit : FK_MAX;
	fk_err = 0;
}

static struct fk_container *fk_of(int fd)
{
	return fd >= FZ_FD0 && fd < FZ_FD0 + FZ_NCONT ? &fk[fd - FZ_FD0] : NULL;
}

/* A call the input chose to fail: the kernel did nothing. */
static int fk_injected(void)
{
	if (!fk_err)
		return 0;
	if (fk_nth) {
		fk_nth--;
		return 0;
	}
	int err = fk_err;
	fk_err = 0;
	return -err;
}

int hr_vfio_map_dma(int fd, uint32_t flags, uint64_t vaddr, uint64_t iova, uint64_t size)
{
	struct fk_container *c = fk_of(fd);
	(void)vaddr;

	if (!c)
		return -EBADF;
	int rc = fk_injected();
	if (rc)
		return rc;
	/* vfio_dma_do_map (Linux 6.12): READ or WRITE needed, size and iova
	 * page-aligned, no wrap, no overlap (EEXIST), dma_entry_limit (ENOSPC). */
	if (!(flags & (VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE)) || !size || (size | iova) & 0xFFF ||
	    iova + size - 1 < iova)
		return -EINVAL;
	for (uint32_t i = 0; i < c->n; i++)
		if (iova <= c->e[i].iova + c->e[i].size - 1 && c->e[i].iova <= iova + size - 1)
			return -EEXIST;
	if (c->n >= fk_limit)
		return -ENOSPC;
	c->e[c->n++] = (struct fk_entry){ iova, size };
	return 0;
}

int hr_vfio_unmap_dma(int fd, uint32_t flags, uint64_t iova, uint64_t size, uint64_t *unmapped)
{
	struct fk_container *c = fk_of(fd);

	*unmapped = 0;
	if (!c)
		return -EBADF;
	int rc = fk_injected();
	if (rc)
		return rc;
	/* vfio_dma_do_unmap, type1v2: an unmap may not bisect a mapping
	 * (EINVAL); it removes every mapping inside and reports their bytes. */
	if (flags || !size || (size | iova) & 0xFFF || iova + size - 1 < iova)
		return -EINVAL;
	uint64_t last = iova + size - 1;
	for (uint32_t i = 0; i < c->n; i++) {
		uint64_t s = c->e[i].iova, e = s + c->e[i].size - 1;
		if ((s < iova && e >= iova) || (s <= last && e > last))
			return -EINVAL;
	}
	for (uint32_t i = 0; i < c->n;) {
		if (c->e[i].iova >= iova && c->e[i].iova <= last) {
			*unmapped += c->e[i].size;
			c->e[i] = c->e[--c->n];
		} else {
			i++;
		}
	}
	return 0;
}

/* UNMAP with VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP (the dirty log): as a
 * plain unmap, every page reported dirty, as Linux 6.12's type1 does for a
 * vfio-pci device (no pinned-page scope). */
int hr_vfio_unmap_dma_dirty(int fd, uint64_t iova, uint64_t size, uint64_t pgsize, uint64_t *bitmap,
			    uint64_t bitmap_size, uint64_t *unmapped)
{
	if (!pgsize || size / pgsize > bitmap_size * 8)
		return -EINVAL;
	int rc = hr_vfio_unmap_dma(fd, 0, iova, size, unmapped);
	if (rc)
		return rc;
	for (uint64_t i = 0; i < size / pgsize; i++)
		bitmap[i / 64] |= 1ull << (i % 64);
	return 0;
}

#ifdef HR_HAVE_IOMMUFD
#include "hr_iommufd.h"

/* The IOAS of the fuzzed world (container FZ_IOAS_SLOT, its fd standing for
 * the iommufd): IOMMU_IOAS_MAP/UNMAP as Linux 6.12 drivers/iommu/iommufd
 * does them for a fixed IOVA.  No entry limit (iommufd has none); an unmap
 * that would split an area, or that finds nothing, is ENOENT
 * (iopt_unmap_iova_range). */
int hr_iommufd_ioas_map(int fd, uint32_t ioas, uint32_t flags, uint64_t vaddr, uint64_t iova, uint64_t length)
{
	struct fk_container *c = fk_of(fd);
	(void)vaddr;

	if (!c || ioas != FZ_IOAS_ID)
		return -ENOENT;
	int rc = fk_injected();
	if (rc)
		return rc;
	if (!(flags & IOMMU_IOAS_MAP_FIXED_IOVA) || !length || (length | iova) & 0xFFF || iova + length - 1 < iova)
		return -EINVAL;
	for (uint32_t i = 0; i < c->n; i++)
		if (iova <= c->e[i].iova + c->e[i].size - 1 && c->e[i].iova <= iova + length - 1)
			return -EEXIST;
	if (c->n >= FK_MAX)
		return -ENOMEM;
	c->e[c->n++] = (struct fk_entry){ iova, length };
	return 0;
}

int hr_iommufd_ioas_unmap(int fd, uint32_t ioas, uint64_t iova, uint64_t length, uint64_t *unmapped)
{
	struct fk_container *c = fk_of(fd);

	*unmapped = 0;
	if (!c || ioas != FZ_IOAS_ID)
		return -ENOENT;
	int rc = fk_injected();
	if (rc)
		return rc;
	if (!length || (length | iova) & 0xFFF || iova + length - 1 < iova)
		return -EINVAL;
	uint64_t last = iova + length - 1, got = 0;
	for (uint32_t i = 0; i < c->n; i++) {
		uint64_t s = c->e[i].iova, e = s + c->e[i].size - 1;
		if (s <= last && e >= iova && (s < iova || e > last))
			return -ENOENT;
	}
	for (uint32_t i = 0; i < c->n;) {
		if (c->e[i].iova >= iova && c->e[i].iova <= last) {
			got += c->e[i].size;
			c->e[i] = c->e[--c->n];
		} else {
			i++;
		}
	}
	if (!got)
		return -ENOENT;
	*unmapped = got;
	return 0;
}
#endif

int hr_vfio_bench_map_unmap(int fd, uint64_t vaddr, uint64_t iova, uint64_t size, uint32_t count, uint32_t spread)
{
	(void)fd, (void)vaddr, (void)iova, (void)size, (void)count, (void)spread;
	return -ENOSYS; /* benchmarks are not fuzzed */
}

uint64_t fk_entries(int fd)
{
	return fk_of(fd)->n;
}

uint64_t fk_bytes(int fd)
{
	struct fk_container *c = fk_of(fd);
	uint64_t b = 0;

	for (uint32_t i = 0; i < c->n; i++)
		b += c->e[i].size;
	return b;
}

static int cmp_entry(const void *a, const void *b)
{
	const struct fk_entry *x = a, *y = b;
	return x->iova < y->iova ? -1 : x->iova > y->iova;
}

int fk_matches(int fd, const hr_table *t)
{
	static struct fk_entry e[FK_MAX];
	struct fk_container *c = fk_of(fd);
	uint32_t n = c->n, i = 0;
	struct hr_mapping m;
	uint64_t from = 0;

	memcpy(e, c->e, n * sizeof(*e));
	qsort(e, n, sizeof(*e), cmp_entry);
	/* Walk the table's accessible mappings; each must be covered by a run
	 * of adjacent kernel entries starting exactly at its start. */
	while (hr_table_next(t, from, &m)) {
		if (m.flags & (HR_MAP_F_READ | HR_MAP_F_WRITE)) {
			uint64_t at = m.start;
			while (i < n && e[i].iova == at && at - 1 != m.end) {
				at += e[i].size;
				i++;
			}
			if (at - 1 != m.end)
				return 0;
		}
		if (m.end == UINT64_MAX)
			break;
		from = m.end + 1;
	}
	return i == n;
}

/* -------------------------------------------------------------- the world */

static const uint64_t region_gpa[3] = { 0, FZ_REGION, 0x100000 };

void fz_world_init(struct fz_world *w, uint32_t ncont, uint32_t entry_limit, uint64_t memlock)
{
	struct hr_gmem_region regions[3];

	memset(w, 0, sizeof(*w));
	fk_reset(entry_limit);
	for (int i = 0; i < 3; i++) {
		w->ram[i] = calloc(1, FZ_REGION);
		regions[i] = (struct hr_gmem_region){ region_gpa[i], FZ_REGION, (uint64_t)(uintptr_t)w->ram[i] };
	}
	w->relay = hr_relay_new();
	FZ_ASSERT(w->relay && hr_relay_set_memory(w->relay, regions, 3) == 0);
	/* 4 KiB granule, the whole input range, domains 1..8, all MAP flags,
	 * at most 512 mappings a domain, replies up to 64 KiB (MAX_WRITABLE in
	 * hostrelay.model.config). */
	hr_relay_configure(w->relay, 0x1000, 0, UINT64_MAX, 1, 8, 7, 512, 64 << 10);
	hr_relay_set_memlock(w->relay, memlock, 0);
	for (uint32_t id = 1; id <= 4; id++) {
		w->tables[id] = hr_table_new();
		FZ_ASSERT(hr_relay_domain_add(w->relay, id, w->tables[id], id == 3) == 0);
	}
	w->ncont = ncont > 3 ? 3 : ncont;
	struct hr_container *list[FZ_NCONT];
	for (uint32_t i = 0; i < FZ_NCONT; i++) {
		w->cont[i] = (struct hr_container){ .fd = FZ_FD0 + (int)i, .avail = fk_limit };
#ifdef HR_HAVE_IOMMUFD
		if (i == FZ_IOAS_SLOT) /* an IOAS beside the type1 containers: no entry limit */
			w->cont[i] = (struct hr_container){ .fd = FZ_FD0 + (int)i, .avail = UINT32_MAX,
							    .kind = HR_CONT_IOAS, .ioas = FZ_IOAS_ID };
#endif
		list[i] = &w->cont[i];
	}
	FZ_ASSERT(hr_relay_domain_set_containers(w->relay, 2, list, w->ncont) == 0);
	const uint64_t resv[2] = { 0xFEE00000, 0xFEEFFFFF }; /* the MSI window */
	FZ_ASSERT(hr_relay_domain_set_resv(w->relay, 2, resv, 1) == 0);
	FZ_ASSERT(hr_relay_domain_set_custom(w->relay, 4, 1) == 0);
}

void fz_world_free(struct fz_world *w)
{
	hr_relay_free(w->relay);
	for (int i = 1; i <= 4; i++)
		hr_table_free(w->tables[i]);
	for (int i = 0; i < 3; i++)
		free(w->ram[i]);
}

static void check_disjoint(const hr_table *t)
{
	struct hr_mapping m;
	uint64_t from = 0, count = 0;
	int first = 1;
	uint64_t prev_end = 0;

	while (hr_table_next(t, from, &m)) {
		FZ_ASSERT(m.start <= m.end);
		FZ_ASSERT(first || m.start > prev_end);
		first = 0;
		prev_end = m.end;
		count++;
		if (m.end == UINT64_MAX)
			break;
		from = m.end + 1;
	}
	FZ_ASSERT(count == hr_table_count(t));
}

void fz_world_check(const struct fz_world *w)
{
	uint64_t charged = 0;

	for (int i = 1; i <= 4; i++)
		check_disjoint(w->tables[i]);
	FZ_ASSERT(hr_table_count(w->tables[3]) == 0); /* bypass: never mapped */
	for (uint32_t i = 0; i < FZ_NCONT; i++) {
		const struct hr_container *c = &w->cont[i];
		int fd = FZ_FD0 + (int)i;
		FZ_ASSERT(c->entries == fk_entries(fd));
		FZ_ASSERT(c->charged == fk_bytes(fd));
		FZ_ASSERT(c->avail + c->entries == (c->kind == HR_CONT_IOAS ? UINT32_MAX : fk_limit));
		if (i < w->ncont)
			FZ_ASSERT(fk_matches(fd, w->tables[2]));
		else
			FZ_ASSERT(fk_entries(fd) == 0);
		charged += c->charged;
	}
	FZ_ASSERT(hr_relay_charged(w->relay) == charged);
	/* Python's memlock accounting: what one container of domain 2 pins. */
	uint64_t mapped = 0, pinned = hr_relay_pinned(w->relay, 2, NULL, 0, &mapped);
	if (w->ncont)
		FZ_ASSERT(mapped == w->cont[0].charged);
	FZ_ASSERT(pinned <= mapped);
}

uint8_t *fz_gpa(struct fz_world *w, uint64_t gpa)
{
	for (int i = 0; i < 3; i++)
		if (gpa - region_gpa[i] < FZ_REGION)
			return w->ram[i] + (gpa - region_gpa[i]);
	return NULL;
}

void fz_serve(struct fz_world *w, struct hr_queue *q, uint32_t rounds, int locked)
{
	uint8_t req[80];

	for (uint32_t i = 0; i < rounds; i++) {
		int rc = locked ? hr_relay_process_locked(w->relay, q) : hr_relay_process(w->relay, q);
		if (locked && (rc & (HR_PROCESS_CODE | HR_PROCESS_ERRORS)))
			hr_relay_unlock(w->relay); /* it kept the lock for this caller */
		for (uint32_t k = 0; k < q->nerrs; k++) /* what Python reports: a kernel failure */
			FZ_ASSERT(q->errs[k].err > 0 && hr_status_for_errno(q->errs[k].err) == q->errs[k].status);
		int code = rc & HR_PROCESS_CODE;
		if (code == HR_PROCESS_IDLE || code == HR_PROCESS_BROKEN)
			return;
		if (code != HR_PROCESS_CALLER)
			continue; /* FULL: errs[] reported, go on */
		/* The control plane's request (ATTACH, DETACH, PROBE, a custom
		 * domain's MAP/UNMAP): read no more than Python would, answer
		 * UNSUPP in the tail if there is one, else used length 0. */
		const struct hr_chain *c = &q->chain;
		FZ_ASSERT(c->head < q->vq.size);
		uint64_t n = hr_chain_read(c, req, sizeof(req));
		FZ_ASSERT(n <= c->read_len && n <= sizeof(req));
		uint8_t tail[4] = { HR_S_UNSUPP, 0, 0, 0 };
		hr_relay_complete(&q->vq, c, tail, c->write_len == 4 ? 4 : 0);
	}
}
