/* The ring targets' shared input layout (fuzz_ring.c, fuzz_ring_race.c). */
#ifndef HR_FUZZ_RING_H
#define HR_FUZZ_RING_H

#include <errno.h>
#include <string.h>

#include "harness.h"

struct fz_ring_hdr {
	uint8_t qlog;        /* queue size = 1 << (qlog % 16); bad sizes too */
	uint8_t ncont;       /* containers behind domain 2 (0..3) */
	uint8_t fail_nth;    /* the kernel call that fails... */
	uint8_t fail_err;    /* ...and with which errno (0: none) */
	uint16_t desc, avail, used; /* ring offsets in guest RAM */
	uint8_t navail;      /* chains made available before the first kick */
	uint8_t navail2;     /* and before the second */
	uint8_t entry_limit; /* dma_entry_limit - 1 */
	uint8_t memlock;     /* RLIMIT_MEMLOCK in pages (0: unlimited) */
	uint16_t pad;
};

/* The errnos a MAP_DMA/UNMAP_DMA can give (Linux 6.12 vfio_iommu_type1). */
static inline int fz_errno(uint8_t i)
{
	static const int errs[] = { 0, ENOMEM, ENOSPC, EINVAL, EFAULT, EBUSY, EIO, ENODEV, EEXIST, EPERM };
	return errs[i % (sizeof(errs) / sizeof(errs[0]))];
}

/* The input's bytes become the first two RAM regions (adjacent GPAs). */
static inline void fz_ring_load(struct fz_world *w, const uint8_t *data, size_t size)
{
	size_t a = size < FZ_REGION ? size : FZ_REGION;

	memcpy(w->ram[0], data, a);
	if (size > a)
		memcpy(w->ram[1], data + a, size - a < FZ_REGION ? size - a : FZ_REGION);
}

/* Set the queue up where the header says; the avail index is the used
 * index plus navail, so a run stays short. */
static inline int fz_ring_setup(struct fz_world *w, const struct fz_ring_hdr *h, struct hr_queue *q)
{
	uint32_t qsize = 1u << (h->qlog % 16);
	if (h->qlog & 0x80)
		qsize += h->qlog & 0x7F ? 1 : 0; /* not a power of two: must be refused */
	memset(q, 0, sizeof(*q));
	if (hr_vq_setup(&q->vq, hr_relay_memory(w->relay), qsize, h->desc, h->avail, h->used))
		return -1;
	q->vq.avail->idx = (uint16_t)(q->vq.used_idx + h->navail);
	return 0;
}

static inline void fz_ring_kick(struct hr_queue *q, uint8_t more)
{
	__atomic_store_n(&q->vq.avail->idx, (uint16_t)(q->vq.avail->idx + more), __ATOMIC_RELEASE);
}

#endif
