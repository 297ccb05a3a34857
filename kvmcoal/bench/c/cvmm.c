/*
 * cvmm.c - a small C VMM: the reference the Python VMM (kvmcoal.kvm) is
 * measured against by kvmcoal bench (kvmcoal/bench/vmm.py) and by
 * benchmarks/test_kvm_vmm.py.
 *
 *     cvmm GUEST.bin ITERATIONS [--coalesce]
 *     cvmm GUEST.bin --serve
 *
 * It runs the store_loop guest (kvmcoal/guests/store_loop.S) exactly as
 * kvmcoal.cli.run_guest and kvmcoal/bench/vmm.py do with kvmcoal.kvm:
 * 64 KiB of memory at GPA 0, the guest at 0x1000, KVM_SET_TSS_ADDR where the
 * capability exists, 16-bit real mode at cs:ip = 0:0x1000 with es = 0xd000,
 * eax = 0, ecx = ITERATIONS, di = 0x10, dx = 0x400 (Vcpu.setup_real_mode:
 * KVM_GET_SREGS, selector and base of every segment, KVM_SET_SREGS; then
 * KVM_GET_REGS, the registers changed, KVM_SET_REGS).  With --coalesce it
 * registers the same zones: MMIO [0xd0000, +0x1000) and, if the kernel has
 * KVM_CAP_COALESCED_PIO, port 0x400.
 *
 * The run loop is Vcpu.run_loop's: after every KVM_RUN return (EINTR just
 * enters again, as Vcpu.run does) the ring is drained into the handler --
 * acquire load of last, first and last checked against the slot count,
 * each entry copied out of the shared page and validated (len 1..8, pio 0
 * or 1, data past len zeroed, as kvmcoal's ring_impl.h does), handed to the
 * handler, and first published with a release store -- and only then is
 * the exit dispatched: an MMIO write or an OUT (each of its count
 * accesses) goes to the same handler, HLT stops, anything else is an error.
 *
 * The handler does what the Python benchmark's handler does: compare the
 * write with the next one of the expected stream (built before the run,
 * untimed) and count it.  The expected stream of iteration v is
 * (0xd0010, 4, MMIO, v), (0xd0018, 2, MMIO, v & 0xffff), (0x400, 1, PIO, v & 0xff).
 *
 * Output, one JSON object on stdout: stores, exits, seconds (from just
 * before the first KVM_RUN to the HLT exit, CLOCK_MONOTONIC), stores_per_s,
 * ns_per_store, coalesced, ok.  ok is true, and the exit status 0, only if
 * every expected write was delivered exactly once and in order.
 *
 * With --serve it runs the guest as often as it is told, each time in a
 * fresh VM, like a long-lived Python VMM process: "prepare ITERATIONS
 * COALESCE" (0 or 1) on stdin sets a VM up and answers "ready"; "go" runs
 * it and answers the result line.  The exit status is then 0 only if every
 * run was right.  (The first run of a freshly started process is often
 * slower, by up to a third on this nested-virtualisation host; a
 * long-lived process does not pay that on every run.)
 *
 * The ioctl numbers and structs come from <linux/kvm.h>; the x86
 * architectural values (segment bases = selector * 16, rflags bit 1) are
 * the Intel SDM's, as in kvmcoal/kvm.py.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/kvm.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define MEM_SIZE   0x10000u
#define CODE_ADDR  0x1000u
#define MMIO_BASE  0xd0000u
#define MMIO_REG   (MMIO_BASE + 0x10u)
#define PORT       0x400u
#define TSS_ADDR   0xfffbd000u   /* kvmcoal.kvm._TSS_ADDR */

#define ENTRY_SIZE   (sizeof(struct kvm_coalesced_mmio))
#define HEADER_SIZE  (offsetof(struct kvm_coalesced_mmio_ring, coalesced_mmio))
#define MAX_DATA     (sizeof(((struct kvm_coalesced_mmio *)0)->data))

static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("cvmm: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(2);
}

static int xioctl(int fd, unsigned long request, unsigned long arg, const char *what)
{
    int rc = ioctl(fd, request, arg);
    if (rc < 0)
        die("%s: %s", what, strerror(errno));
    return rc;
}

/* ---- the handler: check each write against the expected stream, count it ---- */

struct expected_write {
    uint64_t addr;
    uint32_t len;
    uint32_t pio;
    uint64_t value;
};

struct checker {
    const struct expected_write *expected;
    size_t total;      /* writes the guest makes */
    size_t count;      /* writes delivered so far, each the expected one */
    int failed;
};

