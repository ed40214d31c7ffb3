/* linux/poweroff.S - a tiny Linux/x86 boot-protocol kernel for `pykvm boot`'s own tests: it speaks
 * only to the PC that `pykvm boot` builds (no pykvm call port there), then powers it off.
 * Mode: a bzImage (linux_poweroff.bzImage), entered at the 64-bit entry (load + 0x200): long
 *       mode, RSI = the zero page, interrupts off.
 * Load: the protected-mode part at 0x100000 (pref_address; not relocatable).
 * Output on COM1 (0x3F8, the UART's transmitter takes a byte at a time):
 *       "poweroff stub: cmdline <the command line>\n"
 *       "poweroff stub: e820 <entries> initrd <size>\n"         (hex)
 *       "poweroff stub: virtio <slot> device <id>\n"            for each virtio-mmio slot whose
 *                                                               MagicValue reads "virt" (hex)
 *       "poweroff stub: power off\n", then ACPI S5: PM1a_CNT (0x604) = SLP_EN | SLP_TYP 0.
 * A guest that reached the end without the power-off taking (it should not) stops in `hlt`. */
#include "pykvm.h"

#define STUB_CMDLINE_SIZE	2047
#include "header.S"

#define COM1			0x3f8
#define PM1A_CNT		0x604		/* QEMU 7.2's PC: the PM block at 0x600 */
#define SLP_EN			0x2000
#define VIRTIO_BASE		0xd0000000	/* layout.VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE apart */
#define VIRTIO_SLOTS		8
#define VIRTIO_MAGIC		0x74726976
#define ZP_E820_ENTRIES		0x1e8
#define ZP_RAMDISK_SIZE		0x21c
#define ZP_CMD_LINE_PTR		0x228

	.section .text.entry, "ax"
	.code32
	.globl	startup_32
startup_32:				/* the 32-bit entry: `pykvm boot` never uses it */
	hlt
	jmp	startup_32

	.org	0x200
	.code64
	.globl	startup_64
startup_64:
	movq	%rsi, %r12		/* the zero page */
	leaq	msg_cmdline(%rip), %rsi
	call	puts
	movl	ZP_CMD_LINE_PTR(%r12), %esi
	call	puts
	movb	$'\n', %al
	call	putc

	leaq	msg_e820(%rip), %rsi
	call	puts
	movzbl	ZP_E820_ENTRIES(%r12), %eax
	call	puthex
	leaq	msg_initrd(%rip), %rsi
	call	puts
	movl	ZP_RAMDISK_SIZE(%r12), %eax
	call	puthex
	movb	$'\n', %al
	call	putc

	xorl	%ebx, %ebx		/* slot */
1:	movl	%ebx, %edi
	shll	$12, %edi
	addl	$VIRTIO_BASE, %edi
	cmpl	$VIRTIO_MAGIC, (%rdi)
	jne	2f
	leaq	msg_virtio(%rip), %rsi
	call	puts
	movl	%ebx, %eax
	call	puthex
	leaq	msg_device(%rip), %rsi
	call	puts
	movl	8(%rdi), %eax		/* DeviceID */
	call	puthex
	movb	$'\n', %al
	call	putc
2:	incl	%ebx
	cmpl	$VIRTIO_SLOTS, %ebx
	jb	1b

	leaq	msg_off(%rip), %rsi
	call	puts
	movw	$PM1A_CNT, %dx
	movw	$SLP_EN, %ax
	outw	%ax, %dx
3:	hlt
	jmp	3b

/* putc: AL to COM1.  puts: the NUL-terminated string at RSI.  puthex: EAX in hex (no leading 0s). */
putc:
	movw	$COM1, %dx
	outb	%al, %dx
	ret
puts:
	lodsb
	testb	%al, %al
	jz	1f
	call	putc
	jmp	puts
1:	ret
puthex:
	movl	%eax, %r8d
	movl	$28, %ecx
	xorl	%r9d, %r9d		/* a digit printed yet */
1:	movl	%r8d, %eax
	shrl	%cl, %eax
	andl	$0xf, %eax
	orl	%eax, %r9d
	jnz	2f
	testl	%ecx, %ecx
	jnz	3f
2:	leaq	hexdigits(%rip), %rsi
	movb	(%rsi,%rax), %al
	call	putc
	movl	$1, %r9d
3:	subl	$4, %ecx
	jns	1b
	ret

	.section .rodata
msg_cmdline:	.asciz	"poweroff stub: cmdline "
msg_e820:	.asciz	"poweroff stub: e820 "
msg_initrd:	.asciz	" initrd "
msg_virtio:	.asciz	"poweroff stub: virtio "
msg_device:	.asciz	" device "
msg_off:	.asciz	"poweroff stub: power off\n"
hexdigits:	.ascii	"0123456789abcdef"
