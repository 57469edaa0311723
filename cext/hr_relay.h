/* hostrelay: the MAP/UNMAP data plane of the virtio-iommu device.
 *
 * One implementation of MAP and UNMAP (virtio 1.2+ §5.13.6.5/5.13.6.6) used
 * by both front doors: Relay.handle_request (one C call per request) and the
 * request virtqueue walked here in C (hr_relay_process), so a burst of
 * MAP/UNMAP costs one Python->C transition.  The Python side owns the control
 * plane (endpoints, ATTACH/DETACH/PROBE, config) and mirrors the domains it
 * creates into this registry.
 *
 * Each domain fans MAP/UNMAP out to the VFIO containers of its endpoints
 * (one container per VFIO group; type1v2).  Limits are checked before any
 * ioctl; a failure part-way is rolled back so every container and the table
 * agree; kernel failures are reported in struct hr_result for the Python
 * side to log and turn into fault events.  No policy, no logging here.
 * Implemented across several files; hr_relay_int.h says which does what.
 */
#ifndef HR_RELAY_H
#define HR_RELAY_H

#include <stdint.h>

#include "hr_table.h"
#include "hr_vq.h"

/* VIRTIO_IOMMU_S_* (§5.13.6) and request types (§5.13.6.1). */
enum hr_status {
	HR_S_OK = 0, HR_S_IOERR = 1, HR_S_UNSUPP = 2, HR_S_DEVERR = 3, HR_S_INVAL = 4,
	HR_S_RANGE = 5, HR_S_NOENT = 6, HR_S_FAULT = 7, HR_S_NOMEM = 8,
	/* Not a wire status: the request is valid and the domain's backends
	 * are the caller's to drive (hr_relay_domain_set_custom). */
	HR_S_DEFER = 0x100,
};
enum { HR_T_ATTACH = 1, HR_T_DETACH = 2, HR_T_MAP = 3, HR_T_UNMAP = 4, HR_T_PROBE = 5 };
enum { HR_MAP_F_READ = 1, HR_MAP_F_WRITE = 2, HR_MAP_F_MMIO = 4 };

/* Which check refused a request (for logs and tests). */
enum hr_reason {
	HR_R_NONE = 0, HR_R_FRAMING, HR_R_FLAGS, HR_R_RESERVED_FIELD, HR_R_DOMAIN_RANGE,
	HR_R_ORDER, HR_R_ALIGN, HR_R_INPUT_RANGE, HR_R_PHYS_WRAP, HR_R_NO_DOMAIN, HR_R_BYPASS,
	HR_R_RESERVED, HR_R_NOT_RAM, HR_R_MMIO_VFIO, HR_R_LIMIT, HR_R_OVERLAP, HR_R_STRADDLE,
	HR_R_ENTRIES, HR_R_MEMLOCK, HR_R_KERNEL, HR_R_MISMATCH,
};

struct hr_result {
	int32_t status;    /* enum hr_status */
	int32_t reason;    /* enum hr_reason */
	int32_t err;       /* errno of the failed kernel call, else 0 */
	int32_t container; /* index in the domain's container list that failed, else -1 */
	uint32_t domain;
	uint32_t req_type;
	uint64_t iova;     /* start of the range involved */
	uint64_t size;     /* its size (0 = the whole 64-bit space) */
	uint64_t got;      /* UNMAP mismatch: bytes the kernel reported */
};

/* One host address space a domain's mappings go to: a VFIO type1
 * container (one group), or an iommufd IOAS (any number of devices).
 * Counters are what the relay predicts the kernel holds; tests compare them
 * with the kernel's own view. */
enum hr_container_kind {
	HR_CONT_TYPE1 = 0, /* fd: the container; VFIO_IOMMU_(UN)MAP_DMA */
	HR_CONT_IOAS = 1,  /* fd: the iommufd, ioas: the IOAS id; IOMMU_IOAS_(UN)MAP */
};

struct hr_container {
	int32_t fd;
	uint32_t avail;          /* kernel entries left (type1 DMA_AVAIL, tracked; IOAS: no limit) */
	uint64_t entries;        /* kernel entries the relay created (vfio_dma / iopt_area) */
	uint64_t charged;        /* bytes the kernel charged to locked_vm for them */
	uint32_t kind;           /* enum hr_container_kind */
	uint32_t ioas;           /* HR_CONT_IOAS: the IOAS id */
	/* The dirty log (hr_relay_dirty_set): type1's bitmap page size while
	 * the kernel logs this container (VFIO_IOMMU_DIRTY_PAGES_FLAG_START
	 * succeeded), else 0. */
	uint64_t dirty_pgsize;
	/* Tests make its ioctls fail through hr_vfio_fail_next (hr_vfio.h). */
};

