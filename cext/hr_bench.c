/* hostrelay: the benchmarks' entry points (tests/bench_vfio.py), never a way
 * to serve a guest.
 *
 * The relay's own cost with the Python and the ring taken away in turn:
 * MAP+UNMAP straight into the data plane, the ring with the driver's side
 * in C too, and the floor under the ring (its walk with none of the
 * relay's work).  Apart from the data plane so that nothing here can be
 * mistaken for a path a guest reaches; the floor must keep walking the ring
 * the way hr_burst.c does, or it stops being the floor.
 */
#include "hr_relay_int.h"

#include <errno.h>

__attribute__((flatten)) int hr_relay_bench_map_unmap(hr_relay *r, uint32_t domain, uint64_t iova, uint64_t gpa, uint64_t size,
			     uint32_t count, uint32_t spread)
{
	/* The data plane's own cost: MAP+UNMAP pairs straight into
	 * hr_relay_map/hr_relay_unmap, no ring and no Python, cycling over
	 * `spread` pages like tests/bench_vfio.py's other loops. */
	struct hr_result res;

	for (uint32_t i = 0; i < count; i++) {
		uint64_t off = spread ? (i % spread) * size : 0;
		int st = hr_relay_map(r, domain, iova + off, iova + off + size - 1, gpa + off,
				      HR_MAP_F_READ | HR_MAP_F_WRITE, &res);
		if (st)
			return -st;
		st = hr_relay_unmap(r, domain, iova + off, iova + off + size - 1, &res);
		if (st)
			return -st;
	}
	return 0;
}

int hr_relay_bench_ring(hr_relay *r, struct hr_queue *q, const uint16_t *heads, uint32_t n, uint32_t batches)
{
	/* The ring with the driver's side done in C too: publish the same n
	 * chain heads, serve them, count the used elements; batches times.
	 * What process_queue costs without any Python between batches. */
	struct hr_vq *vq = &q->vq;

	for (uint32_t b = 0; b < batches; b++) {
		uint16_t idx = vq->avail->idx;
		for (uint32_t i = 0; i < n; i++)
			vq->avail->ring[(uint16_t)(idx + i) & (vq->size - 1)] = heads[i];
		__atomic_store_n(&vq->avail->idx, (uint16_t)(idx + n), __ATOMIC_RELEASE);
		int rc = hr_relay_process(r, q);
		if ((rc & (HR_PROCESS_CODE | HR_PROCESS_ERRORS)) || (uint32_t)(rc >> HR_PROCESS_SHIFT) != n)
			return -1;
	}
	return 0;
}

__attribute__((flatten)) int hr_relay_bench_floor(hr_relay *r, struct hr_queue *q, int container_fd)
{
	/* The floor under hr_relay_process, for the benchmark only: the same
	 * walk over the same ring, but each plain MAP/UNMAP goes straight to
	 * one container's ioctl with none of the relay's work (no checks, no
	 * table, no accounting, no lock).  What the ring would cost if the
	 * relay did nothing but forward; never a way to serve a guest.
	 * Returns the requests completed, or -errno (-EINVAL: a request the
	 * floor does not handle, left available; -EIO: an UNMAP removed other
	 * than the bytes it named). */
	struct hr_vq *vq = &q->vq;
	static const struct hr_gmem_region none;
	const struct hr_gmem_region *hot = &none;
	struct hr_pair p;
	struct hr_req rq;
	int done = 0;
	uint16_t avail_idx = __atomic_load_n(&vq->avail->idx, __ATOMIC_ACQUIRE);

	while (vq->last_avail != avail_idx) {
		if (!hr_vq_take_pair(vq, &p, HR_MAP_REQ_SIZE, &hot) || !hr_parse_plain(p.rd, p.rlen, p.wlen, &rq)) {
			done = -EINVAL;
			break;
		}
		uint64_t size = rq.end - rq.start + 1, hva = 0, got = 0;
		int rc;
		if (rq.type == HR_T_UNMAP) {
			rc = hr_vfio_unmap_dma(container_fd, 0, rq.start, size, &got);
			if (rc == 0 && got != size)
				rc = -EIO; /* as the raw loop (hr_vfio_bench_map_unmap) checks */
		} else {
			rc = hr_piece(r, rq.phys, size, &hva) == size
				     ? hr_vfio_map_dma(container_fd, hr_dma_flags(rq.flags), hva, rq.start, size)
				     : -EFAULT;
		}
		if (rc < 0) {
			done = rc;
			break;
		}
		uint32_t t = HR_S_OK;
		__builtin_memcpy(p.wr, &t, 4);
		hr_vq_put(vq, p.head, 4);
		done++;
	}
	hr_vq_publish(vq);
	return done;
}

