/* hostrelay: the request virtqueue served in C (hr_relay_process).
 *
 * The hot path of the whole relay: a burst of plain MAP/UNMAP is walked,
 * decoded (hr_frame.c), carried out (hr_fanout.c) and completed in one call
 * from Python, and the used index published once.  Anything the walk does
 * not serve itself (another request type, a deferred domain) is handed to
 * the caller in struct hr_queue.  Apart from the single-request door because
 * its phases, ordering and give-back rules are the ring's, not a request's.
 */
#include "hr_relay_int.h"

#include <pthread.h>

/* Write len bytes of reply into the chain's writable part and complete it. */
void hr_relay_complete(struct hr_vq *vq, const struct hr_chain *c, const uint8_t *reply, uint64_t len)
{
	hr_chain_write(c, reply, len);
	hr_vq_push(vq, c->head, (uint32_t)len);
}

/* Hand a two-descriptor request the fast path took to the caller, in the
 * same form hr_vq_pop gives. */
static void pair_to_chain(const struct hr_pair *p, struct hr_chain *c)
{
	c->head = p->head;
	c->nread = c->nwrite = 1;
	c->rd[0] = (struct hr_seg){ (uint64_t)(uintptr_t)p->rd, p->rlen };
	c->wr[0] = (struct hr_seg){ (uint64_t)(uintptr_t)p->wr, p->wlen };
	c->read_len = p->rlen;
	c->write_len = p->wlen;
}

static int process_exit(struct hr_queue *q, int code, uint32_t completed, uint32_t nerrs)
{
	hr_vq_publish(&q->vq);
	q->nerrs = nerrs;
	return code | (nerrs ? HR_PROCESS_ERRORS : 0) | (int)(completed << HR_PROCESS_SHIFT);
}

int hr_relay_process_locked(hr_relay *r, struct hr_queue *q)
{
	pthread_mutex_lock(&r->lock);
	int rc = hr_relay_process(r, q);
	if (!(rc & (HR_PROCESS_CODE | HR_PROCESS_ERRORS)))
		pthread_mutex_unlock(&r->lock);
	return rc; /* otherwise still locked: the caller finishes, then unlocks */
}

/* flatten: the whole request path (decode, checks, table, ioctl wrappers)
 * inlined into one function.  Measured under TCG, where every return is an
 * indirect jump the emulator has to look up, this is worth more than the
 * instructions it saves. */
