# Cython view of the parts of <linux/kvm.h> that kvmcoal.kvm._abi uses: names
# only, so the layout and the ioctl numbers are always the system header's.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

cdef extern from "<sys/ioctl.h>" nogil:
    int ioctl(int fd, unsigned long request, ...)

cdef extern from "<linux/kvm.h>" nogil:
    const int KVM_API_VERSION
    const unsigned long KVM_GET_API_VERSION, KVM_CREATE_VM, KVM_CHECK_EXTENSION
    const unsigned long KVM_GET_VCPU_MMAP_SIZE, KVM_CREATE_VCPU, KVM_RUN
    const unsigned long KVM_SET_USER_MEMORY_REGION, KVM_SET_TSS_ADDR
    const unsigned long KVM_REGISTER_COALESCED_MMIO, KVM_UNREGISTER_COALESCED_MMIO
    const unsigned long KVM_GET_REGS, KVM_SET_REGS, KVM_GET_SREGS, KVM_SET_SREGS

    const int KVM_CAP_COALESCED_MMIO, KVM_CAP_COALESCED_PIO, KVM_CAP_SET_TSS_ADDR

    const int KVM_EXIT_IO, KVM_EXIT_HLT, KVM_EXIT_MMIO, KVM_EXIT_SHUTDOWN
    const int KVM_EXIT_FAIL_ENTRY, KVM_EXIT_INTERNAL_ERROR
    const int KVM_EXIT_IO_IN, KVM_EXIT_IO_OUT

    struct kvm_userspace_memory_region:
        uint32_t slot
        uint32_t flags
        uint64_t guest_phys_addr
        uint64_t memory_size
        uint64_t userspace_addr

    struct kvm_coalesced_mmio_zone:
        uint64_t addr
        uint32_t size
        uint32_t pio

    struct kvm_regs:
        uint64_t rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp
        uint64_t r8, r9, r10, r11, r12, r13, r14, r15
        uint64_t rip, rflags

    # Every field is named, padding included: Cython converts these structs
    # to and from dicts field by field, and a field left out would reach the
    # kernel uninitialized (a stray bit in interrupt_bitmap injects an IRQ).
    struct kvm_segment:
        uint64_t base
        uint32_t limit
        uint16_t selector
        uint8_t type, present, dpl, db, s, l, g, avl, unusable, padding

    struct kvm_dtable:
        uint64_t base
        uint16_t limit
        uint16_t padding[3]

    struct kvm_sregs:
        kvm_segment cs, ds, es, fs, gs, ss, tr, ldt
        kvm_dtable gdt, idt
        uint64_t cr0, cr2, cr3, cr4, cr8, efer, apic_base
        unsigned long long interrupt_bitmap[4]   # __u64, as the header spells it

# The sizes the declarations above rely on, checked against the header.
cdef extern from *:
    """
    _Static_assert(sizeof(((struct kvm_sregs *)0)->interrupt_bitmap) == 4 * sizeof(__u64),
                   "kvm_sregs.interrupt_bitmap is declared as 4 words in kvm_abi.pxd");
    _Static_assert(sizeof(struct kvm_sregs) == 8 * sizeof(struct kvm_segment)
                   + 2 * sizeof(struct kvm_dtable) + 11 * sizeof(__u64),
                   "kvm_abi.pxd names every field of struct kvm_sregs");
    _Static_assert(sizeof(struct kvm_segment) == 24 && sizeof(struct kvm_dtable) == 16,
                   "kvm_abi.pxd names every field of kvm_segment and kvm_dtable");
    """

    # The kvm_run exit payloads are anonymous structs in the header; these
    # names exist only on the Cython side and never reach the C code.
    struct _kvm_run_fail_entry:
        uint64_t hardware_entry_failure_reason
        uint32_t cpu
    struct _kvm_run_io:
        uint8_t direction
        uint8_t size
        uint16_t port
        uint32_t count
        uint64_t data_offset
    struct _kvm_run_mmio:
        uint64_t phys_addr
        uint8_t data[8]
        uint32_t len
        uint8_t is_write
    struct _kvm_run_internal:
        uint32_t suberror
        uint32_t ndata
        uint64_t data[16]

    struct kvm_run:
        uint32_t exit_reason
        _kvm_run_fail_entry fail_entry
        _kvm_run_io io
        _kvm_run_mmio mmio
        _kvm_run_internal internal
