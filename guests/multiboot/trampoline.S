/* trampoline.S - where the platform kernel's application processors start after INIT/SIPI.
 * The BSP copies [ap_trampoline, ap_trampoline_end) to AP_TRAMPOLINE (a page below 1 MiB whose
 * number is the SIPI vector) and fills ap_stack_top. An AP enters in real mode with
 * CS = AP_TRAMPOLINE >> 4, IP = 0, loads the GDT below, turns protection on, and calls ap_main
 * in 32-bit code on a stack of its own (each AP takes the next one: ap_stack_top, lock xadd). */
#define AP_TRAMPOLINE	0x8000
#define AP_STACK_SIZE	4096
#define CODE_SEL	0x08
#define DATA_SEL	0x10
#define REL(x)		((x) - ap_trampoline)	/* offset inside the trampoline (real mode, DS = CS) */

	.section .rodata
	.globl	ap_trampoline, ap_trampoline_end
	.code16
ap_trampoline:
	cli
	movw	%cs, %ax
	movw	%ax, %ds
	lgdtl	REL(gdt_pointer)
	movl	%cr0, %eax
	orl	$1, %eax			/* CR0.PE */
	movl	%eax, %cr0
	ljmpl	$CODE_SEL, $(AP_TRAMPOLINE + REL(protected))
	.code32
protected:
	movw	$DATA_SEL, %ax
	movw	%ax, %ds
	movw	%ax, %es
	movw	%ax, %ss
	movl	$AP_STACK_SIZE, %esp
	lock xaddl %esp, ap_stack_top		/* ESP = this AP's stack top; the next AP gets the one after */
	movl	$ap_main, %eax
	call	*%eax
1:	cli
	hlt
	jmp	1b
	.balign	8
gdt:	.quad	0
	.quad	0x00CF9B000000FFFF		/* 0x08: flat 32-bit code */
	.quad	0x00CF93000000FFFF		/* 0x10: flat data */
gdt_pointer:
	.word	3 * 8 - 1
	.long	AP_TRAMPOLINE + REL(gdt)
ap_trampoline_end:
