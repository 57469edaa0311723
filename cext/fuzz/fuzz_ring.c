/* Fuzz target: the request virtqueue walker (hr_relay_process, the entry
 * point Relay.process_queue uses) over a guest-memory image the input
 * writes: queue size, ring addresses, descriptor and indirect tables, the
 * avail ring and every request byte.  The kernel fails where the input says.
 * After every call, the invariants of fz_world_check hold.
 *
 * Input: struct fz_ring_hdr (its pad: bit 0 also runs the benchmark
 * walkers, bit 1 serves through the lock-taking entry point), then the first guest RAM region's bytes (the
 * region is 64 KiB; a shorter input leaves the rest zero), then, from
 * offset 64 KiB on, the second region's.
 */
#include <string.h>

#include "harness.h"
#include "ring.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct fz_world w;
	struct fz_ring_hdr h;
	static struct hr_queue q;

	if (size < sizeof(h))
		return 0;
	memcpy(&h, data, sizeof(h));
	data += sizeof(h);
	size -= sizeof(h);
	fz_world_init(&w, h.ncont & 3, 1 + h.entry_limit, h.memlock ? (uint64_t)h.memlock << 12 : UINT64_MAX);
	fz_ring_load(&w, data, size);
	if (fz_ring_setup(&w, &h, &q) == 0) {
		fk_fail_next(h.fail_nth, fz_errno(h.fail_err));
		fz_serve(&w, &q, 64, h.pad & 2);
		fz_world_check(&w);
		/* The guest makes more available: the walker goes on where it was. */
		fz_ring_kick(&q, h.navail2);
		fz_serve(&w, &q, 64, h.pad & 2);
		fz_world_check(&w);
		if (h.pad & 1) {
			/* The benchmarks' walkers read the same guest memory:
			 * the floor (into the lone container 3, no checks kept
			 * after it) and the C-driven ring. */
			uint16_t heads[8];
			uint32_t n = h.navail & 7;
			for (uint32_t i = 0; i < n; i++)
				heads[i] = q.vq.avail->ring[i & (q.vq.size - 1)];
			hr_relay_bench_ring(w.relay, &q, heads, n, 1);
			fz_ring_kick(&q, h.navail2);
			hr_relay_bench_floor(w.relay, &q, FZ_FD0 + 3);
		}
	}
	fz_world_free(&w);
	return 0;
}
