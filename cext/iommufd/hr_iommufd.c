/* See hr_iommufd.h.  Each wrapper is one ioctl; -errno on failure.  The
 * first thing each does is the test hook's check (HOOK/INJECT of
 * cext/hr_hook.h, the same hook as hr_vfio.c's wrappers): one predicted
 * branch while no test has armed it. */
#include "hr_iommufd.h"
#include "hr_hook.h"

#include <errno.h>
#include <string.h>
#include <sys/ioctl.h>

static inline int ret(int rc)
{
	return rc < 0 ? -errno : 0;
}

int hr_iommufd_ioas_alloc(int iommufd, uint32_t *ioas_id)
{
	INJECT(HR_VFIO_OP_IOAS_ALLOC, iommufd);
	struct iommu_ioas_alloc a = { .size = sizeof(a) };
	int rc = ret(ioctl(iommufd, IOMMU_IOAS_ALLOC, &a));
	if (!rc)
		*ioas_id = a.out_ioas_id;
	return rc;
}

int hr_iommufd_destroy(int iommufd, uint32_t id)
{
	INJECT(HR_VFIO_OP_IOMMU_DESTROY, iommufd);
	struct iommu_destroy d = { .size = sizeof(d), .id = id };
	return ret(ioctl(iommufd, IOMMU_DESTROY, &d));
}

int hr_iommufd_ioas_map(int iommufd, uint32_t ioas_id, uint32_t flags, uint64_t vaddr, uint64_t iova,
			uint64_t length)
{
	INJECT(HR_VFIO_OP_IOAS_MAP, iommufd);
	struct iommu_ioas_map m = {
		.size = sizeof(m), .flags = flags, .ioas_id = ioas_id,
		.user_va = vaddr, .length = length, .iova = iova,
	};
	return ret(ioctl(iommufd, IOMMU_IOAS_MAP, &m));
}

int hr_iommufd_ioas_unmap(int iommufd, uint32_t ioas_id, uint64_t iova, uint64_t length, uint64_t *unmapped)
{
	int inj = HOOK(HR_VFIO_OP_IOAS_UNMAP, iommufd);
	if (inj) {
		*unmapped = 0; /* nothing was unmapped: the caller must not see the length */
		return inj;
	}
	struct iommu_ioas_unmap u = { .size = sizeof(u), .ioas_id = ioas_id, .iova = iova, .length = length };
	int rc = ret(ioctl(iommufd, IOMMU_IOAS_UNMAP, &u));
	/* The kernel writes back how many bytes it unmapped (Linux >= 6.2). */
	*unmapped = rc ? 0 : u.length;
	return rc;
}

int hr_iommufd_ioas_iova_ranges(int iommufd, uint32_t ioas_id, uint64_t *pairs, uint32_t max, uint32_t *num,
				uint64_t *alignment)
{
	INJECT(HR_VFIO_OP_IOAS_IOVA_RANGES, iommufd);
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
	INJECT(HR_VFIO_OP_DEVICE_BIND, device_fd);
	struct vfio_device_bind_iommufd b = { .argsz = sizeof(b), .iommufd = iommufd };
	int rc = ret(ioctl(device_fd, VFIO_DEVICE_BIND_IOMMUFD, &b));
	if (!rc)
		*dev_id = b.out_devid;
	return rc;
}

int hr_iommufd_device_attach(int device_fd, uint32_t pt_id, uint32_t *out_pt_id)
{
	INJECT(HR_VFIO_OP_DEVICE_ATTACH, device_fd);
	/* Attaching an attached device replaces its page table (Linux >= 6.9). */
	struct vfio_device_attach_iommufd_pt a = { .argsz = sizeof(a), .pt_id = pt_id };
	int rc = ret(ioctl(device_fd, VFIO_DEVICE_ATTACH_IOMMUFD_PT, &a));
	if (!rc)
		*out_pt_id = a.pt_id; /* the hardware page table the kernel chose */
	return rc;
}

int hr_iommufd_device_detach(int device_fd)
{
	INJECT(HR_VFIO_OP_DEVICE_DETACH, device_fd);
	struct vfio_device_detach_iommufd_pt d = { .argsz = sizeof(d) };
	return ret(ioctl(device_fd, VFIO_DEVICE_DETACH_IOMMUFD_PT, &d));
}

