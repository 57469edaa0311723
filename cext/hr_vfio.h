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
int hr_vfio_bench_map_unmap(int container_fd, uint64_t vaddr, uint64_t iova,
                            uint64_t size, uint32_t count, uint32_t spread);

#endif
