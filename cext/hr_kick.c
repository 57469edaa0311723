/* hostrelay: the request queue served from a thread of its own (hr_kick_*).
 *
 * Why: the Linux virtio-iommu driver (6.12 viommu_sync_req) sends one
 * request at a time and spins on the used ring until it is completed, so a
 * guest MAP/UNMAP cycle costs two round trips through the device.  Served
 * from the Python loop, each round trip pays a thread wake-up plus ~4.5 us
 * of Python around hr_relay_process.  Here a thread blocks on the ring's
 * kick eventfd and serves what hr_relay_process serves in C itself (plain
 * MAP/UNMAP, the fast run and the general C walk), with no Python at all.
 *
 * What the C walk cannot finish (ATTACH/DETACH/PROBE, a deferred domain, a
 * kernel failure to report, a broken queue, a full recording buffer, a guest
 * RAM layout C has not been given) is handed to Python: the thread gives
 * the chain it stopped at back to the ring (last_avail--: hr_relay_process
 * changed nothing for it), keeps the failures to report in errs[], releases
 * the relay's lock, writes the "needs Python" eventfd and parks until
 * hr_kick_resume.  Python then serves the ring from where the thread
 * stopped, in ring order, exactly as a kick did before.  The lock is never
 * held across the hand-over: a pthread mutex may only be unlocked by the
 * thread that locked it (POSIX: undefined otherwise).
 *
 * Nothing here allocates after hr_kick_start, and the thread never touches
 * Python objects: it may run while Python holds the GIL, and Python blocks
 * on the relay's mutex only with the GIL released (cffi releases it around
 * every call).
 */
#include "hr_relay_int.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

struct hr_kick {
	hr_relay *r;
	struct hr_queue *q;
	/* The queue's rings in guest RAM: fixed while the thread lives (a new
	 * ring or a reset stops it first), so the spin reads them unlocked. */
	struct vring_avail *avail;
	struct vring_used *used;
	int kick_fd, call_fd, need_fd; /* the caller's */
	int stop_fd, resume_fd;        /* ours */
	/* C may serve only while these are equal (GuestMemory.generation_cell
	 * and DataPlane.fast_cell): otherwise Python has guest RAM or
	 * RLIMIT_MEMLOCK to bring up to date first. */
	const volatile int64_t *mem_gen, *fast_gen;
	uint64_t spin_ns;
	pthread_t thread;
	int running;  /* pthread_create succeeded and not yet joined */
	int stopping; /* hr_kick_stop: leave the spin too */
	int failed;   /* the thread ended on its own (poll failed): Python serves the kicks */
	int rt_error; /* pthread_setschedparam's error for rt_priority, else 0 */
	/* Kernel failures the thread's walk met, for Python to report (lock
	 * held to read or write). */
	uint32_t nerrs;
	struct hr_result errs[HR_QUEUE_ERRS];
	struct hr_kick_stats st; /* written by the thread, read with relaxed loads */
};

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void bump(uint64_t *counter, uint64_t n)
{
	__atomic_store_n(counter, __atomic_load_n(counter, __ATOMIC_RELAXED) + n, __ATOMIC_RELAXED);
}

static void signal_fd(int fd)
{
	uint64_t one = 1;

	/* EAGAIN: the counter is at its maximum, the reader has a wake-up
	 * pending anyway.  Any other error cannot be reported from here; the
	 * other side notices the missing completion as it would a lost
	 * interrupt. */
	while (write(fd, &one, sizeof(one)) < 0 && errno == EINTR)
		;
}

static void drain_fd(int fd)
{
	uint64_t v;

	while (read(fd, &v, sizeof(v)) < 0 && errno == EINTR)
		;
}

/* One serve of the ring under the relay's lock.  Returns 1 when Python is
 * needed (nothing past the chain that needs it was taken), else 0; *done
 * gets the chains completed, *seen the avail index the walk got to. */
static int kick_serve(struct hr_kick *k, uint32_t *done, uint16_t *seen)
{
	hr_relay *r = k->r;
	struct hr_queue *q = k->q;
	int need;

	*done = 0;
	pthread_mutex_lock(&r->lock);
	if (k->nerrs || __atomic_load_n(k->mem_gen, __ATOMIC_RELAXED) != __atomic_load_n(k->fast_gen, __ATOMIC_RELAXED)) {
		need = 1;
	} else {
		int rc = hr_relay_process(r, q);
		int code = rc & HR_PROCESS_CODE;
		*done = (uint32_t)rc >> HR_PROCESS_SHIFT;
		if (rc & HR_PROCESS_ERRORS) {
			memcpy(k->errs, q->errs, q->nerrs * sizeof(q->errs[0]));
			k->nerrs = q->nerrs;
			q->nerrs = 0;
		}
		/* HR_PROCESS_CALLER: the chain is taken but nothing was done
		 * with it (a control-plane request or a deferred domain; see
		 * hr_relay_process), so it goes back to the ring and Python's
		 * walk meets it again, in order. */
		if (code == HR_PROCESS_CALLER)
			q->vq.last_avail--;
		need = code != HR_PROCESS_IDLE || (rc & HR_PROCESS_ERRORS);
	}
	*seen = q->vq.last_avail;
	pthread_mutex_unlock(&r->lock);
	bump(&k->st.served, *done);
	return need;
}

