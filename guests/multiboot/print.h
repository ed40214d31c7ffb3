/* print.h - text output for pykvm's multiboot test kernels. Each kernel defines putc (where its
 * bytes go: the debug console, or the UART); print.c builds the rest on it. */
#ifndef PRINT_H
#define PRINT_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

void putc(char c);
void puts(const char *s);
void put_hex(u64 value, int digits);
void put_hex_min(u64 value, int min);	/* at least `min` hex digits, more if the value needs them */
void put_dec(u32 value);
void put_text(const char *s, u32 limit);	/* a foreign string: at most `limit` bytes, '.' for unprintables */

#endif
