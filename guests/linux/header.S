/* linux/header.S - the real-mode part of a stub bzImage: the boot sector and one setup sector,
 * of which only the setup header (boot.rst) matters. Included by stub.S and poweroff.S, which
 * define STUB_CMDLINE_SIZE first; their linker script (bzimage.ld) gives stub_syssize and
 * stub_init_size. */
/* ---- the real-mode part: boot sector + one setup sector (only the header matters) ----------- */
	.section .setup, "a"
	.code16
	.org	0x1f1
	.byte	1			/* setup_sects */
	.word	0			/* root_flags */
	.long	stub_syssize		/* syssize: the protected-mode part in 16-byte units */
	.word	0			/* ram_size */
	.word	0xffff			/* vid_mode: normal */
	.word	0			/* root_dev */
	.word	0xaa55			/* boot_flag */
	.byte	0xeb, header_end - 1f	/* jump over the header */
1:	.ascii	"HdrS"			/* header */
	.word	0x020f			/* version 2.15 */
	.long	0			/* realmode_swtch */
	.word	0x1000			/* start_sys_seg */
	.word	0			/* kernel_version */
	.byte	0			/* type_of_loader */
	.byte	0x01			/* loadflags: LOADED_HIGH */
	.word	0x8000			/* setup_move_size */
	.long	0x100000		/* code32_start */
	.long	0, 0			/* ramdisk_image, ramdisk_size */
	.long	0			/* bootsect_kludge */
	.word	0			/* heap_end_ptr */
	.byte	0, 0			/* ext_loader_ver, ext_loader_type */
	.long	0			/* cmd_line_ptr */
	.long	0x7fffffff		/* initrd_addr_max */
	.long	0x200000		/* kernel_alignment */
	.byte	0			/* relocatable_kernel: no */
	.byte	21			/* min_alignment: 2 MiB */
	.word	0x0001			/* xloadflags: XLF_KERNEL_64 */
	.long	STUB_CMDLINE_SIZE	/* cmdline_size */
	.long	0			/* hardware_subarch */
	.quad	0			/* hardware_subarch_data */
	.long	0, 0			/* payload_offset, payload_length: nothing compressed */
	.quad	0			/* setup_data */
	.quad	0x100000		/* pref_address */
	.long	stub_init_size		/* init_size */
	.long	0			/* handover_offset */
	.long	0			/* kernel_info_offset */
header_end:
	.org	1024
