/* See hr_vq.h.  virtio 1.2 §2.7 (split virtqueues). */
#include "hr_vq.h"

#include <errno.h>
#include <string.h>

int hr_gmem_set(struct hr_gmem *m, const struct hr_gmem_region *regions, uint32_t n)
{
	if (n > HR_GMEM_MAX_REGIONS)
		return -E2BIG;
	for (uint32_t i = 0; i < n; i++) {
		if (regions[i].size == 0 || regions[i].gpa + regions[i].size - 1 < regions[i].gpa)
			return -EINVAL;
		if (i && regions[i].gpa < regions[i - 1].gpa + regions[i - 1].size)
			return -EINVAL; /* unsorted or overlapping */
	}
	memcpy(m->r, regions, n * sizeof(*regions));
	m->n = n;
	return 0;
}

void *hr_gmem_ptr(const struct hr_gmem *m, uint64_t gpa, uint64_t len)
{
	const struct hr_gmem_region *r = hr_gmem_find(m, gpa);

	if (!r || len > r->size - (gpa - r->gpa))
		return NULL;
	return (void *)(uintptr_t)(r->hva + (gpa - r->gpa));
}

int hr_vq_setup(struct hr_vq *vq, const struct hr_gmem *mem, uint32_t size,
		uint64_t desc, uint64_t avail, uint64_t used)
{
	memset(vq, 0, sizeof(*vq));
	/* §2.7: queue size is a power of 2, at most 32768; alignment per
	 * §2.7 table "Virtqueue Part Alignment": desc 16, avail 2, used 4. */
	if (size == 0 || size > 32768 || (size & (size - 1)))
		return -EINVAL;
	if ((desc & 15) || (avail & 1) || (used & 3))
		return -EINVAL;
	vq->mem = mem;
	vq->size = size;
	vq->desc = hr_gmem_ptr(mem, desc, 16ull * size);
	vq->avail = hr_gmem_ptr(mem, avail, 6 + 2ull * size);
	vq->used = hr_gmem_ptr(mem, used, 6 + 8ull * size);
	if (!vq->desc || !vq->avail || !vq->used)
		return -EFAULT;
	/* Resume where the ring is (a VMM may set up a queue the driver used). */
	vq->used_idx = __atomic_load_n(&vq->used->idx, __ATOMIC_ACQUIRE);
	vq->last_avail = vq->used_idx;
	vq->ready = 1;
	return 0;
}

uint32_t hr_vq_pending(struct hr_vq *vq)
{
	if (!vq->ready || vq->broken)
		return 0;
	uint16_t idx = __atomic_load_n(&vq->avail->idx, __ATOMIC_ACQUIRE);
	return hr_vq_avail_ok(vq, idx) ? (uint16_t)(idx - vq->last_avail) : 0;
}

static int add_seg(struct hr_chain *c, const struct hr_gmem *mem, uint64_t addr, uint32_t len,
		   int writable)
{
	if (!writable && c->wseen)
		return HR_VQ_ORDER; /* §2.7.4.2: readable before writable */
	if (writable)
		c->wseen = 1;
	/* A zero-length descriptor carries no byte, so it is not kept (only its
	 * direction counts, above): its address need not be in guest RAM, and
	 * no segment without a host address reaches hr_chain_read/write
	 * (memcpy from NULL is undefined even for 0 bytes). */
	if (!len)
		return HR_VQ_OK;
	void *p = hr_gmem_ptr(mem, addr, len);
	if (!p)
		return HR_VQ_BAD_ADDR;
	if (writable) {
		if (c->nwrite == HR_CHAIN_MAX_SEGS)
			return HR_VQ_TOO_LONG;
		c->wr[c->nwrite++] = (struct hr_seg){ (uint64_t)(uintptr_t)p, len };
		c->write_len += len;
	} else {
		if (c->nread == HR_CHAIN_MAX_SEGS)
			return HR_VQ_TOO_LONG;
		c->rd[c->nread++] = (struct hr_seg){ (uint64_t)(uintptr_t)p, len };
		c->read_len += len;
	}
	return HR_VQ_OK;
}

/* Walk one descriptor table (the ring's own, or an indirect one). */
static int walk(struct hr_chain *c, const struct hr_gmem *mem, const struct vring_desc *table,
		uint32_t count, uint32_t first, int indirect_ok)
{
	uint32_t i = first;

	for (uint32_t steps = 0;; steps++) {
		if (steps >= count)
			return HR_VQ_LOOP; /* more descriptors than the table has */
		if (i >= count)
			return HR_VQ_BAD_NEXT;
		struct vring_desc d;
		memcpy(&d, &table[i], sizeof(d)); /* one snapshot: the driver may race */
		if (d.flags & VRING_DESC_F_INDIRECT) {
			/* §2.7.5.3.1: no nested indirect, no NEXT with INDIRECT,
			 * whole number of descriptors. */
			if (!indirect_ok || (d.flags & VRING_DESC_F_NEXT) || d.len == 0 || d.len % 16)
				return HR_VQ_BAD_INDIRECT;
			const struct vring_desc *ind = hr_gmem_ptr(mem, d.addr, d.len);
			if (!ind || (d.addr & 15))
				return HR_VQ_BAD_INDIRECT;
			return walk(c, mem, ind, d.len / 16, 0, 0);
		}
		int rc = add_seg(c, mem, d.addr, d.len, d.flags & VRING_DESC_F_WRITE);
		if (rc)
			return rc;
		if (!(d.flags & VRING_DESC_F_NEXT))
			return HR_VQ_OK;
		i = d.next;
	}
}

int hr_vq_pop(struct hr_vq *vq, struct hr_chain *chain, int *why)
{
	if (!hr_vq_pending(vq))
		return 0;
	uint16_t slot = vq->last_avail & (vq->size - 1);
	uint32_t head = __atomic_load_n(&vq->avail->ring[slot], __ATOMIC_RELAXED);

	vq->last_avail++;
	chain->nread = chain->nwrite = chain->wseen = 0;
	chain->read_len = chain->write_len = 0;
	int rc;
	if (head >= vq->size) {
		vq->broken = 1;
		chain->head = UINT32_MAX; /* never a descriptor: nothing to complete */
		rc = HR_VQ_BAD_HEAD;
	} else {
		chain->head = head;
		rc = walk(chain, vq->mem, vq->desc, vq->size, head, 1);
	}
	if (why)
		*why = rc;
	return rc == HR_VQ_OK ? 1 : -1;
}

void hr_vq_push(struct hr_vq *vq, uint32_t head, uint32_t len)
{
	hr_vq_put(vq, head, len);
	hr_vq_publish(vq);
}

uint64_t hr_chain_read(const struct hr_chain *c, void *buf, uint64_t cap)
{
	uint64_t done = 0;

	for (uint32_t i = 0; i < c->nread && done < cap; i++) {
		uint64_t n = c->rd[i].len < cap - done ? c->rd[i].len : cap - done;
		memcpy((char *)buf + done, (const void *)(uintptr_t)c->rd[i].hva, n);
		done += n;
	}
	return done;
}

uint64_t hr_chain_write(const struct hr_chain *c, const void *buf, uint64_t len)
{
	uint64_t done = 0;

	for (uint32_t i = 0; i < c->nwrite && done < len; i++) {
		uint64_t n = c->wr[i].len < len - done ? c->wr[i].len : len - done;
		memcpy((void *)(uintptr_t)c->wr[i].hva, (const char *)buf + done, n);
		done += n;
	}
	return done;
}
