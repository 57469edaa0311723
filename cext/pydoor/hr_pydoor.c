/* hostrelay: handle_request's door as a native Python callable.
 *
 * Not a C file of its own: build_native.py includes it into the cffi
 * module's source, the one place that sees <Python.h> (cffi includes it
 * first, with Py_LIMITED_API set to 3.11 by build_native.py), so the data
 * plane's files stay plain C the fuzz targets build without Python.
 *
 * Why: handle_request is one request per call from Python.  As a Python
 * method its MAP/UNMAP fast path was a Python frame, four attribute loads,
 * a compare and a cffi call of five converted arguments; measured under
 * --icount (tests/bench_vfio.py, 1024 pairs) that cost 1.88x the raw ioctl
 * loop per MAP+UNMAP pair, against 1.44x for the two bare cffi calls
 * alone.  Here it is one METH_FASTCALL call: the checks the Python method
 * made (exact bytes, an int writable length, the memory generation the fast
 * path may run at), hr_relay_fast with the GIL released, and a cached tail
 * object for a plain status: 1.28x raw (11.35 us a pair against 16.73; on
 * the host, callgrind counts 3.8k instructions a pair against 8.8k).
 *
 * Everything else is the Python code's, unchanged (Requests in
 * hostrelay/dataplane/requests.py gives the three callables):
 *   full      the whole Python handle_request: arguments C does not take
 *             as they are (not exact bytes, not an exact non-negative int
 *             below 2^63, keywords), so they meet the same code as before;
 *   rest      the control-plane path: a request hr_relay_fast declined (-1,
 *             nothing changed) or a stale memory generation;
 *   reported  hr_relay_fast returned HR_FAST_REPORT | status with the
 *             relay's lock held: report the failure, unlock, give the reply.
 *
 * The GIL is released around hr_relay_fast because it takes the relay's
 * mutex, and Python code holds that mutex while holding the GIL elsewhere
 * (RelayLock in hostrelay/dataplane/handle.py): blocking on it with the GIL
 * held would deadlock.
 */
#include <string.h>

#include "hr_relay.h"

#ifndef METH_FASTCALL
#error "the native door needs METH_FASTCALL (Py_LIMITED_API >= 3.10, set in build_native.py)"
#endif

typedef struct {
	PyObject_HEAD
	hr_relay *r;
	struct hr_result *res;
	/* The fast path runs only while *mem_gen == *fast_gen: GuestMemory's
	 * generation_cell and DataPlane's fast_cell (int64 arrays, held
	 * exported in the two views so they cannot move). */
	const volatile int64_t *mem_gen, *fast_gen;
	Py_buffer mem_view, fast_view;
	int views; /* how many of the two views are held */
	PyObject *owner; /* keeps the C relay and result alive (the DataPlane) */
	PyObject *full, *rest, *reported;
	PyObject *tails[256]; /* the 4-byte tail of each status */
} hr_door;

static int door_traverse(PyObject *self, visitproc visit, void *arg)
{
	hr_door *d = (hr_door *)self;

	Py_VISIT(d->owner);
	Py_VISIT(d->full);
	Py_VISIT(d->rest);
	Py_VISIT(d->reported);
	Py_VISIT(Py_TYPE(self)); /* a heap type (3.9+: instances visit it) */
	return 0;
}

static int door_clear(PyObject *self)
{
	hr_door *d = (hr_door *)self;

	Py_CLEAR(d->owner);
	Py_CLEAR(d->full);
	Py_CLEAR(d->rest);
	Py_CLEAR(d->reported);
	return 0;
}

static void door_dealloc(PyObject *self)
{
	hr_door *d = (hr_door *)self;
	PyTypeObject *tp = Py_TYPE(self);

	PyObject_GC_UnTrack(self);
	door_clear(self);
	for (int i = 0; i < 256; i++)
		Py_CLEAR(d->tails[i]);
	if (d->views > 1)
		PyBuffer_Release(&d->fast_view);
	if (d->views > 0)
		PyBuffer_Release(&d->mem_view);
	d->views = 0;
	freefunc f = (freefunc)PyType_GetSlot(tp, Py_tp_free);
	f(self);
	Py_DECREF(tp);
}

