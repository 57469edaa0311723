/* hostrelay: a saved state's mapping table in C.  See hr_state.h. */
#include "hr_state.h"

#include <endian.h>
#include <string.h>

_Static_assert(HR_STATE_RECORD == 3 * sizeof(uint64_t) + 2 * sizeof(uint32_t), "record layout of docs/state.md");

static inline uint64_t get64(const uint8_t *p)
{
	uint64_t v;
	memcpy(&v, p, sizeof(v));
	return le64toh(v);
}

static inline uint32_t get32(const uint8_t *p)
{
	uint32_t v;
	memcpy(&v, p, sizeof(v));
	return le32toh(v);
}

static inline void put64(uint8_t *p, uint64_t v)
{
	v = htole64(v);
	memcpy(p, &v, sizeof(v));
}

static inline void put32(uint8_t *p, uint32_t v)
{
	v = htole32(v);
	memcpy(p, &v, sizeof(v));
}

uint64_t hr_state_export(const hr_table *t, uint8_t *buf, uint64_t cap)
{
	struct hr_mapping chunk[256];
	uint64_t n = 0, from = 0;

	for (;;) {
		size_t got = hr_table_dump(t, from, chunk, sizeof(chunk) / sizeof(chunk[0]));
		for (size_t i = 0; i < got; i++, n++) {
			if (n >= cap)
				continue; /* counted only: the caller retries with room for all */
			uint8_t *p = buf + n * HR_STATE_RECORD;
			put64(p, chunk[i].start);
			put64(p + 8, chunk[i].end);
			put64(p + 16, chunk[i].phys);
			put32(p + 24, chunk[i].flags);
			put32(p + 28, 0);
		}
		if (got < sizeof(chunk) / sizeof(chunk[0]) || chunk[got - 1].end == UINT64_MAX)
			break;
		from = chunk[got - 1].end + 1;
	}
	return n;
}

uint64_t hr_state_check(const uint8_t *recs, uint64_t count, uint32_t known_flags, int *why)
{
	uint64_t prev_end = 0;

	*why = HR_STATE_OK;
	for (uint64_t i = 0; i < count; i++) {
		const uint8_t *p = recs + i * HR_STATE_RECORD;
		uint64_t vs = get64(p), ve = get64(p + 8), ps = get64(p + 16);
		uint32_t flags = get32(p + 24);
		if (ve < vs)
			*why = HR_STATE_REVERSED;
		else if (i && vs <= prev_end)
			*why = HR_STATE_OVERLAP;
		else if (ps + (ve - vs) < ps)
			*why = HR_STATE_WRAP;
		else if (flags & ~known_flags)
			*why = HR_STATE_FLAGS;
		else if (get32(p + 28))
			*why = HR_STATE_PADDING;
		if (*why != HR_STATE_OK)
			return i;
		prev_end = ve;
	}
	return count;
}

uint64_t hr_state_restore(hr_relay *r, uint32_t domain, const uint8_t *recs, uint64_t count,
			  struct hr_result *res)
{
	for (uint64_t i = 0; i < count; i++) {
		const uint8_t *p = recs + i * HR_STATE_RECORD;
		if (hr_relay_map(r, domain, get64(p), get64(p + 8), get64(p + 16), get32(p + 24), res) != HR_S_OK)
			return i;
	}
	return count;
}
