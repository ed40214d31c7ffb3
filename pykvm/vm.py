"""``Vm``: a VM file descriptor (memory slots, interrupt controllers, event fds, vCPUs)."""

from __future__ import annotations

from ._fd import FdObject
from ._ffi import ffi
from .constants import (
    IOEVENTFD_FLAG_DATAMATCH,
    IOEVENTFD_FLAG_DEASSIGN,
    IOEVENTFD_FLAG_PIO,
    IRQ_ROUTING_IRQCHIP,
    IRQ_ROUTING_MSI,
    IRQFD_FLAG_DEASSIGN,
    MEM_LOG_DIRTY_PAGES,
    MEM_READONLY,
    Cap,
)
from .memory import GuestMemory, MemoryRegion


class Vm(FdObject):
    """One virtual machine: its guest memory (:attr:`memory`) and its vCPUs (:attr:`vcpus`)."""

    def __init__(self, kvm, fd: int):
        self.kvm = kvm
        self._fd = fd
        self.memory = GuestMemory()
        self.vcpus: list = []

    def __repr__(self) -> str:
        return f"<Vm fd={self._fd} memory={self.memory.size:#x} vcpus={len(self.vcpus)}>"

    # ---- capabilities -------------------------------------------------------------------------
    def check_extension(self, cap: Cap | int) -> int:
        """A capability's value for this VM. Wraps ``KVM_CHECK_EXTENSION`` on the VM fd."""
        return self._ioctl("KVM_CHECK_EXTENSION", int(cap))

    def has_cap(self, cap: Cap | int) -> bool:
        return self.check_extension(cap) > 0

    def enable_cap(self, cap: Cap | int, *args: int, flags: int = 0) -> None:
        """Turn on a VM capability with up to four arguments. Wraps ``KVM_ENABLE_CAP``."""
        self._ioctl("KVM_ENABLE_CAP", enable_cap_struct(cap, args, flags))

    # ---- memory -------------------------------------------------------------------------------
    def set_user_memory_region(self, slot: int, flags: int, gpa: int, size: int, hva: int) -> None:
        """Map (size > 0) or delete (size = 0) memory slot ``slot``. Wraps ``KVM_SET_USER_MEMORY_REGION``."""
        region = ffi.new(
            "struct kvm_userspace_memory_region *",
            {"slot": slot, "flags": flags, "guest_phys_addr": gpa, "memory_size": size, "userspace_addr": hva},
        )
        self._ioctl("KVM_SET_USER_MEMORY_REGION", region)

    def add_memory(
        self, gpa: int, size: int, *, slot: int | None = None, readonly: bool = False, log_dirty: bool = False,
        backing=None,
    ) -> MemoryRegion:
        """Allocate ``size`` bytes of host memory (or take ``backing``, an mmap of that size) and
        map it into the guest at ``gpa``."""
        slot = self.memory.free_slot() if slot is None else slot
        self.memory.check_free(slot, gpa, size)
        if readonly and not self.kvm.has_cap(Cap.READONLY_MEM):
            raise ValueError("this KVM has no read-only memory slots (KVM_CAP_READONLY_MEM)")
        region = MemoryRegion.allocate(slot, gpa, size, readonly=readonly, log_dirty=log_dirty, backing=backing)
        flags = (MEM_READONLY if readonly else 0) | (MEM_LOG_DIRTY_PAGES if log_dirty else 0)
        try:
            self.set_user_memory_region(slot, flags, gpa, size, region.hva)
        except BaseException:
            region.close()
            raise
        self.memory.add(region)
        return region

    def remove_memory(self, region: MemoryRegion) -> None:
        """Delete a slot from the guest, then free its host memory."""
        self.set_user_memory_region(region.slot, 0, region.gpa, 0, 0)
        self.memory.remove(region)
        region.close()

    def get_dirty_log(self, slot: int) -> bytes:
        """The dirty-page bitmap of a slot (one bit per 4 KiB page), cleared as read. Wraps ``KVM_GET_DIRTY_LOG``."""
        region = next((r for r in self.memory if r.slot == slot), None)
        if region is None:
            raise ValueError(f"no memory slot {slot}")
        pages = region.size // 4096
        bitmap = ffi.new("uint64_t[]", (pages + 63) // 64)
        log = ffi.new("struct kvm_dirty_log *", {"slot": slot})
        log.dirty_bitmap = bitmap
        self._ioctl("KVM_GET_DIRTY_LOG", log)
        return bytes(ffi.buffer(bitmap))[: (pages + 7) // 8]

    def clear_dirty_log(self, slot: int, first_page: int, bitmap: bytes) -> None:
        """Write-protect again the pages set in ``bitmap`` (one bit a page from ``first_page``, a
        multiple of 64) and clear their dirty bits: with KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        KVM_GET_DIRTY_LOG leaves both to this call. Wraps ``KVM_CLEAR_DIRTY_LOG``."""
        words = ffi.new("uint64_t[]", max((len(bitmap) + 7) // 8, 1))
        ffi.memmove(words, bitmap, len(bitmap))
        log = ffi.new("struct kvm_clear_dirty_log *", {"slot": slot, "num_pages": len(bitmap) * 8,
                                                        "first_page": first_page})
        log.dirty_bitmap = words
        self._ioctl("KVM_CLEAR_DIRTY_LOG", log)

    def reset_dirty_rings(self) -> int:
        """Write-protect again every page the vCPUs' dirty rings hand back as harvested (flags
        RESET); returns how many. Wraps ``KVM_RESET_DIRTY_RINGS``."""
        return self._ioctl("KVM_RESET_DIRTY_RINGS")

    def set_tss_addr(self, gpa: int) -> None:
        """Where KVM may put its 3-page real-mode TSS (Intel without unrestricted guest). Wraps ``KVM_SET_TSS_ADDR``."""
        self._ioctl("KVM_SET_TSS_ADDR", gpa)

    def set_identity_map_addr(self, gpa: int) -> None:
        """Where KVM may put its identity-map page (Intel EPT real mode). Wraps ``KVM_SET_IDENTITY_MAP_ADDR``."""
        self._ioctl("KVM_SET_IDENTITY_MAP_ADDR", ffi.new("__u64 *", gpa))

    # ---- interrupt controllers and timers -----------------------------------------------------
    def create_irqchip(self) -> None:
        """Create the in-kernel PIC, IOAPIC and local APICs. Wraps ``KVM_CREATE_IRQCHIP``."""
        self._ioctl("KVM_CREATE_IRQCHIP")

    def get_irqchip(self, chip_id: int):
        """State of PIC master (0), PIC slave (1) or IOAPIC (2). Wraps ``KVM_GET_IRQCHIP``."""
        chip = ffi.new("struct kvm_irqchip *", {"chip_id": chip_id})
        self._ioctl("KVM_GET_IRQCHIP", chip)
        return chip

    def set_irqchip(self, chip) -> None:
        """Wraps ``KVM_SET_IRQCHIP``."""
        self._ioctl("KVM_SET_IRQCHIP", chip)

    def create_pit2(self, flags: int = 0) -> None:
        """Create the in-kernel i8254 PIT. Wraps ``KVM_CREATE_PIT2``."""
        self._ioctl("KVM_CREATE_PIT2", ffi.new("struct kvm_pit_config *", {"flags": flags}))

    def reinject_control(self, pit_reinject: bool) -> None:
        """Whether the in-kernel PIT re-injects ticks the guest missed (KVM's default) or drops
        them (QEMU's ``kvm-pit.lost_tick_policy=discard``). Wraps ``KVM_REINJECT_CONTROL``."""
        self._ioctl("KVM_REINJECT_CONTROL", ffi.new("struct kvm_reinject_control *", {"pit_reinject": int(pit_reinject)}))

    def get_pit2(self):
        """Wraps ``KVM_GET_PIT2``."""
        state = ffi.new("struct kvm_pit_state2 *")
        self._ioctl("KVM_GET_PIT2", state)
        return state

    def set_pit2(self, state) -> None:
        """Wraps ``KVM_SET_PIT2``."""
        self._ioctl("KVM_SET_PIT2", state)

    def set_gsi_routing(self, routes: list[tuple[int, int, int]], msi: list[tuple[int, int, int]] = ()) -> None:
        """Replace the GSI routing table: ``routes`` of (gsi, irqchip, pin) (irqchip: IRQCHIP_PIC_MASTER,
        IRQCHIP_PIC_SLAVE or IRQCHIP_IOAPIC) and ``msi`` of (gsi, address, data).
        Wraps ``KVM_SET_GSI_ROUTING``."""
        n = len(routes) + len(msi)
        table = ffi.new("struct kvm_irq_routing *", {"nr": n, "entries": n})
        for entry, (gsi, chip, pin) in zip(table.entries, routes):
            entry.gsi, entry.type = gsi, IRQ_ROUTING_IRQCHIP
            entry.u.irqchip.irqchip, entry.u.irqchip.pin = chip, pin
        for i, (gsi, address, data) in enumerate(msi, start=len(routes)):
            entry = table.entries[i]
            entry.gsi, entry.type = gsi, IRQ_ROUTING_MSI
            entry.u.msi.address_lo, entry.u.msi.address_hi, entry.u.msi.data = address & 0xFFFFFFFF, address >> 32, data
        self._ioctl("KVM_SET_GSI_ROUTING", table)

    def irq_line(self, irq: int, level: int) -> None:
        """Raise (1) or lower (0) an interrupt line (GSI). Wraps ``KVM_IRQ_LINE``."""
        self._ioctl("KVM_IRQ_LINE", ffi.new("struct kvm_irq_level *", {"irq": irq, "level": level}))

    def signal_msi(self, address: int, data: int) -> int:
        """Inject an MSI; returns >0 if delivered, 0 if blocked by the guest. Wraps ``KVM_SIGNAL_MSI``."""
        msi = ffi.new(
            "struct kvm_msi *", {"address_lo": address & 0xFFFFFFFF, "address_hi": address >> 32, "data": data}
        )
        return self._ioctl("KVM_SIGNAL_MSI", msi)

    def irqfd(self, fd: int, gsi: int, *, deassign: bool = False) -> None:
        """Raise ``gsi`` whenever eventfd ``fd`` is written. Wraps ``KVM_IRQFD``."""
        flags = IRQFD_FLAG_DEASSIGN if deassign else 0
        self._ioctl("KVM_IRQFD", ffi.new("struct kvm_irqfd *", {"fd": fd, "gsi": gsi, "flags": flags}))

    def ioeventfd(
        self, fd: int, addr: int, size: int, *, pio: bool = False, datamatch: int | None = None, deassign: bool = False
    ) -> None:
        """Signal eventfd ``fd`` on a guest write to ``addr`` instead of exiting. Wraps ``KVM_IOEVENTFD``."""
        if size not in (0, 1, 2, 4, 8):
            raise ValueError(f"ioeventfd size must be 0, 1, 2, 4 or 8, not {size}")
        flags = (IOEVENTFD_FLAG_PIO if pio else 0) | (IOEVENTFD_FLAG_DEASSIGN if deassign else 0)
        if datamatch is not None:
            flags |= IOEVENTFD_FLAG_DATAMATCH
        self._ioctl(
            "KVM_IOEVENTFD",
            ffi.new(
                "struct kvm_ioeventfd *",
                {"datamatch": datamatch or 0, "addr": addr, "len": size, "fd": fd, "flags": flags},
            ),
        )

    def register_coalesced_mmio(self, addr: int, size: int, *, pio: bool = False) -> None:
        """Batch guest writes to a write-only range in the coalesced ring. Wraps ``KVM_REGISTER_COALESCED_MMIO``."""
        zone = ffi.new("struct kvm_coalesced_mmio_zone *", {"addr": addr, "size": size, "pio": int(pio)})
        self._ioctl("KVM_REGISTER_COALESCED_MMIO", zone)

    def unregister_coalesced_mmio(self, addr: int, size: int, *, pio: bool = False) -> None:
        """Wraps ``KVM_UNREGISTER_COALESCED_MMIO``."""
        zone = ffi.new("struct kvm_coalesced_mmio_zone *", {"addr": addr, "size": size, "pio": int(pio)})
        self._ioctl("KVM_UNREGISTER_COALESCED_MMIO", zone)

    def get_clock(self):
        """The kvmclock value (ns). Wraps ``KVM_GET_CLOCK``."""
        data = ffi.new("struct kvm_clock_data *")
        self._ioctl("KVM_GET_CLOCK", data)
        return data

    def set_clock(self, clock_ns: int) -> None:
        """Wraps ``KVM_SET_CLOCK``."""
        self._ioctl("KVM_SET_CLOCK", ffi.new("struct kvm_clock_data *", {"clock": clock_ns}))

    def x86_set_msr_filter(self, ranges: list[tuple[int, int, int, bytes]], *, default_deny: bool = False) -> None:
        """Filter guest RDMSR/WRMSR: ``ranges`` of (flags, base, nmsrs, bitmap) where flags are
        MSR_FILTER_READ/WRITE and a 0 bit in ``bitmap`` denies (with KVM_CAP_X86_USER_SPACE_MSR the
        access then exits to user space). Wraps ``KVM_X86_SET_MSR_FILTER``."""
        if len(ranges) > 16:
            raise ValueError("KVM_X86_SET_MSR_FILTER takes at most 16 ranges")
        filt = ffi.new("struct kvm_msr_filter *", {"flags": int(default_deny)})
        keep = []  # the bitmaps must live until the ioctl returns
        for i, (flags, base, nmsrs, bitmap) in enumerate(ranges):
            if len(bitmap) * 8 < nmsrs:
                raise ValueError(f"MSR filter range {i}: a bitmap of {len(bitmap)} bytes cannot cover {nmsrs} MSRs")
            buf = ffi.new("__u8[]", bytes(bitmap))
            keep.append(buf)
            r = filt.ranges[i]
            r.flags, r.base, r.nmsrs, r.bitmap = flags, base, nmsrs, buf
        self._ioctl("KVM_X86_SET_MSR_FILTER", filt)

    def get_stats_fd(self) -> int:
        """A file descriptor of the VM's binary statistics (caller closes it). Wraps ``KVM_GET_STATS_FD``."""
        return self._ioctl("KVM_GET_STATS_FD")

    # ---- vCPUs --------------------------------------------------------------------------------
    def create_vcpu(self, vcpu_id: int | None = None):
        """A new vCPU (``vcpu_id`` defaults to the next free one). Wraps ``KVM_CREATE_VCPU``."""
        from .vcpu import Vcpu

        vcpu_id = len(self.vcpus) if vcpu_id is None else vcpu_id
        if vcpu_id < 0:
            raise ValueError(f"vCPU id must be >= 0, not {vcpu_id}")
        fd = self._ioctl("KVM_CREATE_VCPU", vcpu_id)
        vcpu = Vcpu(self, fd, vcpu_id)
        self.vcpus.append(vcpu)
        return vcpu

    def close(self) -> None:
        """Close the vCPUs, the VM fd, then free guest memory. Idempotent."""
        for vcpu in self.vcpus:
            vcpu.close()
        super().close()
        for region in list(self.memory):
            self.memory.remove(region)
            region.close()


def enable_cap_struct(cap, args, flags):
    if len(args) > 4:
        raise ValueError("KVM_ENABLE_CAP takes at most four arguments")
    return ffi.new(
        "struct kvm_enable_cap *", {"cap": int(cap), "flags": flags, "args": list(args) + [0] * (4 - len(args))}
    )