static int cell(PyObject *obj, Py_buffer *view, const volatile int64_t **p)
{
	if (PyObject_GetBuffer(obj, view, PyBUF_SIMPLE) < 0)
		return -1;
	if (view->len < (Py_ssize_t)sizeof(int64_t) || ((uintptr_t)view->buf & (sizeof(int64_t) - 1))) {
		PyBuffer_Release(view);
		PyErr_SetString(PyExc_ValueError, "a generation cell is an aligned int64 buffer");
		return -1;
	}
	*p = (const volatile int64_t *)view->buf;
	return 0;
}

/* RequestDoor(relay, result, mem_cell, fast_cell, tails, owner, full, rest, reported):
 * relay and result are the addresses of the DataPlane's hr_relay and
 * hr_result, which owner keeps alive. */
static PyObject *door_new(PyTypeObject *tp, PyObject *args, PyObject *kw)
{
	unsigned long long ra, sa;
	PyObject *mem, *fast, *tails, *owner, *full, *rest, *reported;

	if (kw && PyObject_Length(kw) > 0) {
		PyErr_SetString(PyExc_TypeError, "RequestDoor takes no keyword arguments");
		return NULL;
	}
	if (!PyArg_ParseTuple(args, "KKOOOOOOO", &ra, &sa, &mem, &fast, &tails, &owner, &full, &rest, &reported))
		return NULL;
	if (!ra || !sa || !PyTuple_Check(tails) || PyTuple_Size(tails) != 256 ||
	    !PyCallable_Check(full) || !PyCallable_Check(rest) || !PyCallable_Check(reported)) {
		PyErr_SetString(PyExc_TypeError, "RequestDoor: bad arguments");
		return NULL;
	}
	allocfunc alloc = (allocfunc)PyType_GetSlot(tp, Py_tp_alloc);
	hr_door *d = (hr_door *)alloc(tp, 0); /* zeroed, tracked by the GC */
	if (!d)
		return NULL;
	d->r = (hr_relay *)(uintptr_t)ra;
	d->res = (struct hr_result *)(uintptr_t)sa;
	for (int i = 0; i < 256; i++) {
		PyObject *t = PyTuple_GetItem(tails, i);
		if (!t || !PyBytes_Check(t)) {
			Py_DECREF(d);
			PyErr_SetString(PyExc_TypeError, "RequestDoor: tails are 256 bytes objects");
			return NULL;
		}
		Py_INCREF(t);
		d->tails[i] = t;
	}
	if (cell(mem, &d->mem_view, &d->mem_gen) < 0) {
		Py_DECREF(d);
		return NULL;
	}
	d->views = 1;
	if (cell(fast, &d->fast_view, &d->fast_gen) < 0) {
		Py_DECREF(d);
		return NULL;
	}
	d->views = 2;
	Py_INCREF(owner);
	d->owner = owner;
	Py_INCREF(full);
	d->full = full;
	Py_INCREF(rest);
	d->rest = rest;
	Py_INCREF(reported);
	d->reported = reported;
	return (PyObject *)d;
}

/* fn(*args, **{kwnames: values}) without the vectorcall API (3.12 in the
 * limited API): only for calls the door does not serve itself. */
static PyObject *call_with(PyObject *fn, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
	Py_ssize_t nkw = kwnames ? PyTuple_Size(kwnames) : 0;
	PyObject *tuple = PyTuple_New(nargs), *dict = NULL, *out = NULL;

	if (!tuple)
		return NULL;
	for (Py_ssize_t i = 0; i < nargs; i++) {
		Py_INCREF(args[i]);
		PyTuple_SetItem(tuple, i, args[i]); /* steals */
	}
	if (nkw) {
		dict = PyDict_New();
		if (!dict)
			goto out;
		for (Py_ssize_t i = 0; i < nkw; i++)
			if (PyDict_SetItem(dict, PyTuple_GetItem(kwnames, i), args[nargs + i]) < 0)
				goto out;
	}
	out = PyObject_Call(fn, tuple, dict);
out:
	Py_DECREF(tuple);
	Py_XDECREF(dict);
	return out;
}

