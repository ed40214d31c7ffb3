"""Tests for the boot code in boot/ (boot.S, kernel.c, lib.c), run on a real vCPU by pykvm.

What a kernel developer checks before trying real hardware: the POST codes come in order, .bss
is zeroed however dirty RAM was, boot_info holds what CPUID says, a CPU without a needed
feature is refused with its name, and the string functions hold up in 32- and 64-bit code.
Run with `pytest examples/` (add `-n auto` with pytest-xdist: each worker makes its own VMs).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pykvm import exits
from pykvm.testing import expect_exit

BOOT = Path(__file__).parent / "boot"
POST_PORT = 0x80


@pytest.fixture(scope="module")
def kernel(guest_build):
    """The kernel as its Makefile links it: boot.S first, with its own linker script."""
    return guest_build(BOOT / "boot.S", BOOT / "kernel.c", BOOT / "lib.c", include=[BOOT],
                       linker_script=BOOT / "kernel.ld")


@pytest.fixture
def post_codes():
    """A port 0x80 handler that records the POST codes (a real board shows them on two digits)."""

    class Post(list):
        def __call__(self, exit, vcpu):
            self.append(exit.data[0])

    return Post()


def test_boots_and_greets(kvm_machine, run_guest, kernel, post_codes):
    m = kvm_machine(image=kernel)
    m.on_port(POST_PORT, post_codes)
    result = run_guest(m)  # a FAIL in boot.S or a PYKVM_ASSERT in kernel.c fails the test here
    vendor = next(e for e in m.supported_cpuid if e.function == 0)
    name = b"".join(r.to_bytes(4, "little") for r in (vendor.ebx, vendor.edx, vendor.ecx))
    assert result.console == b"kernel: booted on " + name + b"\n"
    assert post_codes == [0x01, 0x02, 0x03, 0x04]


def test_first_instructions_write_post_code_1(kvm_machine, kernel):
    """Step to the very first exit: the entry's POST code, before boot.S has set a stack."""
    m = kvm_machine(image=kernel)
    expect_exit(m, exits.IoOut, port=POST_PORT, size=1, data=b"\x01")
    assert m.vcpu.get_regs().rsp == 0x9F000  # still the loader's stack
    expect_exit(m, exits.IoOut, port=POST_PORT, data=b"\x02")
    stack_top = kernel.symbols["boot_stack_top"]
    assert m.vcpu.get_regs().rsp == stack_top


def test_boot_info_is_what_cpuid_says(kvm_machine, run_guest, kernel):
    m = kvm_machine(image=kernel)
    m.on_port(POST_PORT, lambda exit, vcpu: None)
    run_guest(m)
    info = m.memory.read(kernel.symbols["boot_info"], 32)
    leaf0 = next(e for e in m.vcpu.get_cpuid2() if e.function == 0)
    assert info[0:4] == b"BOOK"
    assert int.from_bytes(info[4:8], "little") == leaf0.eax
    assert info[8:20] == b"".join(r.to_bytes(4, "little") for r in (leaf0.ebx, leaf0.edx, leaf0.ecx))


def test_bss_is_zeroed_even_when_ram_is_dirty(kvm_machine, run_guest, kernel):
    """The loader copies only the file: whatever RAM held under .bss must not leak into it."""
    m = kvm_machine(image=kernel)
    m.on_port(POST_PORT, lambda exit, vcpu: None)
    start, end = kernel.symbols["__bss_start"], kernel.symbols["__bss_end"]
    assert start >= kernel.load + len(kernel)  # NOLOAD: .bss is not in the image
    m.memory.write(start, b"\xa5" * (end - start))
    run_guest(m)  # kernel.c asserts that its early_heap[] reads zero