typedef struct hr_relay hr_relay;

/* A guest-physical range a device may have written (the dirty log). */
struct hr_dirty_range {
	uint64_t gpa, size;
};

hr_relay *hr_relay_new(void);
void hr_relay_free(hr_relay *r);
int hr_relay_set_memory(hr_relay *r, const struct hr_gmem_region *regions, uint32_t n);
const struct hr_gmem *hr_relay_memory(const hr_relay *r);
void hr_relay_configure(hr_relay *r, uint64_t granule, uint64_t input_start, uint64_t input_end,
                        uint32_t domain_start, uint32_t domain_end, uint32_t map_flags_mask,
                        uint64_t max_mappings, uint64_t max_writable);
void hr_relay_set_memlock(hr_relay *r, uint64_t limit, uint64_t baseline);
uint64_t hr_relay_charged(const hr_relay *r);

int hr_relay_domain_add(hr_relay *r, uint32_t id, hr_table *table, int bypass);
int hr_relay_domain_remove(hr_relay *r, uint32_t id);
int hr_relay_domain_set_resv(hr_relay *r, uint32_t id, const uint64_t *pairs, uint32_t n);
void hr_relay_account(hr_relay *r, struct hr_container *c, int64_t pieces, int64_t bytes);
int hr_relay_domain_set_custom(hr_relay *r, uint32_t id, int custom);
int hr_relay_domain_set_containers(hr_relay *r, uint32_t id, struct hr_container *const *c,
                                   uint32_t n);

/* The migration dirty log of the C paths (hostrelay/dataplane/dirty.py).
 * While on, every UNMAP C carries out records what the devices may have
 * written through the mappings it removes: for a type1 container with
 * dirty_pgsize, the pages the kernel's bitmap names (read with the unmap);
 * for any other container (iommufd, type1 untracked), every page of a
 * writable mapping.  hr_relay_dirty_take hands the records over, oldest
 * first, and returns how many; *lost is set (and cleared) if some could not
 * be kept (out of memory, or more than HR_DIRTY_MAX ranges waiting): the
 * caller must then assume all guest RAM dirty.  Lock held. */
#define HR_DIRTY_MAX (1u << 20)
void hr_relay_dirty_set(hr_relay *r, int on);
uint64_t hr_relay_dirty_take(hr_relay *r, struct hr_dirty_range *out, uint64_t cap, uint32_t *lost);

int hr_relay_map(hr_relay *r, uint32_t domain, uint64_t vs, uint64_t ve, uint64_t ps,
                 uint32_t flags, struct hr_result *res);
int hr_relay_unmap(hr_relay *r, uint32_t domain, uint64_t vs, uint64_t ve, struct hr_result *res);

int64_t hr_relay_request(hr_relay *r, const uint8_t *req, uint64_t rlen, uint64_t wlen,
                         uint8_t *out, struct hr_result *res);
/* The relay's one lock, shared with Python (DataPlane.lock in
 * hostrelay.dataplane.handle): every call below expects it held, except hr_relay_fast and hr_relay_process_locked, which
 * take it themselves (so their Python callers pay no lock of their own). */
void hr_relay_lock(hr_relay *r);
void hr_relay_unlock(hr_relay *r);

/* handle_request's fast path: the status (reply = the 4-byte tail), HR_FAST_REPORT | status
 * when res holds a kernel failure to report (returns with the lock held: the caller reports,
 * then calls hr_relay_unlock), or -1 with nothing changed.  Takes the lock itself. */
#define HR_FAST_REPORT 0x1000
int hr_relay_fast(hr_relay *r, const uint8_t *req, uint64_t rlen, uint64_t wlen, struct hr_result *res);
/* A request queue as the C walker serves it. */
#define HR_QUEUE_ERRS 32
/* One request hr_relay_process served itself, while recording. */
struct hr_record {
	uint8_t req[64];    /* the device-readable part's first bytes (no request is longer) */
	uint32_t read_len;  /* the device-readable part's whole length */
	uint32_t write_len; /* the device-writable part's */
	uint32_t used_len;  /* the used length it was completed with */
	uint8_t tail[4];    /* the last 4 bytes written, if used_len >= 4 (zeros before) */
};

