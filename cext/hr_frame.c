/* hostrelay: MAP/UNMAP requests as bytes (§5.13.6.1 framing).
 *
 * Decoding a request as the guest wrote it, carrying out a decoded one, and
 * where its reply goes; and handle_request's door (hr_relay_request,
 * hr_relay_fast), one request per call from Python.  The ring (hr_burst.c)
 * decodes with the same code, so both doors agree on what a well-framed
 * request is.  Apart from MAP/UNMAP themselves because this is the only
 * code that reads a request's bytes, which the guest may rewrite while they
 * are read: what it hands on is a copy, read once.
 */
#include "hr_relay_int.h"

#include <pthread.h>
#include <string.h>

static uint32_t le32(const uint8_t *p)
{
	uint32_t v;
	memcpy(&v, p, 4);
	return v; /* little-endian host (hr_vq.h) */
}

static uint64_t le64(const uint8_t *p)
{
	uint64_t v;
	memcpy(&v, p, 8);
	return v;
}

int hr_parse_plain(const uint8_t *req, uint64_t rlen, uint64_t wlen, struct hr_req *q)
{
	/* req may be guest memory the driver can rewrite while we read it:
	 * every field is read exactly once, into q, and only q is checked and
	 * used. */
	const uint8_t *b = req + 4; /* head.reserved ignored (D-09) */

	if (wlen != 4)
		return 0;
	/* The length first: then the type byte is read only where it can make
	 * the request plain. */
	if (rlen == HR_MAP_REQ_SIZE) {
		q->type = __atomic_load_n(req, __ATOMIC_RELAXED);
		if (q->type != HR_T_MAP)
			return 0;
		q->phys = le64(b + 20);
		q->flags = le32(b + 28);
	} else if (rlen == HR_UNMAP_REQ_SIZE) {
		q->type = __atomic_load_n(req, __ATOMIC_RELAXED);
		if (q->type != HR_T_UNMAP)
			return 0;
		q->flags = le32(b + 20);
	} else {
		return 0;
	}
	q->domain = le32(b);
	q->start = le64(b + 4);
	q->end = le64(b + 12);
	return 1;
}

int hr_execute(hr_relay *r, const struct hr_req *q, struct hr_result *res)
{
	if (q->type == HR_T_MAP)
		return hr_relay_map(r, q->domain, q->start, q->end, q->phys, q->flags, res);
	if (q->flags) {
		/* D-29: INVAL; a rejected request changes nothing. */
		hr_result_init(res, HR_T_UNMAP, q->domain, q->start, q->end);
		return hr_refuse(res, HR_S_INVAL, HR_R_RESERVED_FIELD);
	}
	return hr_relay_unmap(r, q->domain, q->start, q->end, res);
}

void hr_put_reply(const struct hr_chain *c, uint64_t n, const uint8_t *tail)
{
	uint64_t pos = 0;

	for (uint32_t i = 0; i < c->nwrite && pos < n; i++) {
		uint8_t *dst = (uint8_t *)(uintptr_t)c->wr[i].hva;
		for (uint32_t k = 0; k < c->wr[i].len && pos < n; k++, pos++)
			dst[k] = pos + 4 >= n ? tail[pos - (n - 4)] : 0;
	}
}

int64_t hr_relay_request(hr_relay *r, const uint8_t *req, uint64_t rlen, uint64_t wlen, uint8_t *tail,
			 struct hr_result *res)
{
	struct hr_req q;

	memset(tail, 0, 4);
	if (hr_parse_plain(req, rlen, wlen, &q)) {
		tail[0] = (uint8_t)hr_execute(r, &q, res);
		return 4;
	}
	if (rlen < 1)
		return -1;
	uint8_t type = __atomic_load_n(req, __ATOMIC_RELAXED);
	if (type != HR_T_MAP && type != HR_T_UNMAP)
		return -1; /* the control plane's (Python) request */
	/* A MAP/UNMAP split any other way is refused undecoded. */
	hr_result_init(res, type, 0, 0, 0);
	if (rlen < 4 || wlen < 4 || wlen > r->max_writable)
		return 0; /* no place for a tail: used length 0 */
	tail[0] = (uint8_t)hr_refuse(res, HR_S_INVAL, HR_R_FRAMING);
	return (int64_t)wlen;
}

__attribute__((flatten)) int hr_relay_fast(hr_relay *r, const uint8_t *req, uint64_t rlen, uint64_t wlen,
					   struct hr_result *res)
{
	/* Only the plain case: a well-framed MAP/UNMAP whose reply is the 4-byte
	 * tail.  Anything else returns -1 having changed nothing.  The lock is
	 * taken here, so the Python caller needs no lock of its own. */
	struct hr_req q;

	if (!hr_parse_plain(req, rlen, wlen, &q))
		return -1;
	pthread_mutex_lock(&r->lock);
	int st = hr_execute(r, &q, res);
	if (st != HR_S_DEFER && (res->reason == HR_R_KERNEL || res->reason == HR_R_MISMATCH))
		return HR_FAST_REPORT | st; /* still locked: the caller reports *res, then unlocks */
	pthread_mutex_unlock(&r->lock);
	return st == HR_S_DEFER ? -1 : st; /* DEFER: nothing was changed, the caller takes the full path */
}
