/* hostrelay: split virtqueue walking over guest memory (device side).
 *
 * Layouts come from <linux/virtio_ring.h>.  virtio 1.x is little-endian and
 * so is every host hostrelay runs on (x86_64; checked below), so ring fields
 * are read directly.  Every index and address the driver gives is checked:
 * a malformed chain is reported, never followed out of bounds or forever.
 */
#ifndef HR_VQ_H
#define HR_VQ_H

#include <stddef.h>
#include <stdint.h>
#include <linux/virtio_ring.h>

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "hr_vq reads virtio 1.x rings natively: little-endian hosts only"
#endif

_Static_assert(sizeof(struct vring_desc) == 16, "vring_desc size");
_Static_assert(sizeof(struct vring_used_elem) == 8, "vring_used_elem size");

#define HR_GMEM_MAX_REGIONS 64
#define HR_CHAIN_MAX_SEGS 64

/* Guest-physical → host-virtual map (regions sorted by gpa, disjoint). */
struct hr_gmem_region {
	uint64_t gpa;
	uint64_t size;
	uint64_t hva;
};

struct hr_gmem {
	uint32_t n;
	struct hr_gmem_region r[HR_GMEM_MAX_REGIONS];
};

/* One buffer segment of a chain, already translated to a host pointer. */
struct hr_seg {
	uint64_t hva;
	uint32_t len;
};

struct hr_chain {
	uint32_t head;   /* descriptor index to complete in the used ring */
	uint32_t nread;  /* device-readable segments */
	uint32_t nwrite; /* device-writable segments */
	uint64_t read_len;
	uint64_t write_len;
	uint32_t wseen;  /* a device-writable descriptor was met (zero-length ones are not kept) */
	struct hr_seg rd[HR_CHAIN_MAX_SEGS];
	struct hr_seg wr[HR_CHAIN_MAX_SEGS];
};

struct hr_vq {
	const struct hr_gmem *mem;
	struct vring_desc *desc;
	struct vring_avail *avail;
	struct vring_used *used;
	uint32_t size;
	uint16_t last_avail;
	uint16_t used_idx;
	uint32_t ready;
	/* The driver made an impossible head available (an avail entry >= size),
	 * or moved the avail index more than size ahead (hr_vq_avail_ok): no
	 * used element can name it, so the queue stops until the device is
	 * reset (virtio 1.2 §2.1.2: DEVICE_NEEDS_RESET; QEMU's virtio_error
	 * does the same).  hr_vq_pending is then 0. */
	uint32_t broken;
};

/* Why a chain was refused (hr_vq_pop returns -1 and sets chain->head, a
 * valid descriptor index to complete with used length 0, except for
 * HR_VQ_BAD_HEAD, which breaks the queue instead: see hr_vq.broken). */
enum hr_vq_error {
	HR_VQ_OK = 0,
	HR_VQ_BAD_HEAD = 1,
	HR_VQ_BAD_NEXT = 2,
	HR_VQ_LOOP = 3,
	HR_VQ_BAD_ADDR = 4,
	HR_VQ_ORDER = 5,      /* a readable descriptor after a writable one */
	HR_VQ_BAD_INDIRECT = 6,
	HR_VQ_TOO_LONG = 7,   /* more segments than HR_CHAIN_MAX_SEGS */
};

int hr_gmem_set(struct hr_gmem *m, const struct hr_gmem_region *regions, uint32_t n);
void *hr_gmem_ptr(const struct hr_gmem *m, uint64_t gpa, uint64_t len);

/* The region holding gpa, or NULL.  Inline because every descriptor and
 * every MAP translates through it: VMMs have one to a few RAM regions, so
 * a short scan beats a call (and, under TCG, the indirect return). */
static inline const struct hr_gmem_region *hr_gmem_find(const struct hr_gmem *m, uint64_t gpa)
{
	uint32_t lo = 0, hi = m->n;

	if (hi <= 4) {
		for (; lo < hi; lo++)
			if (gpa - m->r[lo].gpa < m->r[lo].size)
				return &m->r[lo];
		return NULL;
	}
	while (lo < hi) { /* the last region starting at or below gpa */
		uint32_t mid = (lo + hi) / 2;
		if (m->r[mid].gpa <= gpa)
			lo = mid + 1;
		else
			hi = mid;
	}
	if (lo == 0 || gpa - m->r[lo - 1].gpa >= m->r[lo - 1].size)
		return NULL;
	return &m->r[lo - 1];
}

/* hr_gmem_ptr trying the region *hot first and remembering the hit:
 * a ring's buffers come from one region nearly always.  *hot points into
 * m->r (or at a zero-size region to start with) and lives in the caller's
 * frame for one burst, during which the regions do not change. */