static struct expected_write *expected_writes(uint32_t iterations)
{
    struct expected_write *w = malloc(sizeof *w * 3 * (size_t)iterations);
    if (w == NULL)
        die("out of memory for %" PRIu32 " iterations", iterations);
    for (uint32_t v = 0; v < iterations; v++) {
        w[3 * (size_t)v + 0] = (struct expected_write){MMIO_REG, 4, 0, v};
        w[3 * (size_t)v + 1] = (struct expected_write){MMIO_REG + 8, 2, 0, v & 0xffffu};
        w[3 * (size_t)v + 2] = (struct expected_write){PORT, 1, 1, v & 0xffu};
    }
    return w;
}

/* data holds len (1..8) valid bytes, little-endian; the rest of its 8 bytes is zero. */
static void handle_write(struct checker *c, uint64_t addr, const uint8_t data[8], uint32_t len,
                         uint32_t pio)
{
    uint64_t value;
    memcpy(&value, data, sizeof value);   /* x86: little-endian */
    const struct expected_write *e = c->count < c->total ? &c->expected[c->count] : NULL;
    if (e == NULL || e->addr != addr || e->len != len || e->pio != pio || e->value != value) {
        if (!c->failed)
            fprintf(stderr, "cvmm: write %zu out of order: %" PRIu32 " bytes %#" PRIx64
                    " to %s %#" PRIx64 "\n", c->count, len, value, pio ? "port" : "MMIO", addr);
        c->failed = 1;
        return;
    }
    c->count++;
}

/* ---- the ring: the kernel's struct kvm_coalesced_mmio_ring in the vCPU mapping ---- */

struct ring {
    struct kvm_coalesced_mmio_ring *r;
    uint32_t max;      /* slots: (page size - header) / entry size */
};

