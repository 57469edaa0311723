/* Fuzz target: the mapping table (hr_table.c, a B+ tree) against a model
 * (a sorted array), at scale: inserts, exact and range removals, lookups,
 * range checks, translations.  Every answer must equal the model's.
 *
 * Input: records of 1 op byte and 12 argument bytes.  Addresses are built
 * from the arguments in units of a 4 KiB page inside a 2^24-page space, with
 * some records near the top of the 64-bit space, so inserts collide and
 * ranges straddle often enough to matter.
 */
#include <errno.h>
#include <string.h>

#include "harness.h"

#define MAX 8192

static struct hr_mapping model[MAX];
static uint32_t nmodel;

/* Index of the first model mapping with end >= addr. */
static uint32_t lower(uint64_t addr)
{
	uint32_t lo = 0, hi = nmodel;
	while (lo < hi) {
		uint32_t mid = (lo + hi) / 2;
		if (model[mid].end < addr)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo;
}

static int m_overlaps(uint64_t s, uint64_t e)
{
	uint32_t i = lower(s);
	return i < nmodel && model[i].start <= e;
}

static int64_t m_check_range(uint64_t s, uint64_t e)
{
	int64_t n = 0;
	for (uint32_t i = lower(s); i < nmodel && model[i].start <= e; i++) {
		if (model[i].start < s || model[i].end > e)
			return -ERANGE;
		n++;
	}
	return n;
}

static void m_remove(uint32_t i, uint32_t count)
{
	memmove(&model[i], &model[i + count], (nmodel - i - count) * sizeof(model[0]));
	nmodel -= count;
}

/* hr_table_insert, checked against the model's answer. */
static void insert(hr_table *t, uint64_t s, uint64_t e, uint64_t phys, uint32_t flags)
{
	int rc = hr_table_insert(t, s, e, phys, flags);
	if (m_overlaps(s, e)) {
		FZ_ASSERT(rc == -EEXIST);
	} else if (nmodel < MAX) {
		FZ_ASSERT(rc == 0);
		uint32_t i = lower(s);
		memmove(&model[i + 1], &model[i], (nmodel - i) * sizeof(model[0]));
		model[i] = (struct hr_mapping){ s, e, phys, flags };
		nmodel++;
	} else if (rc == 0) {
		hr_table_remove_exact(t, s, e); /* the model is full: keep them equal */
	}
}

static uint64_t addr_of(const uint8_t *a, int high)
{
	uint32_t v;
	memcpy(&v, a, 4);
	uint64_t page = (uint64_t)(v & 0xFFFFFF) << 12;
	return high ? UINT64_MAX - 0xFFFFFFull * 0x1000 + page : page;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	hr_table *t = hr_table_new();
	struct hr_mapping got, dump[64];

	FZ_ASSERT(t);
	nmodel = 0;
	for (; size >= 13; data += 13, size -= 13) {
		uint8_t op = data[0];
		int high = (op & 0x80) != 0;
		uint64_t s = addr_of(data + 1, high);
		uint32_t len;
		memcpy(&len, data + 5, 4);
		uint64_t e = s + ((uint64_t)(len & 0xFFFF) << 12) + 0xFFF;
		if (e < s)
			e = UINT64_MAX;
		uint32_t flags = data[9] & 7;
		uint64_t phys = (uint64_t)data[10] << 20 | (uint64_t)data[11] << 12;
		switch (op & 7) {
		case 0:
		case 1: /* insert (twice as often) */
			insert(t, s, e, phys, flags);
			break;
		case 2: { /* exact removal of an existing one (by index) or of [s, e] */
			if (nmodel && (data[12] & 1)) {
				uint32_t i = (uint32_t)(len % nmodel);
				s = model[i].start;
				e = model[i].end;
			}
			uint32_t i = lower(s);
			int exists = i < nmodel && model[i].start == s && model[i].end == e;
			if (data[12] & 4)
				FZ_ASSERT(hr_table_find_exact(t, s, e, NULL) == exists);
			if (data[12] & 2) {
				int f = hr_table_find_mark(t, s, e, &got);
				FZ_ASSERT(f == exists);
				if (f)
					FZ_ASSERT(got.start == s && got.end == e && got.phys == model[i].phys);
			}
			FZ_ASSERT(hr_table_remove_exact(t, s, e) == exists);
			if (exists)
				m_remove(i, 1);
			break;
		}
		case 3: { /* atomic range removal */
			int64_t want = m_check_range(s, e);
			FZ_ASSERT(hr_table_check_range(t, s, e) == want);
			FZ_ASSERT(hr_table_remove_range(t, s, e) == want);
			if (want > 0)
				m_remove(lower(s), (uint32_t)want);
			break;
		}
		case 4: { /* point lookup and next */
			uint32_t i = lower(s);
			int in = i < nmodel && model[i].start <= s;
			FZ_ASSERT(hr_table_lookup(t, s, &got) == in);
			if (in)
				FZ_ASSERT(got.start == model[i].start && got.end == model[i].end);
			/* next: lowest start >= s */
			uint32_t j = i + (in && model[i].start < s ? 1 : 0);
			int has = j < nmodel;
			FZ_ASSERT(hr_table_next(t, s, &got) == has);
			if (has)
				FZ_ASSERT(got.start == model[j].start);
			break;
		}
		case 5: { /* translate a span */
			uint64_t gpa = 0, fault = 0, sz = 1 + (len >> 16);
			uint32_t need = flags & 3;
			int rc = hr_table_translate(t, s, sz, need, &gpa, &fault);
			/* The model's answer: walk mappings from s. */
			int want = 0;
			uint64_t at = s, last = s + sz - 1, wgpa = 0, wfault = 0;
			if (last < s) {
				want = -EINVAL;
			} else {
				uint32_t i = lower(at);
				for (int first = 1;; first = 0) {
					if (i >= nmodel || model[i].start > at) {
						want = -ENOENT, wfault = at;
						break;
					}
					if ((model[i].flags & need) != need) {
						want = -EACCES, wfault = at;
						break;
					}
					if (first)
						wgpa = model[i].phys + (s - model[i].start);
					else if (model[i].phys != model[i - 1].phys + (model[i - 1].end - model[i - 1].start + 1)) {
						want = -EXDEV, wfault = at;
						break;
					}
					if (model[i].end >= last)
						break;
					at = model[i].end + 1;
					i++;
				}
			}
			FZ_ASSERT(rc == want);
			if (rc == 0)
				FZ_ASSERT(gpa == wgpa);
			else if (rc != -EINVAL)
				FZ_ASSERT(fault == wfault);
			break;
		}
		case 6: { /* dump from s */
			size_t n = hr_table_dump(t, s, dump, 64);
			uint32_t i = lower(s);
			if (i < nmodel && model[i].start < s)
				i++;
			size_t want = nmodel - i < 64 ? nmodel - i : 64;
			FZ_ASSERT(n == want);
			for (size_t k = 0; k < n; k++)
				FZ_ASSERT(dump[k].start == model[i + k].start && dump[k].end == model[i + k].end);
			break;
		}
		default:
			if (data[12] & 0x80) {
				/* At scale: a run of up to 4096 one-page mappings
				 * (deep trees: inner nodes split), after the last
				 * one so the model appends (a fuzzer's exec stays
				 * in milliseconds)... */
				uint32_t count = (len & 0xFFF) + 1, stride = 1 + (data[11] & 3);
				if (nmodel && model[nmodel - 1].end >= s)
					s = model[nmodel - 1].end + 1 + ((uint64_t)(len >> 16) << 12);
				for (uint32_t k = 0; k < count && nmodel < MAX; k++) {
					uint64_t at = s + ((uint64_t)k * stride << 12);
					if (at < s || at + 0xFFF < at)
						break; /* past the top of the 64-bit space */
					insert(t, at, at + 0xFFF, phys, flags);
				}
			} else if (data[12] & 0x40) {
				/* ...and every n-th one removed (inner nodes merge
				 * and borrow). */
				uint32_t every = 2 + (data[11] & 7), from = (uint32_t)(len % every), k = 0;
				for (uint32_t i = 0; i < nmodel; i++) {
					if (i % every != from)
						model[k++] = model[i];
					else
						FZ_ASSERT(hr_table_remove_exact(t, model[i].start, model[i].end) == 1);
				}
				nmodel = k;
			} else if ((data[12] & 0x3F) == 0) { /* clear, rarely */
				hr_table_clear(t);
				nmodel = 0;
			}
			break;
		}
		FZ_ASSERT(hr_table_count(t) == nmodel);
	}
	hr_table_free(t);
	return 0;
}
