/* hostrelay: iommufd ioctl wrappers (Linux >= 6.6 for VFIO device cdevs).
 *
 * Built only where <linux/iommufd.h> and the VFIO cdev ioctls exist (see
 * cext/build_native.py): Debian 12's linux-libc-dev 6.1 has neither, so the
 * headers come from bookworm-backports' linux-libc-dev 6.12 (cext/uapi.py).
 * Each wrapper is one ioctl; it returns 0 or -errno, like hr_vfio.c's.
 */
#ifndef HR_IOMMUFD_H
#define HR_IOMMUFD_H

#include <stdint.h>
#include <linux/iommufd.h>
#include <linux/vfio.h>

/* The layouts this file relies on, as the 6.12 uapi defines them. */
_Static_assert(sizeof(struct iommu_ioas_map) == 40, "struct iommu_ioas_map");
_Static_assert(sizeof(struct iommu_ioas_unmap) == 24, "struct iommu_ioas_unmap");
_Static_assert(sizeof(struct vfio_device_bind_iommufd) == 16, "struct vfio_device_bind_iommufd");
_Static_assert(sizeof(struct vfio_device_attach_iommufd_pt) == 12, "struct vfio_device_attach_iommufd_pt");

int hr_iommufd_ioas_alloc(int iommufd, uint32_t *ioas_id);
int hr_iommufd_destroy(int iommufd, uint32_t id);
int hr_iommufd_ioas_map(int iommufd, uint32_t ioas_id, uint32_t flags, uint64_t vaddr, uint64_t iova,
			uint64_t length);
int hr_iommufd_ioas_unmap(int iommufd, uint32_t ioas_id, uint64_t iova, uint64_t length, uint64_t *unmapped);
int hr_iommufd_ioas_iova_ranges(int iommufd, uint32_t ioas_id, uint64_t *pairs, uint32_t max, uint32_t *num,
				uint64_t *alignment);
int hr_iommufd_device_bind(int device_fd, int iommufd, uint32_t *dev_id);
int hr_iommufd_device_attach(int device_fd, uint32_t pt_id, uint32_t *out_pt_id);
int hr_iommufd_device_detach(int device_fd);

#endif