/* Vcpu.run_loop's ring.consume(handler.write), in C. */
static void drain(const struct ring *ring, struct checker *c)
{
    uint32_t first = __atomic_load_n(&ring->r->first, __ATOMIC_RELAXED);
    uint32_t last = __atomic_load_n(&ring->r->last, __ATOMIC_ACQUIRE);
    if (first >= ring->max || last >= ring->max)
        die("ring corrupted: first=%" PRIu32 " last=%" PRIu32 " (max %" PRIu32 ")",
            first, last, ring->max);
    while (first != last) {
        struct kvm_coalesced_mmio e;
        memcpy(&e, &ring->r->coalesced_mmio[first], sizeof e);
        if (e.len == 0 || e.len > MAX_DATA)
            die("ring corrupted: slot %" PRIu32 " has len=%" PRIu32, first, e.len);
        if (e.pio > 1)
            die("ring corrupted: slot %" PRIu32 " has pio=%" PRIu32, first, e.pio);
        if (e.len < MAX_DATA)
            memset(e.data + e.len, 0, MAX_DATA - e.len);
        handle_write(c, e.phys_addr, e.data, e.len, e.pio);
        first = first + 1 == ring->max ? 0 : first + 1;
        __atomic_store_n(&ring->r->first, first, __ATOMIC_RELEASE);
    }
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ---- one VM: set up (untimed), run (timed), torn down ---- */

struct vmm {
    int kvm, vm, vcpu, mmap_size;
    long page_size;
    uint8_t *mem;
    struct kvm_run *run;
    void *ring_map;
    struct ring ring;
    struct checker c;
    int coalesce;
};

/* What kvm_workload.PythonRun.prepare does through kvmcoal.kvm. */
static void vmm_setup(struct vmm *m, const uint8_t *code, size_t code_len, uint32_t iterations,
                      int coalesce)
{
    memset(m, 0, sizeof *m);
    m->coalesce = coalesce;
    m->page_size = sysconf(_SC_PAGESIZE);
    m->kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (m->kvm < 0)
        die("cannot open /dev/kvm: %s", strerror(errno));
    if (xioctl(m->kvm, KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION") != KVM_API_VERSION)
        die("unexpected KVM API version");
    int ring_page = xioctl(m->kvm, KVM_CHECK_EXTENSION, KVM_CAP_COALESCED_MMIO,
                           "KVM_CHECK_EXTENSION(KVM_CAP_COALESCED_MMIO)");
    if (ring_page <= 0)
        die("this kernel has no coalesced MMIO ring");
    int has_pio = xioctl(m->kvm, KVM_CHECK_EXTENSION, KVM_CAP_COALESCED_PIO,
                         "KVM_CHECK_EXTENSION(KVM_CAP_COALESCED_PIO)") > 0;
    m->mmap_size = xioctl(m->kvm, KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE");

    m->vm = xioctl(m->kvm, KVM_CREATE_VM, 0, "KVM_CREATE_VM");
    if (xioctl(m->kvm, KVM_CHECK_EXTENSION, KVM_CAP_SET_TSS_ADDR, "KVM_CHECK_EXTENSION"))
        xioctl(m->vm, KVM_SET_TSS_ADDR, TSS_ADDR, "KVM_SET_TSS_ADDR");

    m->mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (m->mem == MAP_FAILED)
        die("cannot map guest memory: %s", strerror(errno));
    struct kvm_userspace_memory_region region = {
        .slot = 0, .flags = 0, .guest_phys_addr = 0, .memory_size = MEM_SIZE,
        .userspace_addr = (uint64_t)(uintptr_t)m->mem,
    };
    xioctl(m->vm, KVM_SET_USER_MEMORY_REGION, (unsigned long)&region,
           "KVM_SET_USER_MEMORY_REGION");
    memcpy(m->mem + CODE_ADDR, code, code_len);

    m->vcpu = xioctl(m->vm, KVM_CREATE_VCPU, 0, "KVM_CREATE_VCPU");
    m->run = mmap(NULL, (size_t)m->mmap_size, PROT_READ | PROT_WRITE, MAP_SHARED, m->vcpu, 0);
    if (m->run == MAP_FAILED)
        die("cannot map the vCPU: %s", strerror(errno));

    if (coalesce) {
        struct kvm_coalesced_mmio_zone zone = {.addr = MMIO_BASE, .size = 0x1000, .pio = 0};
        xioctl(m->vm, KVM_REGISTER_COALESCED_MMIO, (unsigned long)&zone,
               "KVM_REGISTER_COALESCED_MMIO");
        if (has_pio) {
            struct kvm_coalesced_mmio_zone port = {.addr = PORT, .size = 1, .pio = 1};
            xioctl(m->vm, KVM_REGISTER_COALESCED_MMIO, (unsigned long)&port,
                   "KVM_REGISTER_COALESCED_MMIO (PIO)");
        }
    }

    /* Vcpu.setup_real_mode(0x1000, segments={"es": 0xd000}, rax=0, rcx=N, rdi=0x10, rdx=0x400) */
    struct kvm_sregs sregs;
    xioctl(m->vcpu, KVM_GET_SREGS, (unsigned long)&sregs, "KVM_GET_SREGS");
    struct kvm_segment *segs[] = {&sregs.cs, &sregs.ds, &sregs.es, &sregs.fs, &sregs.gs,
                                  &sregs.ss};
    for (size_t i = 0; i < sizeof segs / sizeof *segs; i++) {
        uint16_t sel = segs[i] == &sregs.es ? (uint16_t)(MMIO_BASE >> 4) : 0;
        segs[i]->selector = sel;
        segs[i]->base = (uint64_t)sel * 16;
    }
    xioctl(m->vcpu, KVM_SET_SREGS, (unsigned long)&sregs, "KVM_SET_SREGS");
    struct kvm_regs regs;
    xioctl(m->vcpu, KVM_GET_REGS, (unsigned long)&regs, "KVM_GET_REGS");
    regs.rip = CODE_ADDR;
    regs.rflags = 0x2;
    regs.rax = 0;
    regs.rcx = iterations;
    regs.rdi = MMIO_REG - MMIO_BASE;
    regs.rdx = PORT;
    xioctl(m->vcpu, KVM_SET_REGS, (unsigned long)&regs, "KVM_SET_REGS");

    /* The ring, mapped through the vCPU fd on its own, one page, as Vm.ring does. */
    m->ring_map = mmap(NULL, (size_t)m->page_size, PROT_READ | PROT_WRITE, MAP_SHARED, m->vcpu,
                       (off_t)ring_page * m->page_size);
    if (m->ring_map == MAP_FAILED)
        die("cannot map the coalesced ring: %s", strerror(errno));
    m->ring = (struct ring){m->ring_map,
                            (uint32_t)(((size_t)m->page_size - HEADER_SIZE) / ENTRY_SIZE)};

    m->c = (struct checker){expected_writes(iterations), 3 * (size_t)iterations, 0, 0};
}

/* Vcpu.run_loop, timed; prints the result line; returns whether every store arrived in order. */
static int vmm_run(struct vmm *m)
{
    struct kvm_run *run = m->run;
    struct checker *c = &m->c;
    uint64_t exits = 0;
    double start = now();
    for (;;) {
        if (ioctl(m->vcpu, KVM_RUN, 0) < 0) {
            if (errno == EINTR)
                continue;
            die("KVM_RUN: %s", strerror(errno));
        }
        exits++;
        /* Drain before handling the exit: the writes the guest made earlier come first. */
        drain(&m->ring, c);
        if (run->exit_reason == KVM_EXIT_MMIO) {
            if (!run->mmio.is_write)
                die("the guest read MMIO %#llx; store_loop never reads",
                    (unsigned long long)run->mmio.phys_addr);
            if (run->mmio.len == 0 || run->mmio.len > 8)
                die("kvm_run.mmio.len=%" PRIu32, run->mmio.len);
            uint8_t data[8] = {0};
            memcpy(data, run->mmio.data, run->mmio.len);
            handle_write(c, run->mmio.phys_addr, data, run->mmio.len, 0);
        } else if (run->exit_reason == KVM_EXIT_IO) {
            if (run->io.direction != KVM_EXIT_IO_OUT)
                die("the guest executed IN from port %#x; store_loop never reads", run->io.port);
            uint64_t end = run->io.data_offset + (uint64_t)run->io.size * run->io.count;
            if (run->io.size == 0 || run->io.size > 8 || end > (uint64_t)m->mmap_size)
                die("kvm_run.io data outside the vCPU mapping");
            const uint8_t *p = (const uint8_t *)run + run->io.data_offset;
            for (uint32_t i = 0; i < run->io.count; i++) {
                uint8_t data[8] = {0};
                memcpy(data, p + (size_t)i * run->io.size, run->io.size);
                handle_write(c, run->io.port, data, run->io.size, 1);
            }
        } else if (run->exit_reason == KVM_EXIT_HLT) {
            break;
        } else {
            die("the guest stopped: exit reason %" PRIu32, run->exit_reason);
        }
    }
    double seconds = now() - start;

    int ok = !c->failed && c->count == c->total;
    if (!c->failed && c->count != c->total)
        fprintf(stderr, "cvmm: %zu of %zu writes delivered\n", c->count, c->total);
    printf("{\"stores\": %zu, \"exits\": %" PRIu64 ", \"seconds\": %.9f, "
           "\"stores_per_s\": %.1f, \"ns_per_store\": %.2f, \"coalesced\": %s, "
           "\"ok\": %s}\n",
           c->count, exits, seconds, (double)c->count / seconds,
           seconds / (double)c->total * 1e9, m->coalesce ? "true" : "false",
           ok ? "true" : "false");
    fflush(stdout);
    return ok;
}

static void vmm_teardown(struct vmm *m)
{
    free((void *)m->c.expected);
    munmap(m->ring_map, (size_t)m->page_size);
    munmap(m->run, (size_t)m->mmap_size);
    close(m->vcpu);
    close(m->vm);
    munmap(m->mem, MEM_SIZE);
    close(m->kvm);
}

static uint32_t parse_iterations(const char *s)
{
    char *end;
    errno = 0;
    unsigned long long n = strtoull(s, &end, 10);
    if (errno || end == s || (*end && *end != '\n') || n < 1 || n > UINT32_MAX / 3)
        die("ITERATIONS must be 1..%u, not %s", UINT32_MAX / 3, s);
    return (uint32_t)n;
}

static void usage(void)
{
    fprintf(stderr, "usage: cvmm GUEST.bin ITERATIONS [--coalesce]\n"
                    "       cvmm GUEST.bin --serve\n");
    exit(2);
}

int main(int argc, char **argv)
{
    const char *guest = NULL, *count = NULL;
    int coalesce = 0, serve = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--coalesce") == 0)
            coalesce = 1;
        else if (strcmp(argv[i], "--serve") == 0)
            serve = 1;
        else if (guest == NULL)
            guest = argv[i];
        else if (count == NULL)
            count = argv[i];
        else
            usage();
    }
    if (guest == NULL || (serve ? count != NULL || coalesce : count == NULL))
        usage();

    static uint8_t code[MEM_SIZE - CODE_ADDR];
    FILE *f = fopen(guest, "rb");
    if (f == NULL)
        die("cannot open %s: %s", guest, strerror(errno));
    size_t code_len = fread(code, 1, sizeof code, f);
    if (ferror(f) || code_len == 0)
        die("cannot read the guest from %s", guest);
    fclose(f);

    struct vmm m;
    if (!serve) {
        vmm_setup(&m, code, code_len, parse_iterations(count), coalesce);
        int ok = vmm_run(&m);
        vmm_teardown(&m);
        return ok ? 0 : 1;
    }

    /* --serve: "prepare ITERATIONS COALESCE" -> "ready"; "go" -> the result line. */
    char line[128];
    int prepared = 0, all_ok = 1;
    while (fgets(line, sizeof line, stdin) != NULL) {
        char iters[32];
        int co;
        if (sscanf(line, "prepare %31s %d", iters, &co) == 2) {
            if (prepared)
                vmm_teardown(&m);
            vmm_setup(&m, code, code_len, parse_iterations(iters), co != 0);
            prepared = 1;
            printf("ready\n");
            fflush(stdout);
        } else if (strcmp(line, "go\n") == 0 && prepared) {
            all_ok &= vmm_run(&m);
            vmm_teardown(&m);
            prepared = 0;
        } else {
            die("unknown command: %s", line);
        }
    }
    if (prepared)
        vmm_teardown(&m);
    return all_ok ? 0 : 1;
}
