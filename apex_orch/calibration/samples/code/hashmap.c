/* Open-addressing hash map from strings to ints, with linear probing,
 * tombstones for deletion, and growth at 70% load. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    char *key;      /* NULL: empty slot */
    int value;
    int deleted;    /* tombstone: keeps probe chains intact after removal */
} slot_t;

typedef struct {
    slot_t *slots;
    size_t capacity;
    size_t count;     /* live entries */
    size_t used;      /* live + tombstones */
} map_t;

/* FNV-1a: small, fast, good enough for a demo. */
static uint64_t hash_str(const char *s) {
    uint64_t h = 1469598103934665603ULL;
    while (*s) {
        h ^= (unsigned char)*s++;
        h *= 1099511628211ULL;
    }
    return h;
}

static int map_init(map_t *m, size_t capacity) {
    m->slots = calloc(capacity, sizeof(slot_t));
    if (!m->slots) return -1;
    m->capacity = capacity;
    m->count = m->used = 0;
    return 0;
}

static slot_t *find_slot(slot_t *slots, size_t capacity, const char *key, int for_insert) {
    size_t i = hash_str(key) & (capacity - 1);
    slot_t *first_tombstone = NULL;
    for (;;) {
        slot_t *s = &slots[i];
        if (s->key == NULL) {
            if (s->deleted) {
                if (!first_tombstone) first_tombstone = s;
            } else {
                return (for_insert && first_tombstone) ? first_tombstone : (for_insert ? s : NULL);
            }
        } else if (strcmp(s->key, key) == 0) {
            return s;
        }
        i = (i + 1) & (capacity - 1);
    }
}

static int map_grow(map_t *m) {
    size_t new_cap = m->capacity * 2;
    slot_t *fresh = calloc(new_cap, sizeof(slot_t));
    if (!fresh) return -1;
    for (size_t i = 0; i < m->capacity; i++) {
        if (m->slots[i].key) {
            slot_t *dst = find_slot(fresh, new_cap, m->slots[i].key, 1);
            *dst = m->slots[i];
        }
    }
    free(m->slots);
    m->slots = fresh;
    m->capacity = new_cap;
    m->used = m->count;   /* tombstones are gone after rehashing */
    return 0;
}

int map_put(map_t *m, const char *key, int value) {
    if ((m->used + 1) * 10 > m->capacity * 7 && map_grow(m) != 0) return -1;
    slot_t *s = find_slot(m->slots, m->capacity, key, 1);
    if (s->key) {             /* existing key: overwrite */
        s->value = value;
        return 0;
    }
    s->key = strdup(key);
    if (!s->key) return -1;
    s->value = value;
    if (!s->deleted) m->used++;
    s->deleted = 0;
    m->count++;
    return 0;
}

int *map_get(map_t *m, const char *key) {
    slot_t *s = find_slot(m->slots, m->capacity, key, 0);
    return s ? &s->value : NULL;
}

int map_remove(map_t *m, const char *key) {
    slot_t *s = find_slot(m->slots, m->capacity, key, 0);
    if (!s) return 0;
    free(s->key);
    s->key = NULL;
    s->deleted = 1;
    m->count--;
    return 1;
}

void map_free(map_t *m) {
    for (size_t i = 0; i < m->capacity; i++) free(m->slots[i].key);
    free(m->slots);
    m->slots = NULL;
    m->capacity = m->count = m->used = 0;
}

int main(void) {
    map_t m;
    if (map_init(&m, 8) != 0) return 1;
    const char *words[] = {"apple", "banana", "cherry", "apple", "date", "banana", "apple",
                           "elderberry", "fig", "grape", "honeydew"};
    for (size_t i = 0; i < sizeof words / sizeof *words; i++) {
        int *n = map_get(&m, words[i]);
        map_put(&m, words[i], n ? *n + 1 : 1);
    }
    map_remove(&m, "date");
    printf("apple=%d banana=%d date=%s capacity=%zu count=%zu\n",
           *map_get(&m, "apple"), *map_get(&m, "banana"),
           map_get(&m, "date") ? "present" : "absent", m.capacity, m.count);
    map_free(&m);
    return 0;
}
