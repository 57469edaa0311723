/* See hr_vfio.h.  Each wrapper is one ioctl (or close); -errno on failure. */
#include "hr_vfio.h"
#include "hr_hook.h"

#include <errno.h>
#include <stddef.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

static inline int hr_ret(int rc)
{
	return rc < 0 ? -errno : rc;
}

/* ------------------------------------------------------------ test hook */

/* The state and HOOK()/INJECT() are in hr_hook.h: hr_iommufd.c uses them too. */
struct hr_hook hr_hook = { .failed_fd = -1 };

int hr_hook_call(uint32_t op, int fd)
{
	if (hr_hook.counting)
		hr_hook.calls[__builtin_ctz(op)]++;
	if (!(hr_hook.mask & op))
		return 0;
	if (hr_hook.nth) {
		hr_hook.nth--;
		return 0;
	}
	hr_hook.mask = 0;
	hr_hook.on = hr_hook.counting;
	hr_hook.failed_fd = fd;
	return -hr_hook.err;
}

void hr_vfio_fail_next(uint32_t op_mask, uint32_t nth, int err)
{
	hr_hook.mask = err > 0 ? op_mask & HR_VFIO_OP_ALL : 0;
	hr_hook.nth = nth;
	hr_hook.err = err;
	hr_hook.on = hr_hook.counting | hr_hook.mask;
}

int hr_vfio_fail_pending(void)
{
	return hr_hook.mask != 0;
}

int hr_vfio_fail_fd(void)
{
	return hr_hook.failed_fd;
}

void hr_vfio_count_calls(int on)
{
	if (on) {
		memset(hr_hook.calls, 0, sizeof(hr_hook.calls));
		hr_hook.failed_fd = -1;
	}
	hr_hook.counting = !!on;
	hr_hook.on = hr_hook.counting | hr_hook.mask;
}

uint64_t hr_vfio_call_count(uint32_t op_mask)
{
	uint64_t n = 0;

	for (int i = 0; i < HR_VFIO_NOPS; i++)
		if (op_mask & (1u << i))
			n += hr_hook.calls[i];
	return n;
}

/* ------------------------------------------------------------- wrappers */

int hr_vfio_get_api_version(int container_fd)
{
	INJECT(HR_VFIO_OP_GET_API_VERSION, container_fd);
	return hr_ret(ioctl(container_fd, VFIO_GET_API_VERSION));
}

int hr_vfio_check_extension(int container_fd, int extension)
{
	INJECT(HR_VFIO_OP_CHECK_EXTENSION, container_fd);
	/* The extension id is passed by value, not by pointer. */
	return hr_ret(ioctl(container_fd, VFIO_CHECK_EXTENSION, (unsigned long)extension));
}

int hr_vfio_set_iommu(int container_fd, int iommu_type)
{
	INJECT(HR_VFIO_OP_SET_IOMMU, container_fd);
	return hr_ret(ioctl(container_fd, VFIO_SET_IOMMU, (unsigned long)iommu_type));
}

int hr_vfio_group_get_status(int group_fd, uint32_t *flags)
{
	INJECT(HR_VFIO_OP_GROUP_GET_STATUS, group_fd);
	struct vfio_group_status st = { .argsz = sizeof(st) };
	int rc = ioctl(group_fd, VFIO_GROUP_GET_STATUS, &st);

	if (rc < 0)
		return -errno;
	*flags = st.flags;
	return 0;
}

int hr_vfio_group_set_container(int group_fd, int container_fd)
{
	INJECT(HR_VFIO_OP_GROUP_SET_CONTAINER, group_fd);
	/* The kernel does get_user(fd, (int __user *)arg): a pointer to the fd. */
	return hr_ret(ioctl(group_fd, VFIO_GROUP_SET_CONTAINER, &container_fd));
}

int hr_vfio_group_unset_container(int group_fd)
{
	INJECT(HR_VFIO_OP_GROUP_UNSET_CONTAINER, group_fd);
	return hr_ret(ioctl(group_fd, VFIO_GROUP_UNSET_CONTAINER));
}

int hr_vfio_group_get_device_fd(int group_fd, const char *name)
{
	INJECT(HR_VFIO_OP_GROUP_GET_DEVICE_FD, group_fd);
	/* Returns the new device fd (already O_CLOEXEC) as the ioctl's value,
	 * which is why this cannot be done with Python's fcntl.ioctl. */
	return hr_ret(ioctl(group_fd, VFIO_GROUP_GET_DEVICE_FD, name));
}

int hr_vfio_device_get_info(int device_fd, struct vfio_device_info *info)
{
	INJECT(HR_VFIO_OP_DEVICE_GET_INFO, device_fd);
	info->argsz = sizeof(*info);
	return hr_ret(ioctl(device_fd, VFIO_DEVICE_GET_INFO, info));
}

int hr_vfio_device_get_region_info(int device_fd, struct vfio_region_info *info)
{
	INJECT(HR_VFIO_OP_DEVICE_GET_REGION_INFO, device_fd);
	info->argsz = sizeof(*info);
	return hr_ret(ioctl(device_fd, VFIO_DEVICE_GET_REGION_INFO, info));
}

int hr_vfio_device_reset(int device_fd)
{
	INJECT(HR_VFIO_OP_DEVICE_RESET, device_fd);
	return hr_ret(ioctl(device_fd, VFIO_DEVICE_RESET));
}

