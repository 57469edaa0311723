/* hostrelay: the test hook's state, shared by the wrapper files (internal).
 *
 * hr_vfio.c owns the hook (its public API is hr_vfio_fail_next and friends
 * in hr_vfio.h); hr_iommufd.c checks it through HOOK()/INJECT() like
 * hr_vfio.c's own wrappers, so one armed injection or one counting() covers
 * every kernel call of both uAPIs.  No .cdef on purpose: cext/build_native.py
 * puts every header with a .cdef into the module source, and this one must
 * stay the C files' own.
 */
#ifndef HR_HOOK_H
#define HR_HOOK_H

#include <stdint.h>

#include "hr_vfio.h"

struct hr_hook {
	uint32_t on;       /* the only word a wrapper reads: counting || mask */
	uint32_t counting;
	uint32_t mask;     /* operations the armed injection counts; 0 = disarmed */
	uint32_t nth;      /* calls among them still to let through */
	int err;
	int failed_fd;
	uint64_t calls[HR_VFIO_NOPS];
};

/* Defined in hr_vfio.c.  Hidden outside the extension (-fvisibility=hidden). */
extern struct hr_hook hr_hook;

/* noinline and cold: the wrappers are inlined into the data plane's
 * flattened request path (hr_relay_process, hr_relay_fast), which must only
 * carry the test of hr_hook.on, not this. */
__attribute__((noinline, cold)) int hr_hook_call(uint32_t op, int fd);

/* 0, or the made-up -errno the wrapper must return instead of its ioctl. */
#define HOOK(op, fd) (__builtin_expect(hr_hook.on != 0, 0) ? hr_hook_call((op), (fd)) : 0)
/* A wrapper's first line: return the made-up -errno, if any, without the ioctl. */
#define INJECT(op, fd)                          \
	do {                                    \
		int inj_ = HOOK((op), (fd));    \
		if (inj_)                       \
			return inj_;            \
	} while (0)

#endif
