/* hostrelay: thin wrappers around the VFIO ioctls.
 *
 * Every function returns >= 0 on success and -errno on failure, so errno
 * survives the trip back to Python untouched (psutil-style: C carries the
 * errno, Python decides what it means).  No policy, no allocation, no logging.
 * Struct layouts and ioctl numbers come from the system <linux/vfio.h>.
 */
#ifndef HR_VFIO_H
#define HR_VFIO_H

#include <stdint.h>
#include <linux/vfio.h>

/* Layouts every later kernel keeps (uapi is append-only): checked at build
 * time so a broken header fails the build, not a DMA. */
_Static_assert(sizeof(struct vfio_iommu_type1_dma_map) == 32, "dma_map size");
_Static_assert(sizeof(struct vfio_iommu_type1_dma_unmap) == 24, "dma_unmap size");
_Static_assert(sizeof(struct vfio_iommu_type1_info) == 24, "type1_info size");
_Static_assert(sizeof(struct vfio_info_cap_header) == 8, "cap header size");
_Static_assert(sizeof(struct vfio_group_status) == 8, "group_status size");
_Static_assert(sizeof(struct vfio_region_info) == 32, "region_info size");
_Static_assert(sizeof(struct vfio_iova_range) == 16, "iova_range size");
/* Dirty page logging (Linux >= 5.8): the ioctl header, its GET_BITMAP
 * payload, the bitmap descriptor UNMAP_DMA carries after its struct, and the
 * migration capability of VFIO_IOMMU_GET_INFO. */
_Static_assert(sizeof(struct vfio_iommu_type1_dirty_bitmap) == 8, "dirty_bitmap size");
_Static_assert(sizeof(struct vfio_iommu_type1_dirty_bitmap_get) == 40, "dirty_bitmap_get size");
_Static_assert(sizeof(struct vfio_bitmap) == 24, "vfio_bitmap size");
_Static_assert(sizeof(struct vfio_iommu_type1_info_cap_migration) == 32, "cap_migration size");

int hr_vfio_get_api_version(int container_fd);
int hr_vfio_check_extension(int container_fd, int extension);
int hr_vfio_set_iommu(int container_fd, int iommu_type);
int hr_vfio_group_get_status(int group_fd, uint32_t *flags);
int hr_vfio_group_set_container(int group_fd, int container_fd);
int hr_vfio_group_unset_container(int group_fd);
int hr_vfio_group_get_device_fd(int group_fd, const char *name);
int hr_vfio_device_get_info(int device_fd, struct vfio_device_info *info);
int hr_vfio_device_get_region_info(int device_fd, struct vfio_region_info *info);
int hr_vfio_device_reset(int device_fd);
int hr_vfio_iommu_get_info(int container_fd, void *buf, uint32_t bufsz);
int hr_vfio_map_dma(int container_fd, uint32_t flags, uint64_t vaddr,
                    uint64_t iova, uint64_t size);
int hr_vfio_unmap_dma(int container_fd, uint32_t flags, uint64_t iova,
                      uint64_t size, uint64_t *unmapped);
/* Dirty page logging.  hr_vfio_dirty_pages: VFIO_IOMMU_DIRTY_PAGES with
 * flags _START or _STOP.  hr_vfio_dirty_get_bitmap: _GET_BITMAP of
 * [iova, iova+size) at pgsize into bitmap (bitmap_size bytes, zeroed by the
 * caller; bit i = page iova + i*pgsize).  hr_vfio_unmap_dma_dirty:
 * UNMAP_DMA with VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP, the same bitmap read
 * atomically with the unmap; *unmapped as hr_vfio_unmap_dma. */
int hr_vfio_dirty_pages(int container_fd, uint32_t flags);
int hr_vfio_dirty_get_bitmap(int container_fd, uint64_t iova, uint64_t size, uint64_t pgsize,
                             uint64_t *bitmap, uint64_t bitmap_size);
int hr_vfio_unmap_dma_dirty(int container_fd, uint64_t iova, uint64_t size, uint64_t pgsize,
                            uint64_t *bitmap, uint64_t bitmap_size, uint64_t *unmapped);
int hr_vfio_bench_map_unmap(int container_fd, uint64_t vaddr, uint64_t iova,
                            uint64_t size, uint32_t count, uint32_t spread);
/* close(2) of a container, group or device fd: through here so that the
 * test hook below reaches it too.  The fd is released whatever it returns. */
