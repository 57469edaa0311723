/* See hr_iommufd.h.  Each wrapper is one ioctl; -errno on failure. */
#include "hr_iommufd.h"

#include <errno.h>
#include <string.h>
#include <sys/ioctl.h>

static inline int ret(int rc)
{
	return rc < 0 ? -errno : 0;
}

int hr_iommufd_ioas_alloc(int iommufd, uint32_t *ioas_id)
{
	struct iommu_ioas_alloc a = { .size = sizeof(a) };
	int rc = ret(ioctl(iommufd, IOMMU_IOAS_ALLOC, &a));
	if (!rc)
		*ioas_id = a.out_ioas_id;
	return rc;
}

int hr_iommufd_destroy(int iommufd, uint32_t id)
{
	struct iommu_destroy d = { .size = sizeof(d), .id = id };
	return ret(ioctl(iommufd, IOMMU_DESTROY, &d));
}

int hr_iommufd_ioas_map(int iommufd, uint32_t ioas_id, uint32_t flags, uint64_t vaddr, uint64_t iova,
			uint64_t length)
{
	struct iommu_ioas_map m = {
		.size = sizeof(m), .flags = flags, .ioas_id = ioas_id,
		.user_va = vaddr, .length = length, .iova = iova,
	};
	return ret(ioctl(iommufd, IOMMU_IOAS_MAP, &m));
}

int hr_iommufd_ioas_unmap(int iommufd, uint32_t ioas_id, uint64_t iova, uint64_t length, uint64_t *unmapped)
{
	struct iommu_ioas_unmap u = { .size = sizeof(u), .ioas_id = ioas_id, .iova = iova, .length = length };
	int rc = ret(ioctl(iommufd, IOMMU_IOAS_UNMAP, &u));
	/* The kernel writes back how many bytes it unmapped (Linux >= 6.2). */
	*unmapped = rc ? 0 : u.length;
	return rc;
}

int hr_iommufd_ioas_iova_ranges(int iommufd, uint32_t ioas_id, uint64_t *pairs, uint32_t max, uint32_t *num,
				uint64_t *alignment)
{
	struct iommu_iova_range ranges[64];
	struct iommu_ioas_iova_ranges r = {
		.size = sizeof(r), .ioas_id = ioas_id,
		.num_iovas = max < 64 ? max : 64, .allowed_iovas = (uintptr_t)ranges,
	};
	int rc = ret(ioctl(iommufd, IOMMU_IOAS_IOVA_RANGES, &r));
	/* EMSGSIZE: more ranges than room; num_iovas then says how many there are. */
	*num = r.num_iovas;
	if (rc)
		return rc;
	*alignment = r.out_iova_alignment;
	for (uint32_t i = 0; i < r.num_iovas && i < max && i < 64; i++) {
		pairs[2 * i] = ranges[i].start;
		pairs[2 * i + 1] = ranges[i].last;
	}
	return 0;
}

int hr_iommufd_device_bind(int device_fd, int iommufd, uint32_t *dev_id)
{
	struct vfio_device_bind_iommufd b = { .argsz = sizeof(b), .iommufd = iommufd };
	int rc = ret(ioctl(device_fd, VFIO_DEVICE_BIND_IOMMUFD, &b));
	if (!rc)
		*dev_id = b.out_devid;
	return rc;
}

int hr_iommufd_device_attach(int device_fd, uint32_t pt_id, uint32_t *out_pt_id)
{
	/* Attaching an attached device replaces its page table (Linux >= 6.9). */
	struct vfio_device_attach_iommufd_pt a = { .argsz = sizeof(a), .pt_id = pt_id };
	int rc = ret(ioctl(device_fd, VFIO_DEVICE_ATTACH_IOMMUFD_PT, &a));
	if (!rc)
		*out_pt_id = a.pt_id; /* the hardware page table the kernel chose */
	return rc;
}

int hr_iommufd_device_detach(int device_fd)
{
	struct vfio_device_detach_iommufd_pt d = { .argsz = sizeof(d) };
	return ret(ioctl(device_fd, VFIO_DEVICE_DETACH_IOMMUFD_PT, &d));
}
