/* print.c - number and string output on top of each kernel's putc (see print.h). */
#include "print.h"

void puts(const char *s)
{
	while (*s)
		putc(*s++);
}

void put_hex(u64 value, int digits)
{
	static const char hex[] = "0123456789abcdef";
	puts("0x");
	for (int i = digits - 1; i >= 0; i--)
		putc(hex[(value >> (4 * i)) & 0xF]);
}

void put_hex_min(u64 value, int min)
{
	int digits = min;
	while (digits < 16 && (value >> (4 * digits)))
		digits++;
	put_hex(value, digits);
}

void put_dec(u32 value)
{
	char buf[10];
	int n = 0;
	do {
		buf[n++] = (char)('0' + value % 10);
		value /= 10;
	} while (value);
	while (n)
		putc(buf[--n]);
}

void put_text(const char *s, u32 limit)
{
	for (u32 i = 0; i < limit && s[i]; i++)
		putc(s[i] >= 0x20 && s[i] < 0x7F ? s[i] : '.');
}
