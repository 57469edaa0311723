/* See hr_stream.h.  The ioctls are issued here directly, not through
 * hr_vfio.c's / hr_iommufd.c's wrappers, so that not even the test hook's
 * check is in the baseline (as hr_vfio_bench_map_unmap). */
#include "hr_stream.h"

#include <errno.h>
#include <sys/ioctl.h>
#include <linux/vfio.h>
#ifdef HR_HAVE_IOMMUFD
#include <linux/iommufd.h>
#endif

/* virtio-iommu MAP flags (virtio 1.2 §5.13.6.5). */
#define F_READ 1u
#define F_WRITE 2u

int hr_stream_raw_type1(int container_fd, uint64_t hva_base, const struct hr_stream_op *ops, uint32_t n,
			uint32_t *failed)
{
	for (uint32_t i = 0; i < n; i++) {
		const struct hr_stream_op *op = &ops[i];
		uint64_t size = op->end - op->start + 1;
		int rc;
		if (op->unmap) {
			/* type1v2 removes every whole mapping inside the range, and
			 * refuses (EINVAL) one that would split a mapping; it writes
			 * the bytes removed back into size (Linux 6.12
			 * drivers/vfio/vfio_iommu_type1.c vfio_dma_do_unmap). */
			struct vfio_iommu_type1_dma_unmap u = { .argsz = sizeof(u), .iova = op->start, .size = size };
			rc = ioctl(container_fd, VFIO_IOMMU_UNMAP_DMA, &u) < 0 ? -errno : u.size == size ? 0 : -EIO;
		} else {
			struct vfio_iommu_type1_dma_map m = {
				.argsz = sizeof(m),
				.flags = (op->flags & F_READ ? VFIO_DMA_MAP_FLAG_READ : 0) |
					 (op->flags & F_WRITE ? VFIO_DMA_MAP_FLAG_WRITE : 0),
				.vaddr = hva_base + op->phys, .iova = op->start, .size = size,
			};
			rc = ioctl(container_fd, VFIO_IOMMU_MAP_DMA, &m) < 0 ? -errno : 0;
		}
		if (rc) {
			*failed = i;
			return rc;
		}
	}
	return 0;
}

int hr_stream_raw_ioas(int iommufd, uint32_t ioas_id, uint64_t hva_base, const struct hr_stream_op *ops,
		       uint32_t n, uint32_t *failed)
{
#ifdef HR_HAVE_IOMMUFD
	for (uint32_t i = 0; i < n; i++) {
		const struct hr_stream_op *op = &ops[i];
		uint64_t size = op->end - op->start + 1;
		int rc;
		if (op->unmap) {
			/* Removes every whole area inside the range, refuses one that
			 * would split an area, and writes the bytes removed back into
			 * length (Linux >= 6.2 drivers/iommu/iommufd/ioas.c
			 * iommufd_ioas_unmap). */
			struct iommu_ioas_unmap u = { .size = sizeof(u), .ioas_id = ioas_id, .iova = op->start, .length = size };
			rc = ioctl(iommufd, IOMMU_IOAS_UNMAP, &u) < 0 ? -errno : u.length == size ? 0 : -EIO;
		} else {
			struct iommu_ioas_map m = {
				.size = sizeof(m),
				.flags = IOMMU_IOAS_MAP_FIXED_IOVA | (op->flags & F_READ ? IOMMU_IOAS_MAP_READABLE : 0) |
					 (op->flags & F_WRITE ? IOMMU_IOAS_MAP_WRITEABLE : 0),
				.ioas_id = ioas_id, .user_va = hva_base + op->phys, .length = size, .iova = op->start,
			};
			rc = ioctl(iommufd, IOMMU_IOAS_MAP, &m) < 0 ? -errno : 0;
		}
		if (rc) {
			*failed = i;
			return rc;
		}
	}
	return 0;
#else
	(void)iommufd, (void)ioas_id, (void)hva_base, (void)ops, (void)n;
	*failed = 0;
	return -ENOSYS;
#endif
}
