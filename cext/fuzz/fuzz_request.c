/* Fuzz target: the per-request MAP/UNMAP entry points (hr_relay_request,
 * the C path of Relay.handle_request, and hr_relay_fast, its fast path)
 * with arbitrary bytes and writable lengths, interleaved with kernel
 * failures.  After every request each domain's table equals a model kept
 * here from the statuses (a sorted array), its mappings are disjoint, and
 * every container holds exactly what the table says (fz_world_check).
 *
 * Input: 4 header bytes (containers, dma_entry_limit - 1, memlock pages,
 * unused), then records of an op byte and a length byte: op >= 0xF0 arms a
 * kernel failure (length: nth | errno index << 3), op >= 0xE0 runs the
 * benchmark loop; otherwise that many request bytes (at most 72) and a
 * 2-byte writable length follow (shifted up 8 bits if op has 0x40), and op
 * bit 0 picks hr_relay_fast over hr_relay_request.
 */
#include <stdio.h>
#include <string.h>

#include "harness.h"
#include "ring.h"

#define MODEL_MAX 600

struct model {
	uint32_t n;
	struct { uint64_t s, e; } m[MODEL_MAX];
};

static uint64_t rd64(const uint8_t *p)
{
	uint64_t v;
	memcpy(&v, p, 8);
	return v;
}

static uint32_t rd32(const uint8_t *p)
{
	uint32_t v;
	memcpy(&v, p, 4);
	return v;
}

static void model_insert(struct model *md, uint64_t s, uint64_t e)
{
	uint32_t i = 0;

	FZ_ASSERT(md->n < MODEL_MAX);
	while (i < md->n && md->m[i].s < s)
		i++;
	/* The relay said OK: the model must agree nothing overlaps. */
	FZ_ASSERT(i == 0 || md->m[i - 1].e < s);
	FZ_ASSERT(i == md->n || md->m[i].s > e);
	memmove(&md->m[i + 1], &md->m[i], (md->n - i) * sizeof(md->m[0]));
	md->m[i].s = s;
	md->m[i].e = e;
	md->n++;
}

static void model_unmap(struct model *md, uint64_t s, uint64_t e)
{
	uint32_t k = 0;

	for (uint32_t i = 0; i < md->n; i++) {
		int inside = md->m[i].s >= s && md->m[i].e <= e;
		int apart = md->m[i].e < s || md->m[i].s > e;
		FZ_ASSERT(inside || apart); /* OK means nothing was straddled */
		if (!inside)
			md->m[k++] = md->m[i];
	}
	md->n = k;
}

static void model_check(const struct model *md, const hr_table *t)
{
	static struct hr_mapping out[MODEL_MAX + 1];
	size_t n = hr_table_dump(t, 0, out, MODEL_MAX + 1);

	FZ_ASSERT(n == md->n);
	for (size_t i = 0; i < n; i++)
		FZ_ASSERT(out[i].start == md->m[i].s && out[i].end == md->m[i].e);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static struct model models[5];
	struct fz_world w;
	uint8_t req[80], tail[4];
	struct hr_result res;

	if (size < 4)
		return 0;
	fz_world_init(&w, data[0] & 3, 1 + data[1], data[2] ? (uint64_t)data[2] << 12 : UINT64_MAX);
	if (data[0] & 4) {
		/* The migration dirty log: UNMAP reads container 0's bitmap with
		 * each unmap and records GPAs, every other container's writable
		 * pages (hr_fanout.c unmap_logged); the same outcome as without. */
		hr_relay_dirty_set(w.relay, 1);
		w.cont[0].dirty_pgsize = 0x1000;
	}
	memset(models, 0, sizeof(models));
	data += 4;
	size -= 4;
	while (size >= 2) {
		uint8_t op = data[0], len = data[1];
		data += 2;
		size -= 2;
		if (op >= 0xF0) { /* arm a kernel failure */
			fk_fail_next(len & 7, fz_errno(len >> 3));
			continue;
		}
		if (op >= 0xE0) { /* the benchmark's MAP+UNMAP loop, in domain 1 far from the rest: no net change */
			hr_relay_bench_map_unmap(w.relay, 1, 0xF0000000, 0x1000, 0x1000, len & 15, op & 3);
			goto check;
		}
		if (len > 72 || size < (size_t)len + 2)
			break;
		memcpy(req, data, len);
		uint64_t wlen = data[len] | (uint64_t)data[len + 1] << 8;
		if (op & 0x40)
			wlen <<= 8; /* long writable parts, up to 16 MiB */
		data += len + 2;
		size -= (size_t)len + 2;
		memset(&res, 0, sizeof(res));
		res.status = -1;
		int st;
		if (op & 1) {
			int rc = hr_relay_fast(w.relay, req, len, wlen, &res);
			if (rc >= 0 && (rc & HR_FAST_REPORT))
				hr_relay_unlock(w.relay); /* the caller reports, then unlocks */
			st = rc < 0 ? -1 : rc & 0xFF;
			if (rc >= 0)
				FZ_ASSERT(st == res.status);
		} else {
			int64_t n = hr_relay_request(w.relay, req, len, wlen, tail, &res);
			FZ_ASSERT(n <= (int64_t)wlen);
			FZ_ASSERT(n < 0 || n == 0 || n >= 4);
			st = n >= 4 && res.status != HR_S_DEFER ? tail[0] : -1;
			if (n >= 4 && res.status != HR_S_DEFER)
				FZ_ASSERT(tail[0] == res.status && !tail[1] && !tail[2] && !tail[3]);
		}
		if (st == HR_S_OK && len >= 24) {
			uint32_t dom = rd32(req + 4);
			uint64_t s = rd64(req + 8), e = rd64(req + 16);
			FZ_ASSERT(dom >= 1 && dom <= 4 && dom != 3);
			if (req[0] == HR_T_MAP && len == 36)
				model_insert(&models[dom], s, e);
			else if (req[0] == HR_T_UNMAP && len == 28)
				model_unmap(&models[dom], s, e);
			else
				FZ_ASSERT(!"OK for a request that is not a plain MAP/UNMAP");
		}
	check:
		for (int d = 1; d <= 4; d++)
			model_check(&models[d], w.tables[d]);
		fz_world_check(&w);
	}
	struct hr_dirty_range dirty[64];
	uint32_t lost;
	uint64_t n;
	do {
		/* Every record is guest RAM, a whole number of pages. */
		n = hr_relay_dirty_take(w.relay, dirty, 64, &lost);
		for (uint64_t i = 0; i < n; i++)
			FZ_ASSERT(dirty[i].size && !((dirty[i].gpa | dirty[i].size) & 0xFFF) && fz_gpa(&w, dirty[i].gpa) &&
				  fz_gpa(&w, dirty[i].gpa + dirty[i].size - 1));
	} while (n == 64);
	fz_world_free(&w);
	return 0;
}
