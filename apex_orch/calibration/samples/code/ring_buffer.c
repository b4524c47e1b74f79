/*
 * A fixed-capacity ring buffer of bytes for a single producer and a single
 * consumer, e.g. a UART interrupt handler filling it and the main loop draining it.
 * Capacity must be a power of two so indices wrap with a mask instead of a modulo.
 */
#include <assert.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

typedef struct {
    uint8_t *data;
    size_t capacity;          /* power of two */
    volatile size_t head;     /* next write position (producer only) */
    volatile size_t tail;     /* next read position (consumer only) */
} ring_t;

static bool is_power_of_two(size_t n) { return n != 0 && (n & (n - 1)) == 0; }

int ring_init(ring_t *r, uint8_t *storage, size_t capacity) {
    if (!is_power_of_two(capacity)) {
        return -1;
    }
    r->data = storage;
    r->capacity = capacity;
    r->head = r->tail = 0;
    return 0;
}

/* head and tail run freely; their difference is the fill level even after wrap-around. */
size_t ring_used(const ring_t *r) { return r->head - r->tail; }
size_t ring_free(const ring_t *r) { return r->capacity - ring_used(r); }
bool ring_empty(const ring_t *r) { return r->head == r->tail; }

bool ring_push(ring_t *r, uint8_t byte) {
    if (ring_free(r) == 0) {
        return false; /* full: caller decides whether to drop or wait */
    }
    r->data[r->head & (r->capacity - 1)] = byte;
    r->head++;
    return true;
}

bool ring_pop(ring_t *r, uint8_t *out) {
    if (ring_empty(r)) {
        return false;
    }
    *out = r->data[r->tail & (r->capacity - 1)];
    r->tail++;
    return true;
}

/* Copy up to n bytes out in at most two memcpy calls (before and after the wrap point). */
size_t ring_read(ring_t *r, uint8_t *dst, size_t n) {
    size_t avail = ring_used(r);
    if (n > avail) {
        n = avail;
    }
    size_t start = r->tail & (r->capacity - 1);
    size_t first = r->capacity - start;
    if (first > n) {
        first = n;
    }
    memcpy(dst, r->data + start, first);
    memcpy(dst + first, r->data, n - first);
    r->tail += n;
    return n;
}

size_t ring_write(ring_t *r, const uint8_t *src, size_t n) {
    size_t space = ring_free(r);
    if (n > space) {
        n = space;
    }
    size_t start = r->head & (r->capacity - 1);
    size_t first = r->capacity - start;
    if (first > n) {
        first = n;
    }
    memcpy(r->data + start, src, first);
    memcpy(r->data, src + first, n - first);
    r->head += n;
    return n;
}

int main(void) {
    uint8_t storage[8];
    ring_t r;
    assert(ring_init(&r, storage, sizeof storage) == 0);
    assert(ring_init(&r, storage, 6) == -1);
    ring_init(&r, storage, sizeof storage);

    const uint8_t msg[] = "hello, ring";
    size_t wrote = ring_write(&r, msg, sizeof msg - 1);
    assert(wrote == 8);                 /* only 8 fit */
    assert(!ring_push(&r, 'x'));        /* full */

    uint8_t out[16] = {0};
    assert(ring_read(&r, out, 5) == 5); /* "hello" */
    assert(memcmp(out, "hello", 5) == 0);

    wrote = ring_write(&r, msg + 8, 3); /* "ing" wraps around the end */
    assert(wrote == 3);
    memset(out, 0, sizeof out);
    size_t got = ring_read(&r, out, sizeof out);
    printf("read %zu bytes: %.*s\n", got, (int)got, out);  /* ", ring" */
    assert(got == 6 && memcmp(out, ", ring", 6) == 0);
    assert(ring_empty(&r));
    return 0;
}