static PyObject *door_handle(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
	hr_door *d = (hr_door *)self;
	char *req;
	Py_ssize_t rlen;
	int overflow;
	long long wlen;

	if (kwnames || nargs != 2 || !PyBytes_CheckExact(args[0]) || !PyLong_CheckExact(args[1]))
		return call_with(d->full, args, nargs, kwnames);
	wlen = PyLong_AsLongLongAndOverflow(args[1], &overflow);
	if (overflow || wlen < 0)
		return call_with(d->full, args, nargs, NULL);
	if (*d->mem_gen != *d->fast_gen)
		return PyObject_CallFunctionObjArgs(d->rest, args[0], args[1], NULL);
	if (PyBytes_AsStringAndSize(args[0], &req, &rlen) < 0)
		return NULL; /* not reached: exact bytes */
	/* No config freeze here, as in the Python path: a MAP/UNMAP can only
	 * succeed after an ATTACH, which took the full path and froze it.  The
	 * bytes object stays alive and unchanged without the GIL: the caller
	 * holds it, and bytes are immutable. */
	PyThreadState *ts = PyEval_SaveThread();
	int rc = hr_relay_fast(d->r, (const uint8_t *)req, (uint64_t)rlen, (uint64_t)wlen, d->res);
	PyEval_RestoreThread(ts);
	if (rc >= 0 && rc < HR_FAST_REPORT) {
		PyObject *t = d->tails[rc & 0xFF];
		Py_INCREF(t);
		return t;
	}
	if (rc >= 0) {
		/* Done, with a kernel failure to report: the lock is still held
		 * for the Python side, which releases it. */
		PyObject *code = PyLong_FromLong(rc);
		if (!code) {
			/* Not even an int: unlock, or the relay stays locked. */
			hr_relay_unlock(d->r);
			return NULL;
		}
		PyObject *out = PyObject_CallFunctionObjArgs(d->reported, code, NULL);
		Py_DECREF(code);
		return out;
	}
	return PyObject_CallFunctionObjArgs(d->rest, args[0], args[1], NULL);
}

static PyMethodDef door_methods[] = {
	{ "handle_request", (PyCFunction)(void (*)(void))door_handle, METH_FASTCALL | METH_KEYWORDS,
	  "handle_request(readable, writable_len) -> bytes: see hostrelay.relay.Relay.handle_request" },
	{ NULL, NULL, 0, NULL },
};

static PyType_Slot door_slots[] = {
	{ Py_tp_new, (void *)door_new },
	{ Py_tp_dealloc, (void *)door_dealloc },
	{ Py_tp_traverse, (void *)door_traverse },
	{ Py_tp_clear, (void *)door_clear },
	{ Py_tp_methods, door_methods },
	{ Py_tp_doc, (void *)"handle_request's native door (cext/pydoor/hr_pydoor.c)" },
	{ 0, NULL },
};

static PyType_Spec door_spec = {
	.name = "hostrelay._native.RequestDoor",
	.basicsize = sizeof(hr_door),
	.itemsize = 0,
	.flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
	.slots = door_slots,
};

/* Called by cffi with the GIL released: take it, and set
 * hostrelay._native.RequestDoor (once).  0, or -1 with the error printed. */
int hr_pydoor_install(void)
{
	PyGILState_STATE g = PyGILState_Ensure();
	int rc = -1;
	PyObject *mod = PyImport_ImportModule("hostrelay._native");
	PyObject *tp = NULL;

	if (!mod)
		goto out;
	if (PyObject_HasAttrString(mod, "RequestDoor")) {
		rc = 0;
		goto out;
	}
	tp = PyType_FromSpec(&door_spec);
	if (tp && PyObject_SetAttrString(mod, "RequestDoor", tp) == 0)
		rc = 0;
out:
	if (rc < 0)
		PyErr_Print();
	Py_XDECREF(tp);
	Py_XDECREF(mod);
	PyGILState_Release(g);
	return rc;
}
