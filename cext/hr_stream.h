/* hostrelay: the raw baseline for replaying a captured guest request stream
 * (tests/bench_stream.py), never a way to serve a guest.
 *
 * A stream is an array of MAP/UNMAP requests as a guest's virtio-iommu
 * driver sent them (tests/stream_capture.py); these loops forward it 1:1 as
 * the kernel's own ioctls with no bookkeeping at all, the floor the relay's
 * ring is measured against.
 */
#ifndef HR_STREAM_H
#define HR_STREAM_H

#include <stdint.h>

/* One request: [start, end] inclusive as in virtio-iommu (§5.13.6.5/6);
 * for a MAP, phys is the guest-physical address and flags the request's
 * VIRTIO_IOMMU_MAP_F_READ (1) / _WRITE (2). */
struct hr_stream_op {
	uint64_t start;
	uint64_t end;
	uint64_t phys;
	uint32_t flags;
	uint32_t unmap; /* 0: MAP, 1: UNMAP */
};

/* Forward ops[0..n) as VFIO_IOMMU_MAP_DMA / VFIO_IOMMU_UNMAP_DMA on a type1
 * container, vaddr = hva_base + phys.  Returns 0, or -errno of the first
 * failing ioctl (-EIO: an UNMAP removed other than the bytes it named) with
 * its index in *failed. */
int hr_stream_raw_type1(int container_fd, uint64_t hva_base, const struct hr_stream_op *ops, uint32_t n,
			uint32_t *failed);
/* The same as IOMMU_IOAS_MAP (FIXED_IOVA) / IOMMU_IOAS_UNMAP on one IOAS.
 * -ENOSYS in a build without the iommufd uapi. */
int hr_stream_raw_ioas(int iommufd, uint32_t ioas_id, uint64_t hva_base, const struct hr_stream_op *ops,
		       uint32_t n, uint32_t *failed);

#endif
