/* hostrelay: iommufd ioctl wrappers (Linux >= 6.6 for VFIO device cdevs).
 *
 * Built only where <linux/iommufd.h> and the VFIO cdev ioctls exist (see
 * cext/build_native.py): Debian 12's linux-libc-dev 6.1 has neither, so the
 * headers come from bookworm-backports' linux-libc-dev 6.12 (cext/uapi.py).
 * Each wrapper is one ioctl; it returns 0 or -errno, like hr_vfio.c's, and
 * goes through the same test hook (HR_VFIO_OP_IOAS_MAP and the others of
 * enum hr_vfio_op, cext/hr_hook.h): an injected failure returns before the
 * ioctl and writes no output but a zero unmapped count.
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
_Static_assert(sizeof(struct iommu_ioas_copy) == 40, "struct iommu_ioas_copy");
_Static_assert(sizeof(struct iommu_option) == 24, "struct iommu_option");
_Static_assert(sizeof(struct iommu_hw_info) == 40, "struct iommu_hw_info");
_Static_assert(sizeof(struct iommu_hw_info_vtd) == 24, "struct iommu_hw_info_vtd");

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
/* IOMMU_IOAS_COPY (Linux >= 6.2): the mapping at [src_iova, src_iova + length)
 * of src_ioas_id, which must be exactly one IOMMU_IOAS_MAP'ed range (or
 * several whole ones), mapped again in dst_ioas_id at dst_iova (flags as for
 * MAP: FIXED_IOVA, READABLE, WRITEABLE). */
int hr_iommufd_ioas_copy(int iommufd, uint32_t dst_ioas_id, uint32_t src_ioas_id, uint32_t flags,
			 uint64_t src_iova, uint64_t dst_iova, uint64_t length);
/* IOMMU_OPTION (Linux >= 6.2): op IOMMU_OPTION_OP_GET writes the value to
 * *val, IOMMU_OPTION_OP_SET sets *val. */
int hr_iommufd_option(int iommufd, uint32_t option_id, uint16_t op, uint32_t object_id, uint64_t *val);
/* IOMMU_GET_HW_INFO (Linux >= 6.6) for bound device dev_id: up to *data_len
 * bytes of the driver's data into data (the rest of the buffer zeroed);
 * *data_len becomes the length the driver has. */
int hr_iommufd_get_hw_info(int iommufd, uint32_t dev_id, void *data, uint32_t *data_len, uint32_t *out_data_type,
			   uint64_t *out_capabilities);

/* The benchmark's raw loop (tests/bench_iommufd.py): count IOMMU_IOAS_MAP +
 * IOMMU_IOAS_UNMAP pairs of size bytes on one IOAS, cycling over spread
 * pages; 0 or -errno (-EIO: an unmap removed other than size bytes). */
int hr_iommufd_bench_map_unmap(int iommufd, uint32_t ioas_id, uint64_t vaddr, uint64_t iova, uint64_t size,
			       uint32_t count, uint32_t spread);

#endif
