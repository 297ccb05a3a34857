# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The router of the v2 API on real KVM, in C (kvmcoal.kvm._router).

Linux has one coalesced ring per VM.  kvmcoal registers every zone with the
kernel as an ordinary coalesced zone and the router moves each entry of a
zone bound to a buffer out of the kernel's ring into that buffer's ring (and
wakes the buffer's consumer); entries of zones without a buffer stay in the
kernel's ring, which stays ``Vm.ring``.  Which zone an entry belongs to is
the kernel's own bus walk over the zones (src/io_bus.h).

It runs without the GIL and touches no Python object: on the vCPU thread
after every KVM_RUN, on the watcher thread (a plain pthread) while the
vCPUs run, and first thing in every consumer call on ``Vm.ring``, always
under the kernel ring's consumer lock.

Entries of zones without a buffer are compacted towards the entries still
to be routed, so that the kernel ring's head holds only ``Vm.ring``'s own
entries, in order; the ring's consumer calls deliver only those (the
router tells them how many).  A full buffer stops the pass at its entry:
everything behind it waits in the kernel ring (which then fills, and the
guest falls back to exits), so no buffer ever sees its entries out of order.
"""

cimport cython
from cpython.mem cimport PyMem_RawMalloc, PyMem_RawFree
from cpython.object cimport PyObject
from cpython.exc cimport PyErr_SetFromErrno
from libc.errno cimport errno
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.string cimport memcpy

from kvmcoal._ring cimport (Ring, kc_ring, KC_OK, KC_ENTRY_SIZE, KC_HEADER_SIZE,
                            kc_record_fields, kc_fields_bad, kc_ring_begin, kc_ring_next,
                            kc_ring_publish_first, kc_ring_peek_first, kc_ring_peek_last,
                            pthread_mutex_trylock, pthread_mutex_unlock, check_wake,
                            kc_thread_ident, pthread_mutex_init, pthread_mutex_lock)
from kvmcoal._zone_bus cimport _ZoneTable, kc_bus_range, kc_bus_find, kc_zone_in_range

cdef extern from "<pthread.h>" nogil:
    int pthread_create(pthread_t *thread, const void *attr, void *(*start)(void *) noexcept nogil,
                       void *arg)
    int pthread_join(pthread_t thread, void **retval)

cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    struct timespec:
        time_t tv_sec
        long tv_nsec
    int CLOCK_MONOTONIC
    int CLOCK_THREAD_CPUTIME_ID
    int clock_gettime(int clk, timespec *ts)

cdef extern from "<sys/epoll.h>" nogil:
    ctypedef union epoll_data_t:
        int fd
        uint32_t u32
    struct epoll_event:
        uint32_t events
        epoll_data_t data
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *event)
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)
    int EPOLLIN, EPOLLHUP, EPOLLERR, EPOLL_CTL_ADD, EPOLL_CTL_DEL, EPOLL_CLOEXEC

cdef extern from "<linux/perf_event.h>" nogil:
    struct perf_event_attr:
        uint32_t type
        uint32_t size
        uint64_t config
        uint64_t sample_period
        uint64_t sample_type
        uint32_t wakeup_events
    struct perf_event_mmap_page:
        uint64_t data_head
        uint64_t data_tail
    int PERF_TYPE_TRACEPOINT
    unsigned long PERF_FLAG_FD_CLOEXEC
    unsigned long PERF_EVENT_IOC_SET_FILTER

cdef extern from "<sys/eventfd.h>" nogil:
    int eventfd(unsigned int initval, int flags)
    int EFD_NONBLOCK, EFD_CLOEXEC

cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    short POLLIN
    int ppoll(pollfd *fds, unsigned long nfds, const timespec *timeout, const void *sigmask)

cdef extern from "<sys/syscall.h>" nogil:
    long SYS_perf_event_open

cdef extern from "<unistd.h>" nogil:
    long syscall(long number, ...)
    int close(int fd)
    ssize_t write(int fd, const void *buf, size_t count)
    int sched_yield()

cdef extern from "<sys/ioctl.h>" nogil:
    int ioctl(int fd, unsigned long request, ...)

cdef extern from "<sys/mman.h>" nogil:
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset)
    int munmap(void *addr, size_t length)
    void *MAP_FAILED
    int PROT_READ, PROT_WRITE, MAP_SHARED

cdef extern from *:
    """
    /* The perf ring's tail follows its head: the events are only a wake-up. */
    static inline void kc_perf_consumed(struct perf_event_mmap_page *page) {
        __atomic_store_n(&page->data_tail, __atomic_load_n(&page->data_head, __ATOMIC_ACQUIRE),
                         __ATOMIC_RELEASE);
    }
    """
    void kc_perf_consumed(perf_event_mmap_page *page) nogil

from libc.string cimport memset
from posix.unistd cimport sysconf, _SC_PAGESIZE

# The watcher's tracepoint wake-up: at most this many perf events (a pair
# per vCPU thread).
DEF MAX_TRACED = 256
# Buffers a pass holds at once (their producer locks, and a gather list
# each); a pass that meets more ends there, and another goes on.
DEF MAX_OPEN = 8
# The epoll tag of the watcher's stop eventfd (perf events are tagged 0..255).
cdef extern from *:
    """
    #define KC_STOP_TAG 0xFFFFFFFFu
    """
    uint32_t STOP_TAG "KC_STOP_TAG"
# After a tracepoint hit, how long a pass waits for the entry to land (the
# tracepoint fires before the write reaches the ring).
DEF LAND_NS = 200000

cdef extern from *:
    """
    static inline void kc_cpu_relax(void) {
    #if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
    #endif
    }
    static inline int kc_load_int(const int *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void kc_store_int(int *p, int v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    """
    void kc_cpu_relax() nogil
    int kc_load_int(const int *p) nogil
    void kc_store_int(int *p, int v) nogil

from cpython.ref cimport Py_INCREF, Py_DECREF

import os


cdef uint64_t _FOREVER = 0xFFFFFFFFFFFFFFFF


cdef inline uint32_t _dist(uint32_t a, uint32_t b, uint32_t max) noexcept nogil:
    """Slots from a forward to b in a ring of max slots."""
    return b - a if b >= a else max - a + b


cdef int64_t _route_hook(void *ctx, int move) noexcept nogil:
    # Ring's consumer calls run it under the consumer lock.
    if move:
        return (<Router>ctx).route_locked()
    return (<Router>ctx).own_count()


cdef void *_watch(void *arg) noexcept nogil:
    (<Router>arg).watch()
    return NULL


@cython.final
cdef class Router:
    """Moves the kernel ring's entries of buffer-bound zones into their buffers.

    Made by kvmcoal.kvm.Vm; the methods here are its plumbing.
    """

    def __cinit__(self, Ring kernel_ring):
        self.kring = kernel_ring
        self._tables = []
        self.kept = <uint32_t *>PyMem_RawMalloc(kernel_ring._r.max * sizeof(uint32_t))
        self.gather_stride = kernel_ring._r.max
        self.gather = <unsigned char **>PyMem_RawMalloc(
            MAX_OPEN * kernel_ring._r.max * sizeof(unsigned char *))
        self.gather_len = <uint32_t *>PyMem_RawMalloc(
            MAX_OPEN * kernel_ring._r.max * sizeof(uint32_t))
        if self.gather == NULL or self.gather_len == NULL:
            raise MemoryError()
        self.epochs = <kc_epoch *>PyMem_RawMalloc(4 * sizeof(kc_epoch))
        if self.kept == NULL or self.epochs == NULL:
            raise MemoryError()
        self.epoch_cap = 4
        empty = _ZoneTable([])
        self._tables.append(empty)
        self.epochs[0].until = _FOREVER
        self.epochs[0].mmio = <PyObject *>empty
        self.epochs[0].pio = <PyObject *>empty
        self.n_epochs = 1
        self.head = self.kept_first = kc_ring_peek_first(&kernel_ring._r)
        self.active = True
        self.epfd = -1
        self.stop_efd = -1
        self.trace_map_len = 2 * sysconf(_SC_PAGESIZE)
        pthread_mutex_init(&self.watch_lock, NULL)

    def __dealloc__(self):
        if self.kring is not None and self.kring._r.route_ctx == <void *>self:
            self.kring._r.route = NULL
            self.kring._r.route_ctx = NULL
        cdef int k
        for k in range(self.n_traced):
            if self.traced_fds[k] >= 0:
                munmap(self.traced_maps[k], self.trace_map_len)
                close(self.traced_fds[k])
        if self.epfd >= 0:
            close(self.epfd)
        PyMem_RawFree(self.kept)
        PyMem_RawFree(self.gather)
        PyMem_RawFree(self.gather_len)
        PyMem_RawFree(self.epochs)

    # -- the pass --

    cdef int64_t route_locked(self) noexcept nogil:
        """Routing passes until the kernel ring is done with; the caller holds
        its consumer lock.

        Returns how many entries at the kernel ring's head are its own
        (Vm.ring's), or -1 to let the consumer look at the head itself (a
        corrupt entry or index there, which its own checks report).
        """
        cdef int64_t own
        while True:
            own = self._pass()
            if not self.more:
                return own

    cdef int64_t _pass(self) noexcept nogil:
        """One pass: as far as it can with at most MAX_OPEN buffers held at once."""
        cdef kc_ring *kr = &self.kring._r
        cdef uint32_t first, bad = 0, idx, h, dst, src
        cdef int64_t pending = kc_ring_begin(kr, &first, &bad)
        cdef uint32_t kept_before, n_new, k, nk = 0, stop, j, len_, pio, room = 0
        cdef uint64_t seq, addr
        cdef Py_ssize_t ep
        cdef unsigned char *slot
        cdef void *target
        cdef const kc_bus_range *hit = NULL
        cdef PyObject *hit_table = NULL
        cdef PyObject *tp
        cdef bint corrupt = False
        cdef int t = -1, n_open = 0, i, rc, status, err
        cdef bint must_wake
        cdef uint32_t run, limit, len2, pio2
        cdef uint64_t until
        cdef size_t r
        cdef unsigned char *nxt
        self.more = False
        if pending < 0 or not self.active or not self.kring._live:
            return -1
        # Consumers move first from where the last pass left it up to head;
        # anywhere else, reset() moved it, and nothing routed is left.
        kept_before = _dist(first, self.head, kr.max)
        if (kept_before > <uint32_t>pending
                or _dist(self.kept_first, first, kr.max) > _dist(self.kept_first, self.head,
                                                                 kr.max)):
            self.head = first
            kept_before = 0
        n_new = <uint32_t>pending - kept_before
        idx = self.head
        stop = n_new
        ep = self.first_epoch
        k = 0
        while k < n_new:
            # Classified in place, not copied: each buffer's entries are
            # gathered as runs of slots and copied once, by the push, as
            # they are (their len and pio checked here; only this process
            # maps the kernel ring, and a buffer's consumer checks what it
            # takes anyway).
            slot = kr.base + KC_HEADER_SIZE + <size_t>idx * KC_ENTRY_SIZE
            memcpy(&addr, slot, 8)
            kc_record_fields(slot, &len_, &pio)
            if kc_fields_bad(len_, pio):
                stop = k
                corrupt = True
                break
            seq = self.processed + k
            while self.epochs[ep].until <= seq:
                ep += 1
            tp = self.epochs[ep].pio if pio else self.epochs[ep].mmio
            if (hit != NULL and tp == hit_table and (<_ZoneTable>tp).disjoint
                    and kc_zone_in_range(hit, addr, len_)):
                target = hit.target
            elif (<_ZoneTable>tp).disjoint and self._open_hit(n_open, tp, addr, len_, &hit):
                hit_table = tp
                target = hit.target     # a zone of a buffer this pass holds already
            else:
                hit = kc_bus_find((<_ZoneTable>tp).ranges, (<_ZoneTable>tp).n, addr, len_)
                hit_table = tp
                target = hit.target if hit != NULL else NULL
            if target == NULL:      # no buffer: the entry is Vm.ring's
                self.kept[nk] = idx
                nk += 1
                idx = kc_ring_next(kr, idx)
                k += 1
                continue
            if t < 0 or self.open_rings[t] != target:
                t = -1
                for i in range(n_open):
                    if self.open_rings[i] == target:
                        t = i
                        break
                if t < 0:
                    if n_open == MAX_OPEN:      # another pass takes it from here
                        stop = k
                        self.more = True
                        break
                    # Held until the pass ends: what fits cannot shrink.
                    rc = (<Ring>target).produce_hold(&room)
                    t = n_open
                    n_open += 1
                    self.open_rings[t] = target
                    self.open_counts[t] = 0
                    self.open_runs[t] = 0
                    self.open_hits[t] = hit
                    self.open_hit_tables[t] = tp
                    # A closed buffer's entries go with it; one whose last
                    # index its consumer broke takes none again (its
                    # consumer's next call says so), and holding them back
                    # would stop every other buffer and Vm.ring too.
                    self.open_drop[t] = rc != KC_OK
                    self.open_room[t] = room if rc == KC_OK else 0
            if self.open_drop[t]:
                self.dropped += 1
                idx = kc_ring_next(kr, idx)
                k += 1
                continue
            if self.open_counts[t] == self.open_room[t]:
                stop = k            # full: this entry and all behind it wait
                break
            # A run: this entry and those after it in the same slots, zone,
            # kind and epoch, as far as the buffer has room (the common
            # case, one chatty device, costs a few compares per entry).
            run = 1
            limit = min(n_new - k, self.open_room[t] - self.open_counts[t],
                        kr.max - idx)
            if hit != NULL and (<_ZoneTable>tp).disjoint:
                until = self.epochs[ep].until
                while run < limit:
                    nxt = slot + <size_t>run * KC_ENTRY_SIZE
                    kc_record_fields(nxt, &len2, &pio2)
                    if pio2 != pio or kc_fields_bad(len2, pio2) or seq + run >= until:
                        break
                    memcpy(&addr, nxt, 8)
                    if not kc_zone_in_range(hit, addr, len2):
                        break
                    run += 1
            r = t * self.gather_stride + self.open_runs[t]
            self.gather[r] = slot
            self.gather_len[r] = run
            self.open_runs[t] += 1
            self.open_counts[t] += run
            idx = (idx + run) % kr.max
            k += run
        for i in range(n_open):
            if self.open_drop[i]:
                continue
            status = KC_OK
            must_wake = False
            self.routed += (<Ring>self.open_rings[i]).produce_gathered(
                <const unsigned char **>&self.gather[i * self.gather_stride],
                &self.gather_len[i * self.gather_stride], self.open_runs[i],
                &status, &must_wake)
            if must_wake:
                err = (<Ring>self.open_rings[i]).wake_consumer()
                if err:
                    self.wake_error = err
        # Vm.ring's entries, old and new, move (in order) to end where the
        # pass stopped: from the last backwards, each to a slot at or after
        # its own, so none is overwritten before it has moved.
        h = (self.head + stop) % kr.max
        dst = h
        for j in range(nk, 0, -1):
            dst = (dst + kr.max - 1) % kr.max
            src = self.kept[j - 1]
            if src != dst:
                memcpy(kr.base + KC_HEADER_SIZE + <size_t>dst * KC_ENTRY_SIZE,
                       kr.base + KC_HEADER_SIZE + <size_t>src * KC_ENTRY_SIZE, KC_ENTRY_SIZE)
        for j in range(kept_before, 0, -1):
            dst = (dst + kr.max - 1) % kr.max
            src = (first + j - 1) % kr.max
            if src != dst:
                memcpy(kr.base + KC_HEADER_SIZE + <size_t>dst * KC_ENTRY_SIZE,
                       kr.base + KC_HEADER_SIZE + <size_t>src * KC_ENTRY_SIZE, KC_ENTRY_SIZE)
        if dst != first:
            kc_ring_publish_first(kr, dst)
        self.kept_first = dst
        self.head = h
        self.processed += stop
        self.held = n_new - stop
        while self.first_epoch + 1 < self.n_epochs and \
                self.epochs[self.first_epoch].until <= self.processed:
            self.first_epoch += 1
        if corrupt and kept_before + nk == 0:
            return -1
        return kept_before + nk

    cdef bint _open_hit(self, int n_open, PyObject *table, uint64_t addr, uint32_t len_,
                        const kc_bus_range **hit) noexcept nogil:
        """Whether the zone the pass found first for one of its held buffers
        takes this access (in a table of disjoint zones: then it is the zone)."""
        cdef int i
        for i in range(n_open):
            if self.open_hit_tables[i] == table and kc_zone_in_range(self.open_hits[i], addr,
                                                                     len_):
                hit[0] = self.open_hits[i]
                return True
        return False

    cdef int64_t own_count(self) noexcept nogil:
        """Vm.ring's entries the last pass left at the head, without a pass."""
        cdef uint32_t first, bad = 0
        cdef int64_t pending = kc_ring_begin(&self.kring._r, &first, &bad)
        cdef uint32_t kept
        if pending < 0 or not self.active:
            return -1
        kept = _dist(first, self.head, self.kring._r.max)
        return kept if kept <= <uint32_t>pending else 0

    cdef int route_nogil(self) noexcept nogil:
        """A pass from any thread: takes the consumer lock.  From a handler of
        a consumer call on Vm.ring (this thread holds the lock) it makes none:
        it would move what that call is delivering; the call's next one routes."""
        cdef int entered
        if not self.active:
            return 0
        entered = self.kring._enter_consumer_nogil()
        if entered <= 0:
            return 0
        self.route_locked()
        self.kring._exit_consumer()
        return 0

    def route(self):
        """Route now; returns how many entries a full buffer still holds back."""
        if not self.active:
            return 0
        with nogil:
            self.route_nogil()
        self.check()
        return self.held

    def check(self):
        """Raise the OSError of a buffer wakeup that failed since the last check."""
        cdef int err = self.wake_error
        if err:
            self.wake_error = 0
            check_wake(err)

    # -- zone tables --

    def install(self, _ZoneTable mmio, _ZoneTable pio):
        """Route entries from here on with these tables; the ones already in the
        kernel ring keep the tables that were in force when they were written.

        Call it before registering a zone with the kernel (the new tables
        hold every zone the old ones did) and after unregistering one.
        """
        cdef int entered
        cdef kc_epoch *grown = NULL
        cdef kc_epoch *old = NULL
        cdef Py_ssize_t i, keep
        self._tables.append(mmio)
        self._tables.append(pio)
        if self.n_epochs == self.epoch_cap:
            grown = <kc_epoch *>PyMem_RawMalloc(2 * self.epoch_cap * sizeof(kc_epoch))
            if grown == NULL:
                raise MemoryError()
        # Under the consumer lock: a pass reads the epochs.
        with nogil:
            entered = self.kring._enter_consumer_nogil()
            if grown != NULL:
                memcpy(grown, self.epochs, self.n_epochs * sizeof(kc_epoch))
                old, self.epochs = self.epochs, grown
                self.epoch_cap *= 2
            # Everything in the kernel ring now was written under the old tables.
            self.epochs[self.n_epochs - 1].until = self.processed + (
                _dist(self.head, kc_ring_peek_last(&self.kring._r), self.kring._r.max)
                if entered >= 0 else 0)
            self.epochs[self.n_epochs].until = _FOREVER
            self.epochs[self.n_epochs].mmio = <PyObject *>mmio
            self.epochs[self.n_epochs].pio = <PyObject *>pio
            self.n_epochs += 1
            # Forget the epochs no entry can use any more.
            while self.first_epoch + 1 < self.n_epochs and \
                    self.epochs[self.first_epoch].until <= self.processed:
                self.first_epoch += 1
            keep = self.n_epochs - self.first_epoch
            for i in range(keep):
                self.epochs[i] = self.epochs[self.first_epoch + i]
            self.n_epochs = keep
            self.first_epoch = 0
            if entered > 0:
                self.kring._exit_consumer()
        PyMem_RawFree(old)
        live = set()
        for i in range(self.n_epochs):
            live.add(<object>self.epochs[i].mmio)
            live.add(<object>self.epochs[i].pio)
        self._tables = [t for t in self._tables if t in live]

    def attach(self):
        """Make Vm.ring's consumer calls route first."""
        self.kring._r.route_ctx = <void *>self
        self.kring._r.route = _route_hook

    def stop(self):
        """For good: no more passes (the VM closes, or this is a forked child)."""
        cdef int entered
        self.stop_watcher()
        with nogil:
            entered = self.kring._enter_consumer_nogil()
        self.active = False
        if self.kring._r.route_ctx == <void *>self:
            self.kring._r.route = NULL
            self.kring._r.route_ctx = NULL
        if entered > 0:
            self.kring._exit_consumer()

    def forked(self):
        """In a forked child: the watcher thread is not here, the ring is the parent's."""
        self.watching = False
        self.active = False

    # -- the watcher --

    def start_watcher(self, long interval_us, long spin_us):
        """Start the watcher thread: a pass every *interval_us* while idle,
        continuous passes for *spin_us* after one that moved entries."""
        cdef int rc = 0, efd, err = 0
        cdef bint running
        cdef epoll_event ev
        if interval_us < 1 or spin_us < 0:
            raise ValueError(f"interval_us must be >= 1 and spin_us >= 0, got "
                             f"{interval_us} and {spin_us}")
        efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if efd < 0:
            PyErr_SetFromErrno(OSError)
        # The thread holds the router (it touches no Python object, so the
        # reference is taken for it here and dropped by stop_watcher).
        Py_INCREF(self)
        with nogil:
            pthread_mutex_lock(&self.watch_lock)
            running = self.watching
            if not running:
                self.interval_ns = interval_us * 1000
                self.spin_ns = spin_us * 1000
                self.safety_ms = max(1, (interval_us + 999) // 1000)
                self.stopping = 0
                self.stop_efd = efd
                if self.epfd >= 0:
                    ev.events = EPOLLIN
                    ev.data.u32 = STOP_TAG
                    rc = epoll_ctl(self.epfd, EPOLL_CTL_ADD, efd, &ev)
                    if rc:
                        err = errno
                if rc == 0:
                    rc = pthread_create(&self.thread, NULL, _watch, <void *>self)
                    err = rc
                    self.watching = rc == 0
            pthread_mutex_unlock(&self.watch_lock)
        if running or rc:
            Py_DECREF(self)
            close(efd)
            if running:
                raise RuntimeError("the watcher is already running")
            raise OSError(err, f"starting the watcher: {os.strerror(err)}")

    def stop_watcher(self):
        """Stop the watcher thread and wait for it: at once, whatever its
        interval.  Idempotent; callers on several threads all return after
        it stopped."""
        cdef bint joined = False
        cdef uint64_t one = 1
        with nogil:
            pthread_mutex_lock(&self.watch_lock)
            if self.watching:
                kc_store_int(&self.stopping, 1)
                write(self.stop_efd, &one, 8)       # wakes its sleep
                pthread_join(self.thread, NULL)
                self.watching = False
                close(self.stop_efd)               # (and out of the epoll set with it)
                self.stop_efd = -1
                joined = True
            pthread_mutex_unlock(&self.watch_lock)
        if joined:
            Py_DECREF(self)

    cdef void watch(self) noexcept nogil:
        cdef timespec now, pause
        cdef pollfd stop
        cdef long long busy_until = 0, t
        cdef uint64_t before
        pause.tv_sec = self.interval_ns // 1000000000
        pause.tv_nsec = self.interval_ns % 1000000000
        while not kc_load_int(&self.stopping):
            self.passes += 1
            before = self.routed
            self._try_pass()
            clock_gettime(CLOCK_MONOTONIC, &now)
            t = now.tv_sec * 1000000000LL + now.tv_nsec
            if self.routed != before:
                busy_until = t + self.spin_ns
            if t < busy_until:
                kc_cpu_relax()
            elif self.epfd >= 0:
                self._wait_for_tracepoint()
            else:
                # Until the interval passes, or stop_watcher() says so.
                stop.fd = self.stop_efd
                stop.events = POLLIN
                ppoll(&stop, 1, &pause, NULL)
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &now)
        self.watcher_cpu_ns = now.tv_sec * 1000000000LL + now.tv_nsec

    cdef void _try_pass(self) noexcept nogil:
        """The watcher's pass.  trylock: a consumer holding the lock routed
        when it began, and blocking here would tie the watcher to its handlers."""
        if self.active and pthread_mutex_trylock(&self.kring._lock) == 0:
            if self.kring._live:
                self.kring._owner = kc_thread_ident()
                self.route_locked()
            self.kring._exit_consumer()

    cdef void _wait_for_tracepoint(self) noexcept nogil:
        """Sleep until a traced vCPU thread makes an MMIO or PIO write into a
        buffer's zone (or the interval passes), then route until it lands."""
        cdef epoll_event events[16]
        cdef int n, i, k
        cdef uint64_t before = self.routed
        cdef timespec now
        cdef long long end
        n = epoll_wait(self.epfd, events, 16, self.safety_ms)
        for i in range(n):
            if events[i].data.u32 == STOP_TAG:
                return          # stop_watcher() says so
            k = events[i].data.u32
            if events[i].events & (EPOLLHUP | EPOLLERR):
                # Its thread ended: it will not fire again.  The slot is free
                # once its fd reads -1 (trace_thread may take it then).
                epoll_ctl(self.epfd, EPOLL_CTL_DEL, self.traced_fds[k], NULL)
                munmap(self.traced_maps[k], self.trace_map_len)
                close(self.traced_fds[k])
                kc_store_int(&self.traced_fds[k], -1)
            else:
                kc_perf_consumed(<perf_event_mmap_page *>self.traced_maps[k])
        if n <= 0:
            return          # the interval passed: the next pass is the safety net
        clock_gettime(CLOCK_MONOTONIC, &now)
        end = now.tv_sec * 1000000000LL + now.tv_nsec + LAND_NS
        while self.routed == before and not kc_load_int(&self.stopping):
            # The wake-up may have preempted the vCPU thread that is to write it.
            sched_yield()
            self._try_pass()
            clock_gettime(CLOCK_MONOTONIC, &now)
            if now.tv_sec * 1000000000LL + now.tv_nsec >= end:
                break

    def trace(self, int mmio_id, int pio_id):
        """Make the watcher sleep on tracepoint hits (kvm_mmio, kvm_pio ids) of
        the threads trace_thread() names, instead of a timer.  Before start_watcher."""
        if self.watching:
            raise RuntimeError("the watcher is running: choose its wake-up before it starts")
        if self.epfd < 0:
            self.epfd = epoll_create1(EPOLL_CLOEXEC)
            if self.epfd < 0:
                PyErr_SetFromErrno(OSError)
        self.trace_ids[0] = mmio_id
        self.trace_ids[1] = pio_id

    def trace_thread(self, int tid, bytes mmio_filter, bytes pio_filter):
        """Open the tracepoint events of thread *tid* (a vCPU's) and watch them."""
        cdef perf_event_attr attr
        cdef int fd, which, k
        cdef void *page
        cdef epoll_event ev
        cdef const char *filt
        if self.epfd < 0:
            raise RuntimeError("trace() first")
        for which in range(2):
            # A slot whose thread ended (fd -1) is taken again.
            k = 0
            while k < self.n_traced and kc_load_int(&self.traced_fds[k]) >= 0:
                k += 1
            if k == MAX_TRACED:
                raise RuntimeError(f"the watcher traces at most {MAX_TRACED // 2} vCPU threads "
                                   f"running at once")
            memset(&attr, 0, sizeof(attr))
            attr.type = PERF_TYPE_TRACEPOINT
            attr.size = sizeof(attr)
            attr.config = self.trace_ids[which]
            attr.sample_period = 1
            attr.wakeup_events = 1
            fd = syscall(SYS_perf_event_open, &attr, tid, -1, -1, PERF_FLAG_FD_CLOEXEC)
            if fd < 0:
                PyErr_SetFromErrno(OSError)
            filt = mmio_filter if which == 0 else pio_filter
            if ioctl(fd, PERF_EVENT_IOC_SET_FILTER, filt) < 0:
                close(fd)
                PyErr_SetFromErrno(OSError)
            page = mmap(NULL, self.trace_map_len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
            if page == MAP_FAILED:
                close(fd)
                PyErr_SetFromErrno(OSError)
            self.traced_maps[k] = page
            self.traced_tids[k] = tid
            kc_store_int(&self.traced_fds[k], fd)
            if k == self.n_traced:
                self.n_traced += 1
            ev.events = EPOLLIN
            ev.data.u32 = k
            if epoll_ctl(self.epfd, EPOLL_CTL_ADD, fd, &ev) < 0:
                PyErr_SetFromErrno(OSError)

    def traced(self):
        """The threads whose events are open (their threads may have ended
        since: the watcher closes those events when it notices)."""
        cdef int k
        return {self.traced_tids[k] for k in range(self.n_traced)
                if kc_load_int(&self.traced_fds[k]) >= 0}

    def untrace(self):
        """Close every tracepoint event (the watcher is stopped)."""
        cdef int k
        if self.watching:
            raise RuntimeError("stop the watcher first")
        for k in range(self.n_traced):
            if self.traced_fds[k] >= 0:
                munmap(self.traced_maps[k], self.trace_map_len)
                close(self.traced_fds[k])
                self.traced_fds[k] = -1
        self.n_traced = 0
        if self.epfd >= 0:
            close(self.epfd)
            self.epfd = -1
