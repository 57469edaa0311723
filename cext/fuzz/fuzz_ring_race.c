/* Fuzz target: the ring walker while the guest rewrites its ring.  The
 * guest owns that memory and may change descriptors, the avail ring and its
 * index at any moment; what must hold is no out-of-bounds access, no crash
 * and no hang, and the relay's own bookkeeping (fz_world_check) stays true:
 * whatever the guest wrote, the kernel holds what the table says.
 *
 * Input: struct fz_ring_hdr, 2 bytes of racer length R, R bytes of racer
 * script (pairs: an offset into the ring area, a byte to store there), then
 * the guest image as for fuzz_ring.
 */
#include <pthread.h>
#include <string.h>

#include "harness.h"
#include "ring.h"

struct racer {
	uint8_t *ram;
	const uint8_t *script;
	size_t len;
	int stop;
};

static void *race(void *arg)
{
	struct racer *r = arg;

	/* Replay the script over and over until the walker is done: stores to
	 * the first 8 KiB of guest RAM (where the rings of a typical input sit)
	 * and to the avail index wherever the ring is. */
	for (size_t i = 0; !__atomic_load_n(&r->stop, __ATOMIC_ACQUIRE); i += 2) {
		if (i + 1 >= r->len)
			i = 0;
		uint16_t off = (uint16_t)(r->script[i] | (r->script[i + 1] & 0x1F) << 8);
		__atomic_store_n(&r->ram[off], r->script[i + 1], __ATOMIC_RELAXED);
	}
	return NULL;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct fz_world w;
	struct fz_ring_hdr h;
	static struct hr_queue q;
	struct racer rc;
	pthread_t th;

	if (size < sizeof(h) + 2)
		return 0;
	memcpy(&h, data, sizeof(h));
	size_t rlen = data[sizeof(h)] | (size_t)data[sizeof(h) + 1] << 8;
	data += sizeof(h) + 2;
	size -= sizeof(h) + 2;
	if (rlen > size || rlen < 2)
		return 0;
	fz_world_init(&w, h.ncont & 3, 1 + h.entry_limit, UINT64_MAX);
	fz_ring_load(&w, data + rlen, size - rlen);
	if (fz_ring_setup(&w, &h, &q) == 0) {
		rc = (struct racer){ w.ram[0], data, rlen & ~(size_t)1, 0 };
		FZ_ASSERT(pthread_create(&th, NULL, race, &rc) == 0);
		for (int k = 0; k < 4; k++) {
			fz_serve(&w, &q, 16, k & 1);
			fz_ring_kick(&q, h.navail2 & 7);
		}
		__atomic_store_n(&rc.stop, 1, __ATOMIC_RELEASE);
		pthread_join(th, NULL);
		fz_world_check(&w);
	}
	fz_world_free(&w);
	return 0;
}
