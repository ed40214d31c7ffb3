/* lib.c - memcpy, memmove, memset, memcmp and strlen for a freestanding kernel.
 *
 * gcc emits calls to memcpy and memset on its own (struct copies, large initialisers), so a
 * kernel must provide them. Word-at-a-time where both pointers allow it; byte loops otherwise.
 * Built for 32- and 64-bit code alike (-m32 / -m64).
 */
#include "lib.h"

typedef unsigned long word_t;
#define WORD sizeof(word_t)
#define ALIGNED(p) (((unsigned long)(p) & (WORD - 1)) == 0)

void *memcpy(void *dst, const void *src, size_t n)
{
	unsigned char *d = dst;
	const unsigned char *s = src;

	if (ALIGNED(d) && ALIGNED(s)) {
		for (; n >= WORD; n -= WORD, d += WORD, s += WORD)
			*(word_t *)d = *(const word_t *)s;
	}
	while (n--)
		*d++ = *s++;
	return dst;
}

void *memmove(void *dst, const void *src, size_t n)
{
	unsigned char *d = dst;
	const unsigned char *s = src;

	if (d <= s || d >= s + n)
		return memcpy(dst, src, n);
	while (n--)	/* overlapping, destination above the source: copy from the end */
		d[n] = s[n];
	return dst;
}

void *memset(void *dst, int c, size_t n)
{
	unsigned char *d = dst;
	word_t pattern = (unsigned char)c;

	pattern |= pattern << 8;
	pattern |= pattern << 16;
	if (WORD == 8)
		pattern |= pattern << 16 << 16;
	while (n && !ALIGNED(d)) {
		*d++ = (unsigned char)c;
		n--;
	}
	for (; n >= WORD; n -= WORD, d += WORD)
		*(word_t *)d = pattern;
	while (n--)
		*d++ = (unsigned char)c;
	return dst;
}

int memcmp(const void *a, const void *b, size_t n)
{
	const unsigned char *x = a, *y = b;

	for (; n; n--, x++, y++)
		if (*x != *y)
			return *x < *y ? -1 : 1;
	return 0;
}

size_t strlen(const char *s)
{
	size_t n = 0;

	while (s[n])
		n++;
	return n;
}
