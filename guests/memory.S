/* memory.S - read a read-only memory slot, write to it (an MMIO exit), then use a second RAM slot.
 * Mode: 64-bit long mode    Load: flat at GPA 0x100000, entry = first byte
 * Exits: SYNC(u32 at TEST_ROM), MmioWrite(gpa=TEST_ROM, data=de c0 ad 0b), SYNC(u32 at TEST_ROM,
 *        unchanged), SYNC(0x5a5a1234 read back from TEST_RAM2), then DONE(0) (IoOut port=0xEA)
 * The host maps a read-only slot at TEST_ROM and a RAM slot at TEST_RAM2 (one page each). */
#include "pykvm.h"

	.code64
	.section .text.entry, "ax"
	.globl	_start
_start:
	movl	PYKVM_TEST_ROM, %ebx		/* a read from the read-only slot */
	PYKVM_CALL PYKVM_CALL_SYNC
	movl	$0x0badc0de, PYKVM_TEST_ROM	/* a write to it: KVM exits with MMIO */
	movl	PYKVM_TEST_ROM, %ebx		/* the slot still holds what the host put there */
	PYKVM_CALL PYKVM_CALL_SYNC
	movl	$0x5a5a1234, PYKVM_TEST_RAM2	/* an ordinary write to the second slot */
	movl	PYKVM_TEST_RAM2, %ebx
	PYKVM_CALL PYKVM_CALL_SYNC
	PYKVM_DONE 0