__attribute__((flatten)) int hr_relay_process(hr_relay *r, struct hr_queue *q)
{
	/* The hot path of the whole relay.  Each available plain MAP/UNMAP is
	 * taken, decoded, carried out and completed in one pass, with the
	 * request, its two buffers and its status kept in registers rather
	 * than staged in arrays (measured with callgrind: staging a burst in
	 * three phases cost ~50 instructions a MAP+UNMAP pair more).  The
	 * used index is published once per call (§2.7.8 allows it).  A request
	 * the driver made available is read once: the driver may not change it
	 * until it is used (virtio 1.2 "Supplying Buffers to The Device"). */
	struct hr_vq *vq = &q->vq;
	uint8_t buf[64], tail[4];
	struct hr_result res;
	uint32_t completed = 0, nerrs = 0;
	uint16_t avail_idx = vq->last_avail;
	static const struct hr_gmem_region none; /* size 0: the first lookup searches */
	const struct hr_gmem_region *hot = &none;
	int why;

	q->nerrs = 0;
	if (!vq->ready)
		return HR_PROCESS_IDLE;
	if (vq->broken)
		return HR_PROCESS_BROKEN;
	for (;;) {
		if (vq->last_avail == avail_idx) {
			avail_idx = __atomic_load_n(&vq->avail->idx, __ATOMIC_ACQUIRE);
			if (vq->last_avail == avail_idx)
				return process_exit(q, HR_PROCESS_IDLE, completed, nerrs);
			if (!hr_vq_avail_ok(vq, avail_idx))
				return process_exit(q, HR_PROCESS_BROKEN, completed, nerrs);
		}
		if (nerrs == HR_QUEUE_ERRS)
			return process_exit(q, HR_PROCESS_FULL, completed, nerrs);
		if (__builtin_expect(q->rec != NULL, 0)) {
			if (q->nrec == q->rec_cap)
				return process_exit(q, HR_PROCESS_FULL, completed, nerrs);
			goto general; /* recording: one chain at a time, each logged */
		}

		/* The common case.  A chain of another shape or a request of
		 * another kind ends the run and is left available for the
		 * general walk below.  The queue's used fields live in locals
		 * (the tails are guest memory, which the compiler cannot tell
		 * from *vq) and go back before anything else can read them. */
		struct vring_used_elem *used = vq->used->ring;
		uint32_t umask = vq->size - 1, run = 0;
		uint16_t uidx = vq->used_idx;
		struct hr_pair p;
		struct hr_req rq;
		while (vq->last_avail != avail_idx && hr_vq_take_pair(vq, &p, HR_MAP_REQ_SIZE, &hot)) {
			if (!hr_parse_plain(p.rd, p.rlen, p.wlen, &rq)) {
				vq->last_avail--;
				break;
			}
			int st = hr_ring_execute(r, &rq, &res);
			if (__builtin_expect(st == HR_S_DEFER, 0)) {
				/* Nothing was changed, and the chain stays taken:
				 * it is the caller's now. */
				vq->used_idx = uidx;
				pair_to_chain(&p, &q->chain);
				return process_exit(q, HR_PROCESS_CALLER, completed, nerrs);
			}
			/* The tail is the status and three zero bytes. */
			uint32_t t = (uint32_t)st; /* little-endian host (hr_vq.h) */
			__builtin_memcpy(p.wr, &t, 4);
			used[uidx & umask] = (struct vring_used_elem){ p.head, 4 };
			uidx++;
			completed++;
			run++;
			/* res is only filled when st is not OK (and a kernel
			 * failure or a mismatch never is OK).  errs[] full: the
			 * rest waits for the next call. */
			if (__builtin_expect(st != HR_S_OK, 0) &&
			    (res.reason == HR_R_KERNEL || res.reason == HR_R_MISMATCH)) {
				q->errs[nerrs++] = res;
				if (nerrs == HR_QUEUE_ERRS)
					break;
			}
		}
		vq->used_idx = uidx;
		if (run)
			continue;

		/* Anything else, one chain at a time. */
	general:;
		struct hr_chain *c = &q->chain;
		int got = hr_vq_pop(vq, c, &why);
		if (vq->broken)
			return process_exit(q, HR_PROCESS_BROKEN, completed, nerrs);
		if (got == 0) {
			/* The index in guest memory no longer says there is one
			 * (the driver, or the device's own reply over a ring the
			 * guest overlapped, rewrote it): read it again. */
			avail_idx = vq->last_avail;
			continue;
		}
		if (got < 0) {
			/* Malformed chain: complete it with used length 0. */
			hr_vq_put(vq, c->head, 0);
			completed++;
			continue;
		}
		hr_chain_read(c, buf, sizeof(buf));
		int64_t reply = hr_relay_request(r, buf, c->read_len, c->write_len, tail, &res);
		if (reply < 0 || res.status == HR_S_DEFER)
			return process_exit(q, HR_PROCESS_CALLER, completed, nerrs);
		if (reply > 0)
			hr_put_reply(c, (uint64_t)reply, tail);
		hr_vq_put(vq, c->head, (uint32_t)reply);
		completed++;
		if (q->rec) {
			struct hr_record *e = &q->rec[q->nrec++];
			__builtin_memcpy(e->req, buf, sizeof(e->req));
			e->read_len = (uint32_t)(c->read_len > UINT32_MAX ? UINT32_MAX : c->read_len);
			e->write_len = (uint32_t)(c->write_len > UINT32_MAX ? UINT32_MAX : c->write_len);
			e->used_len = (uint32_t)reply;
			__builtin_memcpy(e->tail, tail, 4);
		}
		if (res.reason == HR_R_KERNEL || res.reason == HR_R_MISMATCH)
			q->errs[nerrs++] = res;
	}
}