struct hr_queue {
	struct hr_vq vq;
	struct hr_chain chain;  /* HR_PROCESS_CALLER: the request for the caller */
	uint32_t nerrs;         /* kernel failures in errs[] for the caller to report */
	struct hr_result errs[HR_QUEUE_ERRS];
	/* Recording: with rec set, every chain takes the general walk and each
	 * request served in C is appended here (rec_cap of them at most; full:
	 * HR_PROCESS_FULL, for the caller to take them and call again).  A
	 * chain that is no request (a descriptor error, used length 0) is not
	 * recorded. */
	struct hr_record *rec;
	uint32_t nrec, rec_cap;
};
/* hr_relay_process's result: one code in the low bits, HR_PROCESS_ERRORS if
 * errs[] holds failures to report, and the chains completed by this call
 * above HR_PROCESS_SHIFT. */
enum {
	HR_PROCESS_IDLE = 0,   /* nothing left available */
	HR_PROCESS_CALLER = 1, /* q->chain is a request for the control plane: serve it, call again */
	HR_PROCESS_FULL = 2,   /* errs[] is full: report them, call again */
	HR_PROCESS_BROKEN = 3, /* the queue broke (hr_vq.broken): the device needs a reset */
	HR_PROCESS_CODE = 3,   /* the mask of the code bits */
	HR_PROCESS_ERRORS = 4,
	HR_PROCESS_SHIFT = 3,
};
int hr_relay_process(hr_relay *r, struct hr_queue *q);
/* hr_relay_process taking the lock itself; when the result has HR_PROCESS_CODE
 * or HR_PROCESS_ERRORS bits it returns with the lock still held, for the
 * caller to finish the work (and call hr_relay_process again) before
 * hr_relay_unlock. */
int hr_relay_process_locked(hr_relay *r, struct hr_queue *q);
void hr_relay_complete(struct hr_vq *vq, const struct hr_chain *c, const uint8_t *reply,
                       uint64_t len);

/* The request queue served from a thread of its own (hr_kick.c): it waits
 * on kick_fd, serves what hr_relay_process serves in C under the relay's
 * lock, writes call_fd unless the driver set VRING_AVAIL_F_NO_INTERRUPT,
 * and for anything else gives the chain back, writes need_fd and parks
 * until hr_kick_resume (Python serves the ring meanwhile).  The three fds
 * stay the caller's and must outlive the thread (hr_kick_stop).
 * spin_ns > 0: after a kick that completed something, look at the avail
 * index that long with VRING_USED_F_NO_NOTIFY set before sleeping again
 * (never together with rt_priority: a real-time spin could starve the vCPU
 * thread it waits for).
 * hr_kick_start reads the queue's ring pointers: call it with the lock held
 * (the thread only takes it once started).  hr_kick_stop joins the thread:
 * never with the lock held. */
typedef struct hr_kick hr_kick;
struct hr_kick_stats {
	uint64_t kicks;     /* kick eventfd wake-ups */
	uint64_t served;    /* chains completed by the thread */
	uint64_t handovers; /* times Python was asked to serve */
	uint64_t calls;     /* call eventfd writes */
	uint64_t spin_hits; /* requests the spin caught without a kick */
};
hr_kick *hr_kick_start(hr_relay *r, struct hr_queue *q, int kick_fd, int call_fd, int need_fd,
		       const int64_t *mem_gen, const int64_t *fast_gen, uint64_t spin_ns, int rt_priority);
/* rt_priority > 0: the thread runs SCHED_FIFO at that priority; the error
 * if that was refused (EPERM without CAP_SYS_NICE), else 0. */
int hr_kick_rt_error(const hr_kick *k);
void hr_kick_stop(hr_kick *k);
void hr_kick_free(hr_kick *k);
void hr_kick_resume(hr_kick *k);
int hr_kick_failed(const hr_kick *k);
/* The kernel failures the thread met and did not report yet (lock held):
 * copied to out (HR_QUEUE_ERRS of room), and forgotten. */
uint32_t hr_kick_take_errs(hr_kick *k, struct hr_result *out);
void hr_kick_get_stats(const hr_kick *k, struct hr_kick_stats *out);

int hr_relay_bench_map_unmap(hr_relay *r, uint32_t domain, uint64_t iova, uint64_t gpa, uint64_t size,
                             uint32_t count, uint32_t spread);
int hr_relay_bench_ring(hr_relay *r, struct hr_queue *q, const uint16_t *heads, uint32_t n,
                        uint32_t batches);
/* The ring walk plus one container's ioctls and nothing else: the benchmark's
 * floor under hr_relay_process (tests/bench_vfio.py), never for serving a guest. */
int hr_relay_bench_floor(hr_relay *r, struct hr_queue *q, int container_fd);
uint64_t hr_relay_pinned(const hr_relay *r, int64_t domain, const uint64_t *extra, uint32_t nextra,
                         uint64_t *mapped);
int hr_status_for_errno(int err);

#endif