/* The driver's interrupt, unless it asked for none. */
static void kick_call(struct hr_kick *k)
{
	/* virtio 1.2 §2.7.7.2: the device reads avail->flags after publishing
	 * the used index (hr_vq_publish, a release store); a full barrier
	 * between the two, as the driver has between writing flags and
	 * reading the used index.  No VIRTIO_F_EVENT_IDX is offered, so the
	 * flag is the driver's only say.  Linux 6.12's virtio-iommu sets
	 * VRING_AVAIL_F_NO_INTERRUPT on its request queue (it spins instead). */
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	if (k->call_fd < 0 || (__atomic_load_n(&k->avail->flags, __ATOMIC_RELAXED) & VRING_AVAIL_F_NO_INTERRUPT))
		return;
	signal_fd(k->call_fd);
	bump(&k->st.calls, 1);
}

static void set_no_notify(struct hr_kick *k, int on)
{
	/* used->flags is the device's to write; only this thread writes it
	 * while it runs (vhost_user.py's own busy poll is off then). */
	uint16_t f = __atomic_load_n(&k->used->flags, __ATOMIC_RELAXED);
	f = on ? f | VRING_USED_F_NO_NOTIFY : f & ~VRING_USED_F_NO_NOTIFY;
	__atomic_store_n(&k->used->flags, f, __ATOMIC_RELAXED);
}

/* A kick: serve, interrupt, and with spin_ns look at the avail index that
 * long for the driver's next request before sleeping again.  1: Python is
 * needed. */
static int kick_round(struct hr_kick *k)
{
	uint32_t done;
	uint16_t seen;

	if (kick_serve(k, &done, &seen))
		return 1;
	if (done)
		kick_call(k);
	if (!k->spin_ns || !done)
		return 0;
	/* §2.7.10: with VRING_USED_F_NO_NOTIFY set the driver need not kick
	 * (Linux 6.12 virtqueue_kick_prepare_split reads it after a full
	 * barrier); a kick sent anyway is an empty round later. */
	set_no_notify(k, 1);
	uint64_t deadline = now_ns() + k->spin_ns;
	for (;;) {
		if (__atomic_load_n(&k->avail->idx, __ATOMIC_ACQUIRE) != seen) {
			int need = kick_serve(k, &done, &seen);
			bump(&k->st.spin_hits, 1);
			if (need) {
				set_no_notify(k, 0);
				return 1;
			}
			if (done)
				kick_call(k);
			deadline = now_ns() + k->spin_ns;
			continue;
		}
		if (__atomic_load_n(&k->stopping, __ATOMIC_RELAXED))
			break;
		if (now_ns() >= deadline) {
			/* Clear the flag, then look once more: a request made
			 * available before the driver saw the clear came with
			 * no kick (the same store -> full barrier -> load the
			 * driver does the other way round). */
			set_no_notify(k, 0);
			__atomic_thread_fence(__ATOMIC_SEQ_CST);
			if (__atomic_load_n(&k->avail->idx, __ATOMIC_ACQUIRE) == seen)
				return 0;
			set_no_notify(k, 1);
			deadline = now_ns() + k->spin_ns;
			continue;
		}
		__builtin_ia32_pause();
	}
	set_no_notify(k, 0);
	return 0;
}

/* Wait for fds[0] or the stop fd; 0: fds[0] is readable, 1: stop, -1: poll failed. */
static int kick_wait(struct hr_kick *k, int fd)
{
	struct pollfd w[2] = { { .fd = fd, .events = POLLIN }, { .fd = k->stop_fd, .events = POLLIN } };

	for (;;) {
		int n = poll(w, 2, -1);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -1;
		if (w[1].revents)
			return 1;
		if (w[0].revents & (POLLERR | POLLNVAL))
			return -1;
		if (w[0].revents)
			return 0;
	}
}

/* The thread's way out: asked to stop (w = 1), or poll failed (w < 0), when
 * Python must take the kicks back (hr_kick_failed says so; the "needs
 * Python" eventfd wakes it). */
