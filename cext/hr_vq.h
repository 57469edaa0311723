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
};

/* Why a chain was refused (hr_vq_pop returns -1 and sets chain->head). */
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

int hr_vq_setup(struct hr_vq *vq, const struct hr_gmem *mem, uint32_t size,
                uint64_t desc, uint64_t avail, uint64_t used);
int hr_vq_pop(struct hr_vq *vq, struct hr_chain *chain, int *why);
void hr_vq_push(struct hr_vq *vq, uint32_t head, uint32_t len);
uint32_t hr_vq_pending(const struct hr_vq *vq);
uint64_t hr_chain_read(const struct hr_chain *c, void *buf, uint64_t cap);
uint64_t hr_chain_write(const struct hr_chain *c, const void *buf, uint64_t len);

#endif