def test_refuses_a_cpu_without_nx(kvm_machine, run_guest, kernel, post_codes):
    m = kvm_machine(image=kernel)
    m.on_port(POST_PORT, post_codes)
    cpuid = [dataclasses.replace(e, edx=e.edx & ~(1 << 20)) if e.function == 0x80000001 else e
             for e in m.vcpu.get_cpuid2()]
    m.vcpu.set_cpuid2(cpuid)
    result = run_guest(m, check=False)  # the FAIL comes back as data
    assert result.failure is not None, "boot.S booted a CPU whose CPUID says it has no NX"
    assert result.failure.message == "boot.S: the CPU has no NX"
    assert result.failure.value == 0x80000001
    assert post_codes == [0x01, 0x02]  # stopped before POST_CPU_OK


@pytest.mark.kvm_cap("IRQCHIP")
def test_boots_on_a_two_cpu_machine(kvm_machine, run_guest, kernel):
    """With KVM's irqchip and a second vCPU waiting for INIT/SIPI, the boot CPU still gets through."""
    m = kvm_machine(image=kernel, cpus=2, irqchip=True)
    m.on_port(POST_PORT, lambda exit, vcpu: None)
    assert run_guest(m).console.startswith(b"kernel: booted on ")


# ---- lib.c on its own: a C test program per case, linked with lib.c, in 32- and 64-bit code ----

@pytest.mark.parametrize("mode", ["protected", "long"])
def test_memmove_overlapping_both_ways(guest_c, run_guest, mode):
    image = guest_c(r"""
        #include "lib.h"

        int main(void)
        {
            char up[] = "abcdefgh", down[] = "abcdefgh";

            memmove(up + 2, up, 5);             /* destination above the source */
            PYKVM_ASSERT(memcmp(up, "ababcdeh", 8) == 0, up[2]);
            memmove(down, down + 2, 5);         /* destination below the source */
            PYKVM_ASSERT(memcmp(down, "cdefgfgh", 8) == 0, down[0]);
            return 0;
        }
    """, mode=mode, link=[BOOT / "lib.c"], include=[BOOT])
    run_guest(image)


@pytest.mark.parametrize("mode", ["protected", "long"])
@pytest.mark.parametrize("misalign", [0, 1, 3, 7])
def test_memset_and_memcpy_at_every_alignment(guest_c, run_guest, mode, misalign):
    image = guest_c(r"""
        #include "lib.h"

        static unsigned char src[96], dst[96];

        int main(void)
        {
            for (int i = 0; i < 96; i++)
                src[i] = (unsigned char)(i * 7 + 1);
            memset(dst, 0xEE, sizeof(dst));
            memcpy(dst + MISALIGN, src + MISALIGN, 80);
            for (int i = 0; i < 96; i++) {
                int copied = i >= MISALIGN && i < MISALIGN + 80;
                PYKVM_ASSERT(dst[i] == (copied ? src[i] : 0xEE), i);
            }
            memset(dst + MISALIGN, 0, 33);
            for (int i = MISALIGN; i < MISALIGN + 33; i++)
                PYKVM_ASSERT(dst[i] == 0, i);
            PYKVM_ASSERT(dst[MISALIGN + 33] == src[MISALIGN + 33], dst[MISALIGN + 33]);
            return 0;
        }
    """, mode=mode, link=[BOOT / "lib.c"], include=[BOOT], flags=[f"-DMISALIGN={misalign}"])
    run_guest(image)


def test_strlen_in_a_few_lines_of_assembly(guest_asm, run_guest):
    """Assembly calling into the kernel's C: strlen of a string in .rodata, the result as SYNC."""
    result = run_guest(guest_asm(r"""
        leaq    greeting(%rip), %rdi
        call    strlen
        movl    %eax, %ebx
        PYKVM_CALL PYKVM_CALL_SYNC              /* the host records EBX; EAX is the call number */
        cmpl    $5, %ebx
        je      1f
        PYKVM_FAIL __LINE__, 5, bad_length
    1:
        .section .rodata
    greeting:   .asciz "hello"
    bad_length: .asciz "test_boot.py: strlen(\"hello\") is not 5"
    """, link=[BOOT / "lib.c"]))
    assert result.syncs == (5,)
