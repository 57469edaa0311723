/* hostrelay fuzz targets: the world they share.
 *
 * The targets link the project's own data plane (run.py's PROJECT_C: the
 * relay's files, hr_vq.c, hr_table.c) against the fake kernel in harness.c
 * instead of hr_vfio.c: a model of type1v2 containers (Linux 6.12
 * vfio_iommu_type1 semantics for MAP_DMA/UNMAP_DMA) whose calls fail when
 * the input says so, and of one iommufd IOAS beside them where the build
 * has iommufd.  The guest is three RAM regions: two adjacent in
 * guest-physical space but apart in the host (so one MAP can be two
 * pieces), and one beyond a hole.
 */
#ifndef HR_FUZZ_HARNESS_H
#define HR_FUZZ_HARNESS_H

#include <stddef.h>
#include <stdint.h>

#include "hr_relay.h"

#define FZ_NCONT 4
#define FZ_REGION 0x10000u /* each RAM region: 64 KiB */

/* ---- the fake kernel (harness.c) */

/* Container fds are FZ_FD0 .. FZ_FD0 + FZ_NCONT - 1.  Where the build has
 * iommufd (HR_HAVE_IOMMUFD), container FZ_IOAS_SLOT is an IOAS (id
 * FZ_IOAS_ID), so a domain 2 of two or more containers mixes both kinds. */
#define FZ_FD0 100
#define FZ_IOAS_SLOT 1
#define FZ_IOAS_ID 7
/* The nth next MAP_DMA or UNMAP_DMA (0 = the very next) fails with err,
 * once; err 0 disarms. */
void fk_fail_next(uint32_t nth, int err);
void fk_reset(uint32_t entry_limit);
/* Entries and bytes the fake kernel holds for a container fd. */
uint64_t fk_entries(int fd);
uint64_t fk_bytes(int fd);
/* 1 if the kernel's entries for fd, merged where adjacent, cover exactly the
 * same IOVAs as the mappings with READ or WRITE in table t. */
int fk_matches(int fd, const hr_table *t);

/* ---- the guest and the relay */

struct fz_world {
	hr_relay *relay;
	hr_table *tables[5];          /* domains 1..4 (index = id) */
	struct hr_container cont[FZ_NCONT];
	uint32_t ncont;               /* containers behind domain 2 */
	uint8_t *ram[3];              /* host memory of the three regions */
};

/* Domains: 1 emulated, 2 behind ncont containers (0..3) plus a reserved
 * range, 3 bypass, 4 one whose backend only the caller drives (DEFER);
 * domain 5 does not exist.  Container 3 sits alone behind no domain: it
 * must stay empty whatever happens. */
void fz_world_init(struct fz_world *w, uint32_t ncont, uint32_t entry_limit, uint64_t memlock);
void fz_world_free(struct fz_world *w);
/* Abort unless every table is disjoint and each container of domain 2
 * holds exactly what the relay thinks (entries, bytes, IOVAs). */
void fz_world_check(const struct fz_world *w);
/* guest-physical address -> host pointer (for the image). */
uint8_t *fz_gpa(struct fz_world *w, uint64_t gpa);

/* Serve a ring until it is idle or broken (at most `rounds` calls of
 * hr_relay_process), answering control-plane requests the way the Python
 * side would answer ones it does not know: a status tail.  locked: through
 * hr_relay_process_locked, the lock-taking entry point. */
void fz_serve(struct fz_world *w, struct hr_queue *q, uint32_t rounds, int locked);

#define FZ_ASSERT(cond)                                                                  \
	do {                                                                             \
		if (!(cond))                                                             \
			fz_fail(__FILE__, __LINE__, #cond);                              \
	} while (0)
__attribute__((noreturn)) void fz_fail(const char *file, int line, const char *what);

#endif