static void *kick_exit(struct hr_kick *k, int w)
{
	if (w < 0) {
		__atomic_store_n(&k->failed, 1, __ATOMIC_RELAXED);
		signal_fd(k->need_fd);
	}
	return NULL;
}

static void *kick_main(void *arg)
{
	struct hr_kick *k = arg;

	for (;;) {
		int w = kick_wait(k, k->kick_fd);
		if (w)
			return kick_exit(k, w);
		drain_fd(k->kick_fd); /* an eventfd: back to 0; the kicks are one wake-up */
		bump(&k->st.kicks, 1);
		if (!kick_round(k))
			continue;
		/* Python's turn: it serves the ring from where the walk
		 * stopped, then resumes us. */
		bump(&k->st.handovers, 1);
		signal_fd(k->need_fd);
		w = kick_wait(k, k->resume_fd);
		if (w)
			return kick_exit(k, w);
		drain_fd(k->resume_fd);
		/* Kicks that came while parked are still counted in the kick
		 * eventfd: the next wait returns at once. */
	}
}

hr_kick *hr_kick_start(hr_relay *r, struct hr_queue *q, int kick_fd, int call_fd, int need_fd,
		       const int64_t *mem_gen, const int64_t *fast_gen, uint64_t spin_ns, int rt_priority)
{
	hr_kick *k = calloc(1, sizeof(*k));
	sigset_t all, old;

	if (!k)
		return NULL;
	k->r = r;
	k->q = q;
	k->avail = q->vq.avail;
	k->used = q->vq.used;
	k->kick_fd = kick_fd;
	k->call_fd = call_fd;
	k->need_fd = need_fd;
	k->mem_gen = mem_gen;
	k->fast_gen = fast_gen;
	k->spin_ns = spin_ns;
	k->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	k->resume_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (k->stop_fd < 0 || k->resume_fd < 0 || !q->vq.avail || !q->vq.used)
		goto fail;
	/* Every signal blocked in the thread: process-directed ones (SIGTERM
	 * to `hostrelay serve`) go to a thread that has Python's handlers. */
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	int rc = pthread_create(&k->thread, NULL, kick_main, k);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	if (rc)
		goto fail;
	k->running = 1;
	if (rt_priority > 0) {
		/* SCHED_FIFO: a kick wakes the thread at once even on a host
		 * whose cores are busy (CFS may let it wait for a time slice
		 * of whatever runs there).  It blocks between kicks, so it
		 * takes the core only for the request itself.  Needs
		 * CAP_SYS_NICE or RLIMIT_RTPRIO; otherwise it stays a normal
		 * thread and hr_kick_rt_error says why. */
		struct sched_param sp = { .sched_priority = rt_priority };
		k->rt_error = pthread_setschedparam(k->thread, SCHED_FIFO, &sp);
	}
	return k;
fail:
	if (k->stop_fd >= 0)
		close(k->stop_fd);
	if (k->resume_fd >= 0)
		close(k->resume_fd);
	free(k);
	return NULL;
}

void hr_kick_stop(hr_kick *k)
{
	if (!k->running)
		return;
	__atomic_store_n(&k->stopping, 1, __ATOMIC_RELAXED);
	signal_fd(k->stop_fd);
	pthread_join(k->thread, NULL);
	k->running = 0;
	/* The thread leaves NO_NOTIFY clear on every way out but this one
	 * from inside the spin: the next owner of the ring starts clean. */
	set_no_notify(k, 0);
}

void hr_kick_free(hr_kick *k)
{
	if (!k)
		return;
	hr_kick_stop(k);
	close(k->stop_fd);
	close(k->resume_fd);
	free(k);
}

void hr_kick_resume(hr_kick *k)
{
	signal_fd(k->resume_fd);
}

int hr_kick_rt_error(const hr_kick *k)
{
	return k->rt_error;
}

int hr_kick_failed(const hr_kick *k)
{
	return __atomic_load_n(&k->failed, __ATOMIC_RELAXED);
}

uint32_t hr_kick_take_errs(hr_kick *k, struct hr_result *out)
{
	uint32_t n = k->nerrs;

	memcpy(out, k->errs, n * sizeof(k->errs[0]));
	k->nerrs = 0;
	return n;
}

void hr_kick_get_stats(const hr_kick *k, struct hr_kick_stats *out)
{
	out->kicks = __atomic_load_n(&k->st.kicks, __ATOMIC_RELAXED);
	out->served = __atomic_load_n(&k->st.served, __ATOMIC_RELAXED);
	out->handovers = __atomic_load_n(&k->st.handovers, __ATOMIC_RELAXED);
	out->calls = __atomic_load_n(&k->st.calls, __ATOMIC_RELAXED);
	out->spin_hits = __atomic_load_n(&k->st.spin_hits, __ATOMIC_RELAXED);
}
