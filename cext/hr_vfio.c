/* See hr_vfio.h.  Each wrapper is one ioctl; -errno on failure. */
#include "hr_vfio.h"

#include <errno.h>
#include <string.h>
#include <sys/ioctl.h>

static inline int hr_ret(int rc)
{
	return rc < 0 ? -errno : rc;
}

int hr_vfio_get_api_version(int container_fd)
{
	return hr_ret(ioctl(container_fd, VFIO_GET_API_VERSION));
}

int hr_vfio_check_extension(int container_fd, int extension)
{
	/* The extension id is passed by value, not by pointer. */
	return hr_ret(ioctl(container_fd, VFIO_CHECK_EXTENSION, (unsigned long)extension));
}

int hr_vfio_set_iommu(int container_fd, int iommu_type)
{
	return hr_ret(ioctl(container_fd, VFIO_SET_IOMMU, (unsigned long)iommu_type));
}

int hr_vfio_group_get_status(int group_fd, uint32_t *flags)
{
	struct vfio_group_status st = { .argsz = sizeof(st) };
	int rc = ioctl(group_fd, VFIO_GROUP_GET_STATUS, &st);

	if (rc < 0)
		return -errno;
	*flags = st.flags;
	return 0;
}

int hr_vfio_group_set_container(int group_fd, int container_fd)
{
	/* The kernel does get_user(fd, (int __user *)arg): a pointer to the fd. */
	return hr_ret(ioctl(group_fd, VFIO_GROUP_SET_CONTAINER, &container_fd));
}

int hr_vfio_group_unset_container(int group_fd)
{
	return hr_ret(ioctl(group_fd, VFIO_GROUP_UNSET_CONTAINER));
}

int hr_vfio_group_get_device_fd(int group_fd, const char *name)
{
	/* Returns the new device fd (already O_CLOEXEC) as the ioctl's value,
	 * which is why this cannot be done with Python's fcntl.ioctl. */
	return hr_ret(ioctl(group_fd, VFIO_GROUP_GET_DEVICE_FD, name));
}

int hr_vfio_device_get_info(int device_fd, struct vfio_device_info *info)
{
	info->argsz = sizeof(*info);
	return hr_ret(ioctl(device_fd, VFIO_DEVICE_GET_INFO, info));
}

int hr_vfio_device_get_region_info(int device_fd, struct vfio_region_info *info)
{
	info->argsz = sizeof(*info);
	return hr_ret(ioctl(device_fd, VFIO_DEVICE_GET_REGION_INFO, info));
}

int hr_vfio_device_reset(int device_fd)
{
	return hr_ret(ioctl(device_fd, VFIO_DEVICE_RESET));
}

int hr_vfio_iommu_get_info(int container_fd, void *buf, uint32_t bufsz)
{
	struct vfio_iommu_type1_info *info = buf;

	if (bufsz < sizeof(*info))
		return -EINVAL;
	memset(buf, 0, bufsz);
	info->argsz = bufsz;
	/* When the capability chain does not fit, the kernel raises argsz to
	 * the size it needs and leaves cap_offset 0 (type1, Linux >= 5.4); the
	 * caller grows the buffer and asks again. */
	return hr_ret(ioctl(container_fd, VFIO_IOMMU_GET_INFO, info));
}

int hr_vfio_map_dma(int container_fd, uint32_t flags, uint64_t vaddr,
		    uint64_t iova, uint64_t size)
{
	struct vfio_iommu_type1_dma_map map = {
		.argsz = sizeof(map),
		.flags = flags,
		.vaddr = vaddr,
		.iova = iova,
		.size = size,
	};
	return hr_ret(ioctl(container_fd, VFIO_IOMMU_MAP_DMA, &map));
}

int hr_vfio_unmap_dma(int container_fd, uint32_t flags, uint64_t iova,
		      uint64_t size, uint64_t *unmapped)
{
	struct vfio_iommu_type1_dma_unmap unmap = {
		.argsz = sizeof(unmap),
		.flags = flags,
		.iova = iova,
		.size = size,
	};
	int rc = ioctl(container_fd, VFIO_IOMMU_UNMAP_DMA, &unmap);

	if (rc < 0)
		return -errno;
	/* type1 copies the struct back with size = bytes actually unmapped. */
	*unmapped = unmap.size;
	return 0;
}

int hr_vfio_bench_map_unmap(int container_fd, uint64_t vaddr, uint64_t iova,
			    uint64_t size, uint32_t count, uint32_t spread)
{
	/* The baseline for benchmarks: the raw ioctl pair with no bookkeeping,
	 * cycling over `spread` consecutive IOVAs/pages like a guest would. */
	for (uint32_t i = 0; i < count; i++) {
		uint64_t unmapped = 0, off = spread ? (i % spread) * size : 0;
		int rc = hr_vfio_map_dma(container_fd,
					 VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
					 vaddr + off, iova + off, size);
		if (rc < 0)
			return rc;
		rc = hr_vfio_unmap_dma(container_fd, 0, iova + off, size, &unmapped);
		if (rc < 0)
			return rc;
		if (unmapped != size)
			return -EIO;
	}
	return 0;
}