int hr_vfio_iommu_get_info(int container_fd, void *buf, uint32_t bufsz)
{
	INJECT(HR_VFIO_OP_IOMMU_GET_INFO, container_fd);
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

/* The two ioctls of the data plane, without the hook: the wrappers below
 * add it, the benchmark's baseline loop uses these bare. */
static inline int raw_map_dma(int container_fd, uint32_t flags, uint64_t vaddr, uint64_t iova,
			      uint64_t size)
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

static inline int raw_unmap_dma(int container_fd, uint32_t flags, uint64_t iova, uint64_t size,
				uint64_t *unmapped)
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

int hr_vfio_map_dma(int container_fd, uint32_t flags, uint64_t vaddr,
		    uint64_t iova, uint64_t size)
{
	INJECT(HR_VFIO_OP_MAP_DMA, container_fd);
	return raw_map_dma(container_fd, flags, vaddr, iova, size);
}

int hr_vfio_unmap_dma(int container_fd, uint32_t flags, uint64_t iova,
		      uint64_t size, uint64_t *unmapped)
{
	INJECT(HR_VFIO_OP_UNMAP_DMA, container_fd);
	return raw_unmap_dma(container_fd, flags, iova, size, unmapped);
}

/* ------------------------------------------------------- dirty logging */

int hr_vfio_dirty_pages(int container_fd, uint32_t flags)
{
	INJECT(HR_VFIO_OP_DIRTY_PAGES, container_fd);
	struct vfio_iommu_type1_dirty_bitmap dirty = { .argsz = sizeof(dirty), .flags = flags };

	return hr_ret(ioctl(container_fd, VFIO_IOMMU_DIRTY_PAGES, &dirty));
}

int hr_vfio_dirty_get_bitmap(int container_fd, uint64_t iova, uint64_t size, uint64_t pgsize,
			     uint64_t *bitmap, uint64_t bitmap_size)
{
	INJECT(HR_VFIO_OP_DIRTY_PAGES, container_fd);
	/* The header and its GET payload in one buffer: the kernel reads the
	 * payload from dirty.data[] (argsz counts it, not the bitmap). */
	struct {
		struct vfio_iommu_type1_dirty_bitmap dirty;
		struct vfio_iommu_type1_dirty_bitmap_get get;
	} req;

	_Static_assert(offsetof(__typeof__(req), get) == sizeof(struct vfio_iommu_type1_dirty_bitmap),
		       "GET payload right after the header");
	memset(&req, 0, sizeof(req));
	req.dirty.argsz = sizeof(req);
	req.dirty.flags = VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP;
	req.get.iova = iova;
	req.get.size = size;
	req.get.bitmap.pgsize = pgsize;
	req.get.bitmap.size = bitmap_size;
	req.get.bitmap.data = (__u64 *)bitmap;
	return hr_ret(ioctl(container_fd, VFIO_IOMMU_DIRTY_PAGES, &req));
}

int hr_vfio_unmap_dma_dirty(int container_fd, uint64_t iova, uint64_t size, uint64_t pgsize,
			    uint64_t *bitmap, uint64_t bitmap_size, uint64_t *unmapped)
{
	INJECT(HR_VFIO_OP_UNMAP_DMA_DIRTY, container_fd);
	/* struct vfio_bitmap follows the unmap struct in its data[] (argsz
	 * counts both; Linux >= 5.8 vfio_iommu_type1_unmap_dma). */
	struct {
		struct vfio_iommu_type1_dma_unmap unmap;
		struct vfio_bitmap bitmap;
	} req;

	_Static_assert(offsetof(__typeof__(req), bitmap) == sizeof(struct vfio_iommu_type1_dma_unmap),
		       "bitmap right after the unmap struct");
	memset(&req, 0, sizeof(req));
	req.unmap.argsz = sizeof(req);
	req.unmap.flags = VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP;
	req.unmap.iova = iova;
	req.unmap.size = size;
	req.bitmap.pgsize = pgsize;
	req.bitmap.size = bitmap_size;
	req.bitmap.data = (__u64 *)bitmap;
	int rc = ioctl(container_fd, VFIO_IOMMU_UNMAP_DMA, &req);

	if (rc < 0)
		return -errno;
	*unmapped = req.unmap.size;
	return 0;
}

int hr_vfio_close(int fd)
{
	int inj = HOOK(HR_VFIO_OP_CLOSE, fd);
	/* Closed even when the hook makes up a failure: Linux (6.12 as in all
	 * earlier versions, see close(2)) releases the descriptor first and
	 * only then runs the steps that can fail, so a failing close has
	 * still closed the fd, and that is what the caller must see. */
	int rc = hr_ret(close(fd));

	return inj ? inj : rc;
}

int hr_vfio_bench_map_unmap(int container_fd, uint64_t vaddr, uint64_t iova,
			    uint64_t size, uint32_t count, uint32_t spread)
{
	/* The baseline for benchmarks: the raw ioctl pair with no bookkeeping
	 * (not even the test hook's check), cycling over `spread` consecutive
	 * IOVAs/pages like a guest would. */
	for (uint32_t i = 0; i < count; i++) {
		uint64_t unmapped = 0, off = spread ? (i % spread) * size : 0;
		int rc = raw_map_dma(container_fd, VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
				     vaddr + off, iova + off, size);
		if (rc < 0)
			return rc;
		rc = raw_unmap_dma(container_fd, 0, iova + off, size, &unmapped);
		if (rc < 0)
			return rc;
		if (unmapped != size)
			return -EIO;
	}
	return 0;
}