int hr_iommufd_ioas_copy(int iommufd, uint32_t dst_ioas_id, uint32_t src_ioas_id, uint32_t flags,
			 uint64_t src_iova, uint64_t dst_iova, uint64_t length)
{
	INJECT(HR_VFIO_OP_IOAS_COPY, iommufd);
	/* The copy shares the source's pinned pages (struct iopt_pages) instead
	 * of pinning them again, so it is not charged to RLIMIT_MEMLOCK or
	 * VmPin a second time (6.12 drivers/iommu/iommufd/ioas.c
	 * iommufd_ioas_copy: iopt_get_pages + iopt_map_pages). */
	struct iommu_ioas_copy c = {
		.size = sizeof(c), .flags = flags, .dst_ioas_id = dst_ioas_id, .src_ioas_id = src_ioas_id,
		.length = length, .dst_iova = dst_iova, .src_iova = src_iova,
	};
	return ret(ioctl(iommufd, IOMMU_IOAS_COPY, &c));
}

int hr_iommufd_option(int iommufd, uint32_t option_id, uint16_t op, uint32_t object_id, uint64_t *val)
{
	INJECT(HR_VFIO_OP_OPTION, iommufd);
	struct iommu_option o = {
		.size = sizeof(o), .option_id = option_id, .op = op, .object_id = object_id, .val64 = *val,
	};
	int rc = ret(ioctl(iommufd, IOMMU_OPTION, &o));
	/* The kernel copies val64 back after a GET and after a SET alike
	 * (6.12 drivers/iommu/iommufd/main.c iommufd_option). */
	if (!rc)
		*val = o.val64;
	return rc;
}

int hr_iommufd_get_hw_info(int iommufd, uint32_t dev_id, void *data, uint32_t *data_len, uint32_t *out_data_type,
			   uint64_t *out_capabilities)
{
	INJECT(HR_VFIO_OP_GET_HW_INFO, iommufd);
	/* out_data_type goes in as 0 (IOMMU_HW_INFO_TYPE_NONE): kernels that take
	 * an input type there read it only under a flag we do not set. */
	struct iommu_hw_info h = {
		.size = sizeof(h), .dev_id = dev_id, .data_len = *data_len, .data_uptr = (uintptr_t)data,
	};
	int rc = ret(ioctl(iommufd, IOMMU_GET_HW_INFO, &h));
	if (rc)
		return rc;
	/* The kernel copied min(our length, its length) bytes, zeroed the rest
	 * of our buffer and wrote its own length back (Linux >= 6.6
	 * drivers/iommu/iommufd/device.c iommufd_get_hw_info). */
	*data_len = h.data_len;
	*out_data_type = h.out_data_type;
	*out_capabilities = h.out_capabilities; /* Linux >= 6.7; 0 before */
	return 0;
}

/* ---------------------------------------------------------------- benchmark
 * The raw loop tests/bench_iommufd.py measures the relay's iommufd path
 * against, as hr_vfio_bench_map_unmap is for type1: never a way to serve a
 * guest.  The two ioctls are issued here directly, not through the wrappers
 * above, so the baseline stays bare whatever the wrappers grow (a test hook,
 * say).  Fixed IOVA, readable and writeable, exactly what the data plane's
 * c_map asks for (hr_fanout.c).  IOMMU_IOAS_UNMAP writes back the bytes it
 * removed in .length (Linux >= 6.2), checked as the type1 loop checks its. */
int hr_iommufd_bench_map_unmap(int iommufd, uint32_t ioas_id, uint64_t vaddr, uint64_t iova, uint64_t size,
			       uint32_t count, uint32_t spread)
{
	for (uint32_t i = 0; i < count; i++) {
		uint64_t off = spread ? (i % spread) * size : 0;
		struct iommu_ioas_map m = {
			.size = sizeof(m), .ioas_id = ioas_id, .user_va = vaddr + off, .length = size, .iova = iova + off,
			.flags = IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE,
		};
		if (ioctl(iommufd, IOMMU_IOAS_MAP, &m) < 0)
			return -errno;
		struct iommu_ioas_unmap u = { .size = sizeof(u), .ioas_id = ioas_id, .iova = iova + off, .length = size };
		if (ioctl(iommufd, IOMMU_IOAS_UNMAP, &u) < 0)
			return -errno;
		if (u.length != size)
			return -EIO;
	}
	return 0;
}