static inline void *hr_gmem_xlate(const struct hr_gmem *m, const struct hr_gmem_region **hot,
				  uint64_t gpa, uint64_t len)
{
	const struct hr_gmem_region *r = *hot;
	uint64_t off = gpa - r->gpa;

	if (off >= r->size) {
		r = hr_gmem_find(m, gpa);
		if (!r)
			return NULL;
		*hot = r;
		off = gpa - r->gpa;
	}
	if (len > r->size - off)
		return NULL;
	return (void *)(uintptr_t)(r->hva + off);
}


int hr_vq_setup(struct hr_vq *vq, const struct hr_gmem *mem, uint32_t size,
                uint64_t desc, uint64_t avail, uint64_t used);
int hr_vq_pop(struct hr_vq *vq, struct hr_chain *chain, int *why);
void hr_vq_push(struct hr_vq *vq, uint32_t head, uint32_t len);

/* hr_vq_push in two halves, so a burst publishes the used index once
 * (§2.7.8 lets the device update idx after several elements). */
static inline void hr_vq_put(struct hr_vq *vq, uint32_t head, uint32_t len)
{
	struct vring_used_elem *e = &vq->used->ring[vq->used_idx & (vq->size - 1)];

	e->id = head;
	e->len = len;
	vq->used_idx++;
}

static inline void hr_vq_publish(struct hr_vq *vq)
{
	/* §2.7.8: the elements must be visible before the index that exposes them. */
	__atomic_store_n(&vq->used->idx, vq->used_idx, __ATOMIC_RELEASE);
}

/* The shape of nearly every virtio-iommu request: one direct
 * device-readable descriptor chained to one direct device-writable one. */
struct hr_pair {
	uint32_t head;
	uint32_t rlen;
	uint32_t wlen;
	const uint8_t *rd;
	uint8_t *wr;
};

/* If the next available chain (the caller knows there is one) has exactly
 * that shape, a readable part of at most max_rlen bytes and both buffers in
 * guest RAM, take it and return 1.  Otherwise take nothing and return 0:
 * hr_vq_pop's general walk then decides, malformed chains included, so this
 * shortcut never changes an outcome.  Each descriptor is read once (the
 * driver may be rewriting it).  hot: see hr_gmem_xlate. */
static inline int hr_vq_take_pair(struct hr_vq *vq, struct hr_pair *p, uint32_t max_rlen,
				  const struct hr_gmem_region **hot)
{
	const uint16_t shape = VRING_DESC_F_NEXT | VRING_DESC_F_WRITE | VRING_DESC_F_INDIRECT;
	uint32_t mask = vq->size - 1; /* size is a power of two (hr_vq_setup) */
	uint32_t head = __atomic_load_n(&vq->avail->ring[vq->last_avail & mask], __ATOMIC_RELAXED);
	struct vring_desc a, b;

	if (head > mask)
		return 0;
	__builtin_memcpy(&a, &vq->desc[head], sizeof(a));
	if ((a.flags & shape) != VRING_DESC_F_NEXT || a.next > mask || a.len > max_rlen)
		return 0;
	__builtin_memcpy(&b, &vq->desc[a.next], sizeof(b));
	if ((b.flags & shape) != VRING_DESC_F_WRITE) /* so b is not a: no loop */
		return 0;
	p->rd = hr_gmem_xlate(vq->mem, hot, a.addr, a.len);
	p->wr = hr_gmem_xlate(vq->mem, hot, b.addr, b.len);
	if (!p->rd || !p->wr)
		return 0;
	p->head = head;
	p->rlen = a.len;
	p->wlen = b.len;
	vq->last_avail++;
	return 1;
}
/* Chains available and not yet taken (0 once the queue is broken). */
uint32_t hr_vq_pending(struct hr_vq *vq);

/* The driver may not make more than the queue size available beyond what the
 * device has taken (§2.7.6: idx only grows, by the buffers it adds, and a
 * ring holds size of them); an avail index that says more is impossible and
 * breaks the queue (QEMU: "Guest moved avail index").  Besides being the
 * spec's, this bounds one walk: without it a guest rewriting its index
 * could keep the walker going forever. */
static inline int hr_vq_avail_ok(struct hr_vq *vq, uint16_t avail_idx)
{
	if ((uint16_t)(avail_idx - vq->last_avail) <= vq->size)
		return 1;
	vq->broken = 1;
	return 0;
}
uint64_t hr_chain_read(const struct hr_chain *c, void *buf, uint64_t cap);
uint64_t hr_chain_write(const struct hr_chain *c, const void *buf, uint64_t len);

#endif
