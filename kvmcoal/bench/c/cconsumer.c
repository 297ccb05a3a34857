/*
 * cconsumer.c - the C yardstick for kvmcoal's batch consumer (Ring.drain_into).
 *
 * What a C VMM does to take a batch off the KVM coalesced MMIO ring, and
 * nothing more: one acquire load of `last`, one or two memcpy of the
 * pending entries (two when they wrap past the end), one release store of
 * `first`.  It is a CPython extension module so that it is called exactly
 * as drain_into is, through one METH_FASTCALL call with two buffers, and
 * the comparison measures the consumer, not the way of calling it.
 *
 *     drain(ring_buffer, out_buffer) -> int
 *
 * copies the pending entries, as raw 24-byte records, to the start of
 * out_buffer (as many as fit), advances `first` past them and returns how
 * many it copied.  The ring's slot count follows from the buffer's length
 * as in kvmcoal: (len - 8) / 24.
 *
 * What it leaves out, on purpose, is what kvmcoal's consumer adds: the
 * per-entry check of `len` and `pio`, the consumer lock (re-entrance,
 * other threads), releasing the GIL, and the eventfd bookkeeping.  It only
 * checks that `first` and `last` are in range, so that it cannot read
 * outside the buffer.
 *
 * The layout comes from <linux/kvm.h>, never re-typed.  kvmcoal/bench/cbuild.py
 * builds it with gcc on first use.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <linux/kvm.h>
#include <stdint.h>
#include <string.h>

#define RING_HEADER_SIZE sizeof(struct kvm_coalesced_mmio_ring)
#define RING_ENTRY_SIZE sizeof(struct kvm_coalesced_mmio)

_Static_assert(RING_HEADER_SIZE == 8, "struct kvm_coalesced_mmio_ring header is 8 bytes");
_Static_assert(RING_ENTRY_SIZE == 24, "struct kvm_coalesced_mmio is 24 bytes");

static PyObject *cconsumer_drain(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer ring_view, out_view;
    struct kvm_coalesced_mmio_ring *ring;
    unsigned char *out;
    Py_ssize_t slots;
    uint32_t max, first, last, pending, n, head;
    size_t room;

    (void)module;
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "drain() takes 2 arguments (%zd given)", nargs);
        return NULL;
    }
    if (PyObject_GetBuffer(args[0], &ring_view, PyBUF_WRITABLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[1], &out_view, PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&ring_view);
        return NULL;
    }
    slots = ring_view.len < (Py_ssize_t)RING_HEADER_SIZE
                ? 0 : (ring_view.len - (Py_ssize_t)RING_HEADER_SIZE) / (Py_ssize_t)RING_ENTRY_SIZE;
    if (slots < 2 || slots > UINT32_MAX) {
        PyErr_Format(PyExc_ValueError, "a ring buffer of %zd bytes has %zd slots", ring_view.len,
                     slots);
        goto fail;
    }
    /* first and last are accessed atomically, which needs natural alignment. */
    if ((uintptr_t)ring_view.buf % _Alignof(uint32_t) != 0) {
        PyErr_SetString(PyExc_ValueError, "the ring buffer is not 4-byte aligned");
        goto fail;
    }
    ring = ring_view.buf;
    max = (uint32_t)slots;
    out = out_view.buf;
    room = (size_t)out_view.len / RING_ENTRY_SIZE;

    first = ring->first;                                    /* ours: a plain load */
    last = __atomic_load_n(&ring->last, __ATOMIC_ACQUIRE);  /* entries before it are complete */
    if (first >= max || last >= max) {
        PyErr_Format(PyExc_ValueError, "ring index out of range: first=%u last=%u max=%u",
                     first, last, max);
        goto fail;
    }
    pending = last >= first ? last - first : max - first + last;
    n = pending < room ? pending : (uint32_t)room;
    if (n) {
        head = n < max - first ? n : max - first;           /* up to the end of the ring */
        memcpy(out, &ring->coalesced_mmio[first], (size_t)head * RING_ENTRY_SIZE);
        memcpy(out + (size_t)head * RING_ENTRY_SIZE, &ring->coalesced_mmio[0],
               (size_t)(n - head) * RING_ENTRY_SIZE);       /* the wrapped part, if any */
        /* Our reads of the slots happen before the producer may reuse them. */
        __atomic_store_n(&ring->first, (first + n) % max, __ATOMIC_RELEASE);
    }
    PyBuffer_Release(&out_view);
    PyBuffer_Release(&ring_view);
    return PyLong_FromUnsignedLong(n);

fail:
    PyBuffer_Release(&out_view);
    PyBuffer_Release(&ring_view);
    return NULL;
}

static PyMethodDef cconsumer_methods[] = {
    {"drain", (PyCFunction)(void (*)(void))cconsumer_drain, METH_FASTCALL,
     "drain(ring_buffer, out_buffer) -> int: copy the pending entries into out_buffer "
     "as raw records (as many as fit), advance first past them, return how many."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef cconsumer_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "cconsumer",
    .m_doc = "The C yardstick for kvmcoal's batch consumer (kvmcoal/bench/c/cconsumer.c).",
    .m_size = -1,
    .m_methods = cconsumer_methods,
};

PyMODINIT_FUNC PyInit_cconsumer(void)
{
    return PyModule_Create(&cconsumer_module);
}
