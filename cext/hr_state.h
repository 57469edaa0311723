/* hostrelay: a saved state's mapping table in C (Relay.save_state / restore_state).
 *
 * docs/state.md lays out the table: one 32-byte record per mapping,
 * little-endian virt_start, virt_end (inclusive), phys_start (u64 each),
 * flags (u32, the MAP request's), 4 bytes of zero padding.  These loops are
 * what makes a save or a restore of 100 000 mappings cost about what the
 * kernel's own work costs: one Python->C call per domain, not per mapping.
 * Policy stays in Python (hostrelay/dataplane/snapshot.py): these only
 * encode, check and replay.
 */
#ifndef HR_STATE_H
#define HR_STATE_H

#include <stdint.h>

#include "hr_relay.h"
#include "hr_table.h"

#define HR_STATE_RECORD 32

/* What hr_state_check found wrong with a record. */
enum hr_state_why {
	HR_STATE_OK = 0,
	HR_STATE_REVERSED = 1, /* virt_end < virt_start */
	HR_STATE_OVERLAP = 2,  /* starts at or before the previous record's end (out of order or overlapping) */
	HR_STATE_WRAP = 3,     /* phys_start + size wraps guest-physical space */
	HR_STATE_FLAGS = 4,    /* a flag outside known_flags */
	HR_STATE_PADDING = 5,  /* the padding is not zero */
};

/* Write t's mappings, in IOVA order, as records into buf (room for cap);
 * returns how many the table holds (all written if <= cap). */
uint64_t hr_state_export(const hr_table *t, uint8_t *buf, uint64_t cap);

/* Check count records as every saved table satisfies (no relay needed).
 * Returns count if all are fine, else the index of the first bad one, with
 * *why saying what is wrong. */
uint64_t hr_state_check(const uint8_t *recs, uint64_t count, uint32_t known_flags, int *why);

/* MAP each record into domain exactly as a guest's MAP request would be
 * (hr_relay_map: every check, the fan-out, the accounting); the relay's lock
 * is held by the caller.  Stops at the first record not done (any status but
 * HR_S_OK, HR_S_DEFER included) and returns its index, *res holding its
 * outcome; returns count if all are in. */
uint64_t hr_state_restore(hr_relay *r, uint32_t domain, const uint8_t *recs, uint64_t count,
			  struct hr_result *res);

#endif