int hr_vfio_close(int fd);

/* Test hook: kernel calls that fail on purpose, and a count of them.
 *
 * Each wrapper above, and each iommufd wrapper of cext/iommufd/hr_iommufd.h,
 * is one operation (HR_VFIO_OP_*; the benchmark loop is not one: it is the
 * raw baseline).  hr_vfio_fail_next(mask, nth, err) arms
 * one injection: among the next calls of the operations in mask, the call
 * with index nth (0 = the very next one) returns -err without issuing its
 * ioctl, and the hook disarms itself.  HR_VFIO_OP_CLOSE is the exception:
 * the descriptor is closed anyway and only the error is made up, because
 * Linux releases an fd before close(2) can fail, so a close that "did not
 * happen" is not something the kernel can do.  hr_vfio_count_calls(1)
 * zeroes the per-operation counters and counts every wrapper call
 * (injected ones included) until hr_vfio_count_calls(0); the counters stay
 * readable after it.  hr_vfio_fail_fd() is the fd of the call that was
 * failed last (-1 if none).
 *
 * Cost when unused: each wrapper reads one word and takes a branch that is
 * never taken.  Process-wide and not synchronised: for tests that arm it
 * and make the calls from one thread (or under the relay's lock).
 */
enum hr_vfio_op {
	HR_VFIO_OP_GET_API_VERSION = 1u << 0,
	HR_VFIO_OP_CHECK_EXTENSION = 1u << 1,
	HR_VFIO_OP_SET_IOMMU = 1u << 2,
	HR_VFIO_OP_GROUP_GET_STATUS = 1u << 3,
	HR_VFIO_OP_GROUP_SET_CONTAINER = 1u << 4,
	HR_VFIO_OP_GROUP_UNSET_CONTAINER = 1u << 5,
	HR_VFIO_OP_GROUP_GET_DEVICE_FD = 1u << 6,
	HR_VFIO_OP_DEVICE_GET_INFO = 1u << 7,
	HR_VFIO_OP_DEVICE_GET_REGION_INFO = 1u << 8,
	HR_VFIO_OP_DEVICE_RESET = 1u << 9,
	HR_VFIO_OP_IOMMU_GET_INFO = 1u << 10,
	HR_VFIO_OP_MAP_DMA = 1u << 11,
	HR_VFIO_OP_UNMAP_DMA = 1u << 12,
	HR_VFIO_OP_CLOSE = 1u << 13,
	/* The iommufd wrappers (cext/iommufd/hr_iommufd.c).  Defined in every
	 * build, with or without the iommufd uapi, so the numbering and
	 * HR_VFIO_OP_ALL never depend on the headers found. */
	HR_VFIO_OP_IOAS_ALLOC = 1u << 14,
	HR_VFIO_OP_IOAS_MAP = 1u << 15,
	HR_VFIO_OP_IOAS_UNMAP = 1u << 16,
	HR_VFIO_OP_IOAS_COPY = 1u << 17,
	HR_VFIO_OP_IOAS_IOVA_RANGES = 1u << 18,
	HR_VFIO_OP_IOMMU_DESTROY = 1u << 19,
	HR_VFIO_OP_DEVICE_BIND = 1u << 20,
	HR_VFIO_OP_DEVICE_ATTACH = 1u << 21,
	HR_VFIO_OP_DEVICE_DETACH = 1u << 22,
	HR_VFIO_OP_GET_HW_INFO = 1u << 23,
	HR_VFIO_OP_OPTION = 1u << 24,
	/* Dirty page logging (type1). */
	HR_VFIO_OP_DIRTY_PAGES = 1u << 25,
	HR_VFIO_OP_UNMAP_DMA_DIRTY = 1u << 26,
	HR_VFIO_NOPS = 27,
	HR_VFIO_OP_ALL = (1u << 27) - 1,
};
_Static_assert(HR_VFIO_OP_UNMAP_DMA_DIRTY == 1u << (HR_VFIO_NOPS - 1), "HR_VFIO_NOPS counts every operation");
void hr_vfio_fail_next(uint32_t op_mask, uint32_t nth, int err);
int hr_vfio_fail_pending(void);
int hr_vfio_fail_fd(void);
void hr_vfio_count_calls(int on);
uint64_t hr_vfio_call_count(uint32_t op_mask);

#endif
