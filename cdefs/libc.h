/* cdefs/libc.h - the C library functions pykvm calls through cffi (ABI mode, from the process). */

/* Variadic: in ABI mode the third argument must be cdata (a pointer or an unsigned long cast). */
int ioctl(int fd, unsigned long request, ...);
