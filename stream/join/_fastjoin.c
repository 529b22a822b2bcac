/* The join core's compiled fast path (docs/joiner.md, "Round 14" and "Round 15").
 *
 * Exact twins of the Python they stand in for, each of which either gives what the Python core
 * gives for its input or *declines* (None) so that the caller runs the Python core - the rules
 * live in stream/join/funnel.py and this file only repeats its common path;
 * tests/unit/test_fastjoin.py compares each with the Python on random inputs:
 *
 * - DueIndex: stream.join.store.DueIndex (a heap per lane with lazy deletion, plus each key's
 *   dues), same methods and results - pop_due hands back keys in (due, key) order.
 * - sweep_states: the time-driven work of stream.join.funnel.sweep for the usual state (version-4
 *   bytes, impression seen, nothing held), with its samples' bytes (sample_bytes / sample_binary)
 *   and its next dues (next_dues). Declines a stub, held events, another codec version, an id or
 *   bank that JSON would escape, features with an escape.
 * - parse_records: records in the contract's compact form read straight from their bytes
 *   (declines anything else, which the strict decoders read with their reasons).
 * - advance_impression: an impression on no state, or on the stub of its events read ahead of it
 *   (held clicks and later steps applied in order): its state, dues and samples. Declines any
 *   rejection, an event left held, one past the retention.
 * - advance_step: a step's event on no state or a stub (held), or on the usual state (a duplicate,
 *   or the next step in order with its samples). Declines the rest.
 * - gather: FunnelJoin._gather (on_batch's pass over the records: ids, times, the future check,
 *   the lanes asked of the Python watermark, the groups); advance_groups: advance_impression /
 *   advance_step over a partition's groups, the samples appended as outputs; sweep_out:
 *   sweep_states with FunnelJoin.sweep's handling of its results (docs/joiner.md, "Round 20").
 * - murmur2: Kafka's partitioner hash.
 * - store_put_many / store_lookup: FaustTableStore's loops over a batch's keys (its writes, and
 *   its reads of what is still in memory).
 *
 * No Python object is built per state beyond the results handed back.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define LANES 5
#define NONE_T (-1)                /* funnel.NONE: step not reached */
#define NO_DUE INT64_MIN          /* a lane with no due time (None in Python) */
#define MAX_TIME (INT64_C(1) << 53) /* events.MAX_EVENT_TIME_MS; windows and lanes are bounded too */

/* ------------------------------------------------------------------------------------------ */
/* DueIndex                                                                                     */

typedef struct {
    int64_t due;
    PyObject *key; /* bytes, owned */
} Entry;

typedef struct {
    Entry *a;
    Py_ssize_t n, cap;
} Heap;

typedef struct {
    PyObject_HEAD
    Heap heaps[LANES];
    PyObject *dues; /* dict: key -> bytearray of LANES int64 (NO_DUE: none) */
} DueIndexObject;

static int entry_lt(const Entry *x, const Entry *y) {
    if (x->due != y->due) return x->due < y->due;
    Py_ssize_t nx = PyBytes_GET_SIZE(x->key), ny = PyBytes_GET_SIZE(y->key);
    int c = memcmp(PyBytes_AS_STRING(x->key), PyBytes_AS_STRING(y->key), nx < ny ? nx : ny);
    if (c) return c < 0;
    return nx < ny;
}

static void sift_down(Heap *h, Py_ssize_t i) {
    Entry e = h->a[i];
    for (;;) {
        Py_ssize_t l = 2 * i + 1, m = i;
        const Entry *best = &e;
        if (l < h->n && entry_lt(&h->a[l], best)) { m = l; best = &h->a[l]; }
        if (l + 1 < h->n && entry_lt(&h->a[l + 1], best)) { m = l + 1; }
        if (m == i) break;
        h->a[i] = h->a[m];
        i = m;
    }
    h->a[i] = e;
}

static void sift_up(Heap *h, Py_ssize_t i) {
    Entry e = h->a[i];
    while (i > 0) {
        Py_ssize_t p = (i - 1) / 2;
        if (!entry_lt(&e, &h->a[p])) break;
        h->a[i] = h->a[p];
        i = p;
    }
    h->a[i] = e;
}

static int heap_push(Heap *h, int64_t due, PyObject *key) {
    if (h->n == h->cap) {
        Py_ssize_t cap = h->cap ? h->cap * 2 : 64;
        Entry *a = PyMem_Realloc(h->a, (size_t)cap * sizeof(Entry));
        if (!a) { PyErr_NoMemory(); return -1; }
        h->a = a;
        h->cap = cap;
    }
    Py_INCREF(key);
    h->a[h->n].due = due;
    h->a[h->n].key = key;
    sift_up(h, h->n++);
    return 0;
}

static void heap_clear(Heap *h) {
    for (Py_ssize_t i = 0; i < h->n; i++) Py_DECREF(h->a[i].key);
    h->n = 0;
}

static int64_t *dues_of(PyObject *ba) { return (int64_t *)PyByteArray_AS_STRING(ba); }

static int dues_empty(const int64_t *d) {
    for (int i = 0; i < LANES; i++)
        if (d[i] != NO_DUE) return 0;
    return 1;
}

/* dues (a 5-tuple of int | None, or None) into d; -1 with an exception set if malformed */
static int read_dues(PyObject *obj, int64_t *d) {
    if (obj == Py_None) {
        for (int i = 0; i < LANES; i++) d[i] = NO_DUE;
        return 0;
    }
    if (!PyTuple_Check(obj) || PyTuple_GET_SIZE(obj) != LANES) {
        PyErr_SetString(PyExc_TypeError, "dues: a tuple of 5 (int or None), or None");
        return -1;
    }
    for (int i = 0; i < LANES; i++) {
        PyObject *v = PyTuple_GET_ITEM(obj, i);
        if (v == Py_None) { d[i] = NO_DUE; continue; }
        long long x = PyLong_AsLongLong(v);
        if (x == -1 && PyErr_Occurred()) return -1;
        if (x == (long long)NO_DUE) {
            PyErr_SetString(PyExc_OverflowError, "dues: a due time out of range");
            return -1;
        }
        d[i] = x;
    }
    return 0;
}

static PyObject *dues_tuple(const int64_t *d) {
    PyObject *t = PyTuple_New(LANES);
    if (!t) return NULL;
    for (int i = 0; i < LANES; i++) {
        PyObject *v;
        if (d[i] == NO_DUE) { v = Py_None; Py_INCREF(v); }
        else if (!(v = PyLong_FromLongLong(d[i]))) { Py_DECREF(t); return NULL; }
        PyTuple_SET_ITEM(t, i, v);
    }
    return t;
}

static void compact(DueIndexObject *self, int lane) {
    Heap *h = &self->heaps[lane];
    heap_clear(h);
    PyObject *key, *val;
    Py_ssize_t pos = 0;
    while (PyDict_Next(self->dues, &pos, &key, &val)) {
        int64_t due = dues_of(val)[lane];
        if (due == NO_DUE) continue;
        /* room is there: the heap held more entries than the dict has keys */
        Py_INCREF(key);
        h->a[h->n].due = due;
        h->a[h->n].key = key;
        h->n++;
    }
    for (Py_ssize_t i = h->n / 2 - 1; i >= 0; i--) sift_down(h, i);
}

static int index_set(DueIndexObject *self, PyObject *key, const int64_t *d) {
    if (!PyBytes_CheckExact(key)) {
        PyErr_SetString(PyExc_TypeError, "DueIndex keys are bytes");
        return -1;
    }
    PyObject *old = PyDict_GetItemWithError(self->dues, key); /* borrowed */
    if (!old && PyErr_Occurred()) return -1;
    if (dues_empty(d)) {
        if (old && PyDict_DelItem(self->dues, key) < 0) return -1;
        return 0;
    }
    int64_t prev[LANES];
    if (old) {
        memcpy(prev, dues_of(old), sizeof prev);
        if (!memcmp(prev, d, sizeof prev)) return 0;
        memcpy(dues_of(old), d, sizeof prev);
    } else {
        for (int i = 0; i < LANES; i++) prev[i] = NO_DUE;
        PyObject *ba = PyByteArray_FromStringAndSize((const char *)d, sizeof prev);
        if (!ba) return -1;
        int rc = PyDict_SetItem(self->dues, key, ba);
        Py_DECREF(ba);
        if (rc < 0) return -1;
    }
    for (int lane = 0; lane < LANES; lane++) {
        if (d[lane] == NO_DUE || prev[lane] == d[lane]) continue;
        Heap *h = &self->heaps[lane];
        if (heap_push(h, d[lane], key) < 0) return -1;
        if (h->n > 4 * PyDict_GET_SIZE(self->dues) + 1024) compact(self, lane);
    }
    return 0;
}

static PyObject *DueIndex_set(DueIndexObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "set(key, dues)");
        return NULL;
    }
    int64_t d[LANES];
    if (read_dues(args[1], d) < 0 || index_set(self, args[0], d) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *DueIndex_pop_due(DueIndexObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "pop_due(lane, until_ms)");
        return NULL;
    }
    long lane = PyLong_AsLong(args[0]);
    if (lane == -1 && PyErr_Occurred()) return NULL;
    if (lane < 0 || lane >= LANES) {
        PyErr_SetString(PyExc_IndexError, "lane out of range");
        return NULL;
    }
    long long until = PyLong_AsLongLong(args[1]);
    if (until == -1 && PyErr_Occurred()) return NULL;
    PyObject *out = PyList_New(0);
    if (!out) return NULL;
    Heap *h = &self->heaps[lane];
    while (h->n && h->a[0].due <= until) {
        Entry e = h->a[0];
        h->a[0] = h->a[--h->n];
        if (h->n) sift_down(h, 0);
        PyObject *cur = PyDict_GetItemWithError(self->dues, e.key);
        int err = 0;
        if (cur) {
            int64_t *d = dues_of(cur);
            if (d[lane] == e.due) {
                d[lane] = NO_DUE;
                if (dues_empty(d)) err = PyDict_DelItem(self->dues, e.key) < 0;
                if (!err) err = PyList_Append(out, e.key) < 0;
            }
        } else if (PyErr_Occurred()) {
            err = 1;
        }
        Py_DECREF(e.key);
        if (err) {
            Py_DECREF(out);
            return NULL;
        }
    }
    return out;
}

static Py_ssize_t DueIndex_len(DueIndexObject *self) { return PyDict_GET_SIZE(self->dues); }

static PyObject *DueIndex_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    if (PyTuple_GET_SIZE(args) || (kwds && PyDict_GET_SIZE(kwds))) {
        PyErr_SetString(PyExc_TypeError, "DueIndex() takes no arguments");
        return NULL;
    }
    DueIndexObject *self = (DueIndexObject *)type->tp_alloc(type, 0);
    if (!self) return NULL;
    self->dues = PyDict_New();
    if (!self->dues) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static void DueIndex_dealloc(DueIndexObject *self) {
    for (int i = 0; i < LANES; i++) {
        heap_clear(&self->heaps[i]);
        PyMem_Free(self->heaps[i].a);
    }
    Py_XDECREF(self->dues);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef DueIndex_methods[] = {
    {"set", (PyCFunction)(void (*)(void))DueIndex_set, METH_FASTCALL,
     "set(key, dues): (re)schedule key on every lane (None or all-None dues: unschedule)"},
    {"pop_due", (PyCFunction)(void (*)(void))DueIndex_pop_due, METH_FASTCALL,
     "pop_due(lane, until_ms): keys due on lane by until_ms, in (due, key) order, removed from that lane"},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods DueIndex_as_sequence = {.sq_length = (lenfunc)DueIndex_len};

static PyTypeObject DueIndexType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "stream.join._fastjoin.DueIndex",
    .tp_doc = "An in-memory due-time index: a heap per lane with lazy deletion plus each key's dues "
              "(stream.join.store.DueIndex in C).",
    .tp_basicsize = sizeof(DueIndexObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = DueIndex_new,
    .tp_dealloc = (destructor)DueIndex_dealloc,
    .tp_methods = DueIndex_methods,
    .tp_as_sequence = &DueIndex_as_sequence,
};

/* ------------------------------------------------------------------------------------------ */
/* the funnel's common path                                                                    */

typedef struct {
    int64_t w[4];
    int64_t grace, observe, retention, skew;
    int early;
} Cfg;

typedef struct {
    int64_t imp, t[4];
    const char *bank;
    Py_ssize_t bank_len;
    const char *feats;
    Py_ssize_t feats_len;
} State;

static int read_i64s(PyObject *tup, int64_t *out, Py_ssize_t n, const char *what) {
    if (!PyTuple_Check(tup) || PyTuple_GET_SIZE(tup) != n) {
        PyErr_Format(PyExc_TypeError, "%s: a tuple of %zd ints", what, n);
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        long long x = PyLong_AsLongLong(PyTuple_GET_ITEM(tup, i));
        if (x == -1 && PyErr_Occurred()) return -1;
        out[i] = x;
    }
    return 0;
}

/* cfg: (w0, w1, w2, w3, grace, observe, retention, skew, early) */
static int read_cfg(PyObject *tup, Cfg *c) {
    int64_t v[9];
    if (read_i64s(tup, v, 9, "cfg") < 0) return -1;
    for (int i = 0; i < 8; i++)
        if (v[i] < 0 || v[i] > MAX_TIME) {
            PyErr_SetString(PyExc_ValueError, "cfg: windows and periods in [0, 2**53] ms");
            return -1;
        }
    memcpy(c->w, v, sizeof c->w);
    c->grace = v[4];
    c->observe = v[5];
    c->retention = v[6];
    c->skew = v[7];
    c->early = v[8] != 0;
    return 0;
}

static uint64_t be64(const unsigned char *p) {
    uint64_t x = 0;
    for (int i = 0; i < 8; i++) x = x << 8 | p[i];
    return x;
}

/* printable ASCII with nothing JSON escapes: quoted as is by encode_basestring_ascii */
static int plain_text(const char *s, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c < 0x20 || c > 0x7e || c == '"' || c == '\\') return 0;
    }
    return 1;
}

#define HEAD_SIZE 48

/* a version-4 state with the impression seen, nothing held, features present, a plain bank id;
   0 to decline (the Python core decides, and words any error) */
static int read_state(const char *data, Py_ssize_t n, State *s) {
    const unsigned char *p = (const unsigned char *)data;
    if (n < HEAD_SIZE || p[0] != 4) return 0;
    s->imp = (int64_t)be64(p + 1);
    for (int k = 0; k < 4; k++) s->t[k] = (int64_t)be64(p + 9 + 8 * k);
    unsigned n_held = p[41];
    Py_ssize_t n_bank = (Py_ssize_t)p[42] << 8 | p[43];
    uint32_t n_feats = (uint32_t)p[44] << 24 | (uint32_t)p[45] << 16 | (uint32_t)p[46] << 8 | p[47];
    if (n_held || s->imp == NONE_T || n_feats == 0xFFFFFFFFu || n_feats == 0) return 0;
    /* event times as the event contract bounds them (no sum below can overflow) */
    if (s->imp < 0 || s->imp >= MAX_TIME) return 0;
    for (int k = 0; k < 4; k++)
        if (s->t[k] != NONE_T && (s->t[k] < 0 || s->t[k] >= MAX_TIME)) return 0;
    if (HEAD_SIZE + n_bank + (Py_ssize_t)n_feats != n) return 0;
    s->bank = data + HEAD_SIZE;
    s->bank_len = n_bank;
    s->feats = s->bank + n_bank;
    s->feats_len = (Py_ssize_t)n_feats;
    if (!plain_text(s->bank, n_bank)) return 0;
    /* steps count only in order: a time after a missing one is not a state the core writes */
    int gap = 0;
    for (int k = 0; k < 4; k++) {
        if (s->t[k] == NONE_T) gap = 1;
        else if (gap) return 0;
    }
    return 1;
}

typedef struct {
    const char *p;
    Py_ssize_t n;
} Slice;

#define HELD_HEAD 23 /* a held event's head: step, time, lane, id length, raw length */

typedef struct {
    int step;
    int64_t t, lane;
} HeldEv;

static int ascii_text(const char *s, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++)
        if ((unsigned char)s[i] > 0x7f) return 0;
    return 1;
}

static void put_be(unsigned char *q, uint64_t v, int n) {
    for (int i = 0; i < n; i++) q[i] = (unsigned char)(v >> (8 * (n - 1 - i)));
}

/* a version-4 stub as the Python core writes it (impression not seen, no features, one to four
   held events of distinct steps with times in the event contract's range, ASCII text: so the
   Python codec's decode and encode give these bytes back); 0 to decline */
static int read_stub(const char *data, Py_ssize_t n, HeldEv *held, int *n_held) {
    const unsigned char *p = (const unsigned char *)data;
    if (n < HEAD_SIZE || p[0] != 4) return 0;
    for (int k = 0; k < 5; k++)
        if ((int64_t)be64(p + 1 + 8 * k) != NONE_T) return 0;
    int nh = p[41];
    Py_ssize_t n_bank = (Py_ssize_t)p[42] << 8 | p[43];
    uint32_t n_feats = (uint32_t)p[44] << 24 | (uint32_t)p[45] << 16 | (uint32_t)p[46] << 8 | p[47];
    if (nh < 1 || nh > 4 || n_feats != 0xFFFFFFFFu || n_bank > n - HEAD_SIZE || !ascii_text(data + HEAD_SIZE, n_bank))
        return 0;
    Py_ssize_t pos = HEAD_SIZE + n_bank;
    unsigned steps = 0;
    for (int i = 0; i < nh; i++) {
        if (HELD_HEAD > n - pos) return 0;
        const unsigned char *h = p + pos;
        int step = h[0];
        int64_t t = (int64_t)be64(h + 1);
        Py_ssize_t n_id = (Py_ssize_t)h[17] << 8 | h[18];
        Py_ssize_t n_raw = (Py_ssize_t)((uint32_t)h[19] << 24 | (uint32_t)h[20] << 16 | (uint32_t)h[21] << 8 | h[22]);
        if (step < 1 || step > 4 || steps & (1u << step) || t < 0 || t >= MAX_TIME) return 0;
        pos += HELD_HEAD;
        if (n_id > n - pos || !ascii_text(data + pos, n_id)) return 0;
        pos += n_id;
        if (n_raw > n - pos) return 0;
        pos += n_raw;
        steps |= 1u << step;
        held[i].step = step;
        held[i].t = t;
        held[i].lane = (int64_t)be64(h + 9);
    }
    *n_held = nh;
    return pos == n;
}

/* a held event's 23-byte head, its id and raw record at q (state_codec's layout) */
static void put_held(unsigned char *q, int step, int64_t t, int64_t lane, const Slice *eid, PyObject *raw) {
    Py_ssize_t n_raw = PyBytes_GET_SIZE(raw);
    q[0] = (unsigned char)step;
    put_be(q + 1, (uint64_t)t, 8);
    put_be(q + 9, (uint64_t)lane, 8);
    put_be(q + 17, (uint64_t)eid->n, 2);
    put_be(q + 19, (uint64_t)n_raw, 4);
    memcpy(q + HELD_HEAD, eid->p, (size_t)eid->n);
    memcpy(q + HELD_HEAD + eid->n, PyBytes_AS_STRING(raw), (size_t)n_raw);
}

static int reached(const State *s) {
    for (int k = 0; k < 4; k++)
        if (s->t[k] == NONE_T) return k;
    return 4;
}

static int64_t step_time(const State *s, int step) { return step == 0 ? s->imp : s->t[step - 1]; }

/* funnel._lane_and_final */
static void lane_and_final(const State *s, const Cfg *c, int *lane, int64_t *fa) {
    int r = reached(s);
    if (r == 4) { *lane = 0; *fa = s->t[3]; return; }
    *lane = r + 1;
    *fa = step_time(s, r) + c->w[r];
}

/* funnel.mature */
static void mature(const State *s, const int64_t *swept, const Cfg *c, int *out) {
    int settled = 0;
    for (int k = 0; k < 4; k++) {
        if (s->t[k] != NONE_T || settled) { out[k] = 1; continue; }
        int64_t pred = step_time(s, k);
        settled = pred != NONE_T && pred + c->w[k] <= swept[k + 1];
        out[k] = settled;
    }
}

/* funnel.next_dues of a non-stub state with nothing held */
static void next_dues(const State *s, const int64_t *swept, const Cfg *c, int64_t *d) {
    int lane;
    int64_t fa;
    lane_and_final(s, c, &lane, &fa);
    for (int i = 0; i < LANES; i++) d[i] = NO_DUE;
    if (lane == 0) { d[0] = fa + c->retention; return; }
    if (swept[lane] >= fa) { d[lane] = fa + c->retention; return; }
    d[lane] = fa;
    if (c->early) {
        int64_t fd = s->imp + c->observe;
        if (swept[0] < fd && fd < fa) d[0] = fd;
    }
}

/* --- sample bytes ------------------------------------------------------------------------- */

typedef struct {
    char *p;
    Py_ssize_t n, cap;
} Buf;

static int buf_room(Buf *b, Py_ssize_t more) {
    if (b->n + more <= b->cap) return 0;
    Py_ssize_t cap = b->cap ? b->cap : 512;
    while (cap < b->n + more) cap *= 2;
    char *p = PyMem_Realloc(b->p, (size_t)cap);
    if (!p) { PyErr_NoMemory(); return -1; }
    b->p = p;
    b->cap = cap;
    return 0;
}

static int buf_put(Buf *b, const void *s, Py_ssize_t n) {
    if (buf_room(b, n) < 0) return -1;
    memcpy(b->p + b->n, s, (size_t)n);
    b->n += n;
    return 0;
}

static int buf_str(Buf *b, const char *s) { return buf_put(b, s, (Py_ssize_t)strlen(s)); }

static int buf_int(Buf *b, int64_t v) {
    char tmp[24];
    int n = snprintf(tmp, sizeof tmp, "%lld", (long long)v);
    return buf_put(b, tmp, n);
}

static int buf_byte(Buf *b, unsigned char c) { return buf_put(b, &c, 1); }

static int buf_be(Buf *b, uint64_t v, int n) {
    unsigned char tmp[8];
    for (int i = 0; i < n; i++) tmp[i] = (unsigned char)(v >> (8 * (n - 1 - i)));
    return buf_put(b, tmp, n);
}

/* MessagePack integers as msgspec writes them: the smallest form */
static int mp_int(Buf *b, int64_t v) {
    if (v >= 0) {
        if (v < 128) return buf_byte(b, (unsigned char)v) != 0;
        if (v <= 0xff) return buf_byte(b, 0xcc) || buf_be(b, (uint64_t)v, 1);
        if (v <= 0xffff) return buf_byte(b, 0xcd) || buf_be(b, (uint64_t)v, 2);
        if (v <= 0xffffffffLL) return buf_byte(b, 0xce) || buf_be(b, (uint64_t)v, 4);
        return buf_byte(b, 0xcf) || buf_be(b, (uint64_t)v, 8);
    }
    if (v >= -32) return buf_byte(b, (unsigned char)(v & 0xff)) != 0;
    if (v >= -128) return buf_byte(b, 0xd0) || buf_be(b, (uint64_t)v, 1);
    if (v >= -32768) return buf_byte(b, 0xd1) || buf_be(b, (uint64_t)v, 2);
    if (v >= -2147483648LL) return buf_byte(b, 0xd2) || buf_be(b, (uint64_t)v, 4);
    return buf_byte(b, 0xd3) || buf_be(b, (uint64_t)v, 8);
}

static int mp_str(Buf *b, const char *s, Py_ssize_t n) {
    int rc;
    if (n < 32) rc = buf_byte(b, (unsigned char)(0xa0 | n));
    else if (n <= 0xff) rc = buf_byte(b, 0xd9) || buf_be(b, (uint64_t)n, 1);
    else if (n <= 0xffff) rc = buf_byte(b, 0xda) || buf_be(b, (uint64_t)n, 2);
    else rc = buf_byte(b, 0xdb) || buf_be(b, (uint64_t)n, 4);
    return rc || buf_put(b, s, n);
}

static int mp_array(Buf *b, Py_ssize_t n) {
    if (n < 16) return buf_byte(b, (unsigned char)(0x90 | n)) != 0;
    if (n <= 0xffff) return buf_byte(b, 0xdc) || buf_be(b, (uint64_t)n, 2);
    return buf_byte(b, 0xdd) || buf_be(b, (uint64_t)n, 4);
}

/* The names and values of compact, escape-free feature JSON ({"k":"v",...}) as two MessagePack
   arrays of strings; 0 when the text is anything else (the Python writer decides), -1 on error. */
static int mp_features(Buf *names, Buf *values, const char *s, Py_ssize_t n) {
    Py_ssize_t count = 0, i = 1;
    if (n < 2 || s[0] != '{' || s[n - 1] != '}') return 0;
    /* first pass: count and check the shape */
    if (n == 2) return mp_array(names, 0) || mp_array(values, 0) ? -1 : 1;
    for (;;) {
        for (int part = 0; part < 2; part++) {
            if (i >= n || s[i] != '"') return 0;
            Py_ssize_t j = i + 1;
            while (j < n && s[j] != '"') {
                unsigned char c = (unsigned char)s[j];
                if (c == '\\' || c < 0x20 || c > 0x7e) return 0;
                j++;
            }
            if (j >= n) return 0;
            i = j + 1;
            if (part == 0) {
                if (i >= n || s[i] != ':') return 0;
                i++;
            }
        }
        count++;
        if (i >= n) return 0;
        if (s[i] == '}') {
            if (i != n - 1) return 0;
            break;
        }
        if (s[i] != ',') return 0;
        i++;
    }
    if (mp_array(names, count) || mp_array(values, count)) return -1;
    i = 1;
    for (Py_ssize_t k = 0; k < count; k++) {
        for (int part = 0; part < 2; part++) {
            Py_ssize_t j = i + 1;
            while (s[j] != '"') j++;
            if (mp_str(part ? values : names, s + i + 1, j - i - 1)) return -1;
            i = j + 2; /* past the closing quote and the ':' or ',' */
        }
    }
    return 1;
}

static const char *const KIND_NAMES[3] = {"first", "correction", "final"};

typedef struct {
    int encoding; /* 0 json, 1 msgpack */
    const char *policy;
    Py_ssize_t policy_len;
    Buf names, values; /* the current state's features as MessagePack arrays */
    int features_ready;
} Writer;

/* sample_bytes / sample_binary; 0 declined, -1 error, else 1 with the bytes in *out */
static int write_sample(Writer *w, Buf *b, const char *iid, Py_ssize_t iid_len, const State *s, int kind,
                        int seq, const int *labels, const int *ripe, int64_t elapsed, int64_t wm, PyObject **out) {
    b->n = 0;
    int rc = 0;
    if (w->encoding == 0) {
        rc |= buf_str(b, "{\"schema_version\":1,\"impression_id\":\"");
        rc |= buf_put(b, iid, iid_len);
        rc |= buf_str(b, "\",\"bank_id\":\"");
        rc |= buf_put(b, s->bank, s->bank_len);
        rc |= buf_str(b, "\",\"event_time_ms\":");
        rc |= buf_int(b, s->imp);
        rc |= buf_str(b, ",\"features\":");
        rc |= buf_put(b, s->feats, s->feats_len);
        rc |= buf_str(b, ",\"labels\":[");
        for (int k = 0; k < 4; k++) rc |= buf_str(b, k ? (labels[k] ? ",1" : ",0") : (labels[k] ? "1" : "0"));
        rc |= buf_str(b, "],\"mature\":[");
        for (int k = 0; k < 4; k++) rc |= buf_str(b, k ? (ripe[k] ? ",true" : ",false") : (ripe[k] ? "true" : "false"));
        rc |= buf_str(b, "],\"kind\":\"");
        rc |= buf_str(b, KIND_NAMES[kind]);
        rc |= buf_str(b, "\",\"elapsed_ms\":");
        rc |= buf_int(b, elapsed);
        rc |= buf_str(b, ",\"seq\":");
        rc |= buf_int(b, seq);
        rc |= buf_str(b, ",\"watermark_ms\":");
        rc |= buf_int(b, wm);
        rc |= buf_str(b, ",\"policy\":\"");
        rc |= buf_put(b, w->policy, w->policy_len);
        rc |= buf_str(b, "\"}");
    } else {
        if (!w->features_ready) {
            w->names.n = w->values.n = 0;
            int f = mp_features(&w->names, &w->values, s->feats, s->feats_len);
            if (f <= 0) return f;
            w->features_ready = 1;
        }
        int flags = 0;
        for (int k = 0; k < 4; k++) flags |= (labels[k] ? 1 : 0) << k | (ripe[k] ? 1 : 0) << (k + 4);
        rc |= buf_byte(b, 0x9c);
        rc |= mp_int(b, 2);
        rc |= mp_str(b, iid, iid_len);
        rc |= mp_str(b, s->bank, s->bank_len);
        rc |= mp_int(b, s->imp);
        rc |= buf_put(b, w->names.p, w->names.n);
        rc |= buf_put(b, w->values.p, w->values.n);
        rc |= mp_int(b, flags);
        rc |= mp_int(b, kind);
        rc |= mp_int(b, elapsed);
        rc |= mp_int(b, seq);
        rc |= mp_int(b, wm);
        rc |= mp_str(b, w->policy, w->policy_len);
    }
    if (rc) return -1;
    *out = PyBytes_FromStringAndSize(b->p, b->n);
    return *out ? 1 : -1;
}

/* one sample as (kind, elapsed_ms, value) appended to samples */
static int add_sample(Writer *w, Buf *b, PyObject *samples, const char *iid, Py_ssize_t iid_len, const State *s,
                      int kind, int seq, int64_t at_ms, int64_t wm, const int64_t *swept, const Cfg *c) {
    int labels[4], ripe[4];
    for (int k = 0; k < 4; k++) labels[k] = s->t[k] != NONE_T;
    if (kind == 2) for (int k = 0; k < 4; k++) ripe[k] = 1;
    else mature(s, swept, c, ripe);
    int64_t elapsed = at_ms - s->imp;
    if (elapsed < 0) elapsed = 0;
    PyObject *value = NULL;
    int rc = write_sample(w, b, iid, iid_len, s, kind, seq, labels, ripe, elapsed, wm, &value);
    if (rc <= 0) return rc;
    PyObject *item = Py_BuildValue("(iLN)", kind, (long long)elapsed, value);
    if (!item) return -1;
    rc = PyList_Append(samples, item);
    Py_DECREF(item);
    return rc < 0 ? -1 : 1;
}

/* funnel.sweep of one usual state, then what FunnelJoin.sweep does with its result: None to
   decline, else (purge, dues, samples) */
static PyObject *sweep_one(Writer *w, Buf *b, PyObject *key, PyObject *old, const int64_t *prev,
                           const int64_t *now, const Cfg *c) {
    State s;
    if (!PyBytes_CheckExact(key) || !PyBytes_CheckExact(old)) Py_RETURN_NONE;
    const char *iid = PyBytes_AS_STRING(key);
    Py_ssize_t iid_len = PyBytes_GET_SIZE(key);
    if (!iid_len || !plain_text(iid, iid_len) || !read_state(PyBytes_AS_STRING(old), PyBytes_GET_SIZE(old), &s))
        Py_RETURN_NONE;
    w->features_ready = 0;
    int lane;
    int64_t fa;
    lane_and_final(&s, c, &lane, &fa);
    int final_now = lane == 0 || now[lane] >= fa;
    PyObject *samples = PyList_New(0);
    if (!samples) return NULL;
    int rc = 1;
    int64_t fd = s.imp + c->observe;
    if (!final_now && c->early && prev[0] < fd && fd <= now[0] && fd < fa)
        rc = add_sample(w, b, samples, iid, iid_len, &s, 0, 0, now[0], now[0], now, c);
    if (rc > 0 && final_now && lane && prev[lane] < fa)
        rc = add_sample(w, b, samples, iid, iid_len, &s, 2, 5, fa, now[lane], now, c);
    if (rc <= 0) {
        Py_DECREF(samples);
        if (rc < 0) return NULL;
        Py_RETURN_NONE;
    }
    if (final_now && now[lane] >= fa + c->retention) return Py_BuildValue("(OON)", Py_True, Py_None, samples);
    int64_t d[LANES];
    next_dues(&s, now, c, d);
    PyObject *dues = dues_tuple(d);
    if (!dues) {
        Py_DECREF(samples);
        return NULL;
    }
    return Py_BuildValue("(ONN)", Py_False, dues, samples);
}

/* lanes as the watermarks make them: NO_WATERMARK (-2**62) up to event times; else the Python core */
static int lanes_in_range(const int64_t *l) {
    for (int i = 0; i < LANES; i++)
        if (l[i] < -(INT64_C(1) << 62) || l[i] > MAX_TIME * 4) return 0;
    return 1;
}

/* the samples' encoding (msgpack: true) and the policy named in them */
static int read_writer(PyObject *msgpack, PyObject *policy, Writer *w) {
    w->encoding = PyObject_IsTrue(msgpack);
    if (w->encoding < 0) return -1;
    if (!PyUnicode_Check(policy)) {
        PyErr_SetString(PyExc_TypeError, "policy: a str");
        return -1;
    }
    w->policy = PyUnicode_AsUTF8AndSize(policy, &w->policy_len);
    if (!w->policy) return -1;
    if (!plain_text(w->policy, w->policy_len)) {
        PyErr_SetString(PyExc_ValueError, "policy: plain ASCII");
        return -1;
    }
    return 0;
}

static void writer_free(Writer *w) {
    PyMem_Free(w->names.p);
    PyMem_Free(w->values.p);
}

static PyObject *sweep_states(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "sweep_states(keys, olds, prev, now, cfg, encoding, policy)");
        return NULL;
    }
    PyObject *keys = args[0], *olds = args[1];
    if (!PyList_Check(keys) || !PyList_Check(olds) || PyList_GET_SIZE(keys) != PyList_GET_SIZE(olds)) {
        PyErr_SetString(PyExc_TypeError, "keys and olds: two lists of one length");
        return NULL;
    }
    int64_t prev[LANES], now[LANES];
    Cfg c;
    if (read_i64s(args[2], prev, LANES, "prev") < 0 || read_i64s(args[3], now, LANES, "now") < 0 ||
        read_cfg(args[4], &c) < 0)
        return NULL;
    Writer w = {0};
    if (read_writer(args[5], args[6], &w) < 0) return NULL;
    int in_range = lanes_in_range(prev) && lanes_in_range(now);
    Py_ssize_t n = PyList_GET_SIZE(keys);
    PyObject *out = PyList_New(n);
    Buf b = {0};
    if (!out) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *old = PyList_GET_ITEM(olds, i);
        PyObject *r;
        if (old == Py_None || !in_range) {
            r = Py_None;
            Py_INCREF(r);
        } else {
            r = sweep_one(&w, &b, PyList_GET_ITEM(keys, i), old, prev, now, &c);
        }
        if (!r) {
            Py_DECREF(out);
            out = NULL;
            break;
        }
        PyList_SET_ITEM(out, i, r);
    }
    PyMem_Free(b.p);
    writer_free(&w);
    return out;
}

/* ------------------------------------------------------------------------------------------ */
/* impressions: the record's bytes straight to a fresh funnel's state                           */

#define MAX_RECORD_BYTES (64 * 1024) /* events.MAX_RECORD_BYTES */
#define MAX_ID_LEN 128               /* events.MAX_ID_LEN */
#define MAX_FEATURES 256             /* events.MAX_FEATURES */
#define MAX_FEATURE_LEN 256          /* events.MAX_FEATURE_LEN */

/* a JSON string of printable ASCII (no escape: the caller ruled out backslashes) at s[*i]: its
   closing quote found by memchr, its bytes checked eight at a time (issue 16: the byte-at-a-time
   loop was a third of parse_records) */
static int scan_str(const char *s, Py_ssize_t n, Py_ssize_t *i, Slice *out) {
    if (*i >= n || s[*i] != '"') return 0;
    const char *start = s + *i + 1;
    const char *q = memchr(start, '"', (size_t)(n - *i - 1));
    if (!q) return 0;
    const unsigned char *u = (const unsigned char *)start;
    Py_ssize_t len = q - start, k = 0;
    uint64_t bad = 0;
    const uint64_t ones = 0x0101010101010101ULL, highs = 0x8080808080808080ULL;
    for (; k + 8 <= len; k += 8) { /* eight bytes at a time: any below 0x20, any above 0x7e */
        uint64_t w;
        memcpy(&w, u + k, 8);
        bad |= ((w - 0x20 * ones) & ~w & highs) | (((w + ones) | w) & highs);
    }
    for (; k < len; k++) bad |= (uint64_t)(u[k] < 0x20) | (uint64_t)(u[k] > 0x7e);
    if (bad) return 0;
    out->p = start;
    out->n = len;
    *i += len + 2;
    return 1;
}

/* whether a name repeats (an open-addressed table; the pairwise comparison it replaces was O(n^2):
   190 memcmp for the simulator's twenty features) */
static int any_repeated(const Slice *names, Py_ssize_t count) {
    int16_t table[2 * MAX_FEATURES];
    Py_ssize_t size = 16;
    while (size < 2 * count) size *= 2;
    memset(table, 0xff, (size_t)size * sizeof table[0]); /* -1: empty */
    int bits = 4;
    while (((Py_ssize_t)1 << bits) < size) bits++;
    for (Py_ssize_t k = 0; k < count; k++) {
        /* a hash of the length and the first and last eight bytes (a collision costs a memcmp) */
        uint64_t head = 0, tail = 0;
        Py_ssize_t m = names[k].n < 8 ? names[k].n : 8;
        memcpy(&head, names[k].p, (size_t)m);
        memcpy(&tail, names[k].p + names[k].n - m, (size_t)m);
        uint64_t h = (head ^ (tail * 0x9E3779B97F4A7C15ULL) ^ (uint64_t)names[k].n) * 0xC2B2AE3D27D4EB4FULL;
        Py_ssize_t slot = (Py_ssize_t)(h >> (64 - bits));
        while (table[slot] >= 0) {
            const Slice *o = &names[table[slot]];
            if (o->n == names[k].n && !memcmp(o->p, names[k].p, (size_t)o->n)) return 1;
            slot = (slot + 1) & (size - 1);
        }
        table[slot] = (int16_t)k;
    }
    return 0;
}

static int slice_is(const Slice *x, const char *lit) {
    size_t n = strlen(lit);
    return (size_t)x->n == n && !memcmp(x->p, lit, n);
}

/* An event record of topic `step` as the event contract takes it and as
   stream.contract.events.fast_event vouches for it - compact JSON (no whitespace, no escape),
   printable ASCII, exactly the contract's fields once each (an impression's features a flat map
   of strings within their bounds; a step without features) - gives 1 and its impression id,
   event time, event id, bank id and the features' JSON text (which is then
   funnel.features_json's bytes: msgspec writes a map of such strings exactly so). 0: anything
   else, which the Python decode reads (and words any error). */
static const char *const STEP_NAMES[5] = {"impression", "click", "application", "approval", "activation"};

static int parse_event(const char *s, Py_ssize_t n, int step, Slice *iid, int64_t *t, Slice *eid, Slice *bank,
                       Slice *feats) {
    if (n < 2 || n > MAX_RECORD_BYTES || memchr(s, '\\', (size_t)n) || s[0] != '{') return 0;
    Py_ssize_t i = 1;
    unsigned seen = 0;
    Slice key, v;
    for (;;) {
        if (!scan_str(s, n, &i, &key) || i >= n || s[i++] != ':') return 0;
        unsigned bit;
        if (slice_is(&key, "schema_version")) {
            bit = 1;
            if (i >= n || s[i] != '1') return 0;
            i++;
        } else if (slice_is(&key, "event_type")) {
            bit = 2;
            if (!scan_str(s, n, &i, &v) || !slice_is(&v, STEP_NAMES[step])) return 0;
        } else if (slice_is(&key, "event_id") || slice_is(&key, "impression_id") || slice_is(&key, "bank_id")) {
            bit = key.p[0] == 'e' ? 4 : key.p[0] == 'i' ? 8 : 16;
            if (!scan_str(s, n, &i, &v) || v.n < 1 || v.n > MAX_ID_LEN) return 0;
            if (bit == 4) *eid = v;
            if (bit == 8) *iid = v;
            if (bit == 16) *bank = v;
        } else if (slice_is(&key, "event_time_ms")) {
            bit = 32;
            Py_ssize_t j = i;
            int64_t x = 0;
            while (j < n && s[j] >= '0' && s[j] <= '9' && j - i < 17) x = x * 10 + (s[j++] - '0');
            if (j == i || (s[i] == '0' && j - i > 1) || j - i > 16 || x >= MAX_TIME) return 0;
            *t = x;
            i = j;
        } else if (slice_is(&key, "features") && step == 0) { /* (a step's features: the Python decode's) */
            bit = 64;
            Py_ssize_t start = i, count = 0;
            Slice names[MAX_FEATURES];
            if (i >= n || s[i++] != '{') return 0;
            if (i < n && s[i] == '}') {
                i++;
            } else {
                for (;;) {
                    Slice fk, fv;
                    if (!scan_str(s, n, &i, &fk) || fk.n < 1 || fk.n > MAX_FEATURE_LEN) return 0;
                    if (i >= n || s[i++] != ':') return 0;
                    if (!scan_str(s, n, &i, &fv) || fv.n > MAX_FEATURE_LEN) return 0;
                    if (count >= MAX_FEATURES) return 0;
                    names[count++] = fk;
                    if (i >= n) return 0;
                    if (s[i] == '}') { i++; break; }
                    if (s[i++] != ',') return 0;
                }
            }
            feats->p = s + start;
            feats->n = i - start;
            /* a repeated feature name: msgspec would keep the last, the strict decode refuses it */
            if (count > 1 && any_repeated(names, count)) return 0;
        } else {
            return 0;
        }
        if (seen & bit) return 0;
        seen |= bit;
        if (i >= n) return 0;
        if (s[i] == '}') { i++; break; }
        if (s[i++] != ',') return 0;
    }
    return i == n && seen == (step ? 63u : 127u);
}

static PyObject *impression_state(const Slice *bank, int64_t t, const Slice *feats) {
    Py_ssize_t n = HEAD_SIZE + bank->n + feats->n;
    PyObject *out = PyBytes_FromStringAndSize(NULL, n);
    if (!out) return NULL;
    unsigned char *p = (unsigned char *)PyBytes_AS_STRING(out);
    p[0] = 4;
    for (int i = 0; i < 8; i++) p[1 + i] = (unsigned char)((uint64_t)t >> (56 - 8 * i));
    memset(p + 9, 0xff, 32); /* four times not reached: -1 */
    p[41] = 0;
    p[42] = (unsigned char)(bank->n >> 8);
    p[43] = (unsigned char)bank->n;
    for (int i = 0; i < 4; i++) p[44 + i] = (unsigned char)((uint64_t)feats->n >> (24 - 8 * i));
    memcpy(p + HEAD_SIZE, bank->p, (size_t)bank->n);
    memcpy(p + HEAD_SIZE + bank->n, feats->p, (size_t)feats->n);
    return out;
}

static PyObject *parse_records(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || !PyList_Check(args[0]) || !PyList_Check(args[1]) ||
        PyList_GET_SIZE(args[0]) != PyList_GET_SIZE(args[1])) {
        PyErr_SetString(PyExc_TypeError, "parse_records(values, steps): two lists of one length");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(args[0]);
    PyObject *out = PyList_New(n);
    if (!out) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *raw = PyList_GET_ITEM(args[0], i), *r = NULL;
        Slice iid, eid, bank, feats;
        int64_t t = 0;
        PyObject *stepobj = PyList_GET_ITEM(args[1], i);
        long step = PyLong_CheckExact(stepobj) ? PyLong_AsLong(stepobj) : -1;
        if (step >= 0 && step < LANES && PyBytes_CheckExact(raw) &&
            parse_event(PyBytes_AS_STRING(raw), PyBytes_GET_SIZE(raw), (int)step, &iid, &t, &eid, &bank, &feats)) {
            /* (impression id, time, state), built directly (Py_BuildValue reads its format per call) */
            PyObject *state = step ? Py_NewRef(Py_None) : impression_state(&bank, t, &feats);
            PyObject *id = state ? PyBytes_FromStringAndSize(iid.p, iid.n) : NULL;
            PyObject *when = id ? PyLong_FromLongLong((long long)t) : NULL;
            r = when ? PyTuple_New(3) : NULL;
            if (!r) {
                Py_XDECREF(state);
                Py_XDECREF(id);
                Py_XDECREF(when);
                Py_DECREF(out);
                return NULL;
            }
            PyTuple_SET_ITEM(r, 0, id);
            PyTuple_SET_ITEM(r, 1, when);
            PyTuple_SET_ITEM(r, 2, state);
        } else {
            if (PyErr_Occurred()) {
                Py_DECREF(out);
                return NULL;
            }
            r = Py_NewRef(Py_None);
        }
        PyList_SET_ITEM(out, i, r);
    }
    return out;
}

/* After a function's samples: 1 to go on, 0 (samples dropped) when one was declined (rc 0) or
   failed (rc -1, an exception set). The buffers are the caller's to free. */
static int samples_kept(int rc, PyObject *samples) {
    if (rc > 0) return 1;
    Py_DECREF(samples);
    return 0;
}

/* The arguments advance's twins share, from a[0]: swept, partition_swept, cfg, msgpack, policy.
   -1 with an exception set; 0 for lanes out of range (decline); 1 read. */
static int read_advance_args(PyObject *const *a, int64_t *swept, int64_t *pswept, Cfg *c, Writer *w) {
    if (read_i64s(a[0], swept, LANES, "swept") < 0 || read_i64s(a[1], pswept, LANES, "partition_swept") < 0 ||
        read_cfg(a[2], c) < 0 || read_writer(a[3], a[4], w) < 0)
        return -1;
    return lanes_in_range(swept) && lanes_in_range(pswept);
}

/* advance() of an impression on no state (a fresh funnel) or on a stub (its events read ahead of
   it: a backlog read with the clicks' topic ahead, the usual way a click joins its impression
   then): its state - as parse_records made it, with the held events that count in order applied -
   its next dues against the partition's swept lanes, and the samples due at once (the first, if
   the impressions' lane is past its observe time; the final, if the lane of its first missing
   step is past that step's window). None: an impression older than the retention (a dead
   letter: the Python core words it), a held event that does not count or waits behind a missing
   step, or any state this path declines. Else (state, dues, samples). */
static PyObject *adv_imp(PyObject *key, PyObject *data, PyObject *old, const int64_t *swept,
                         const int64_t *pswept, const Cfg *cp, Writer *w, Buf *bp) {
    const Cfg c = *cp;
    State s;
    if (!PyBytes_CheckExact(key) || !PyBytes_CheckExact(data)) Py_RETURN_NONE;
    w->features_ready = 0; /* the features of this state, when a sample is written */
    const char *iid = PyBytes_AS_STRING(key);
    Py_ssize_t iid_len = PyBytes_GET_SIZE(key);
    if (!iid_len || !plain_text(iid, iid_len) || !read_state(PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), &s) ||
        reached(&s) != 0)
        Py_RETURN_NONE;
    if (s.imp + c.retention <= swept[0]) Py_RETURN_NONE; /* older than the retention: a dead letter */
    int applied = 0;
    if (old != Py_None) { /* funnel._apply_in_order over the stub's held events */
        HeldEv held[4];
        int nh = 0;
        if (!PyBytes_CheckExact(old) || !read_stub(PyBytes_AS_STRING(old), PyBytes_GET_SIZE(old), held, &nh))
            Py_RETURN_NONE;
        for (int r = 0; r < 4; r++) {
            int j = -1;
            for (int i = 0; i < nh; i++)
                if (held[i].step == r + 1) j = i;
            if (j < 0) break;
            int64_t pred = step_time(&s, r), fa = pred + c.w[r];
            if (held[j].t < pred - c.skew || held[j].t > fa || held[j].lane >= fa) Py_RETURN_NONE; /* rejected */
            s.t[r] = held[j].t;
            applied++;
        }
        if (applied != nh) Py_RETURN_NONE; /* one waits behind a missing step (or gives up on it) */
    }
    int lane;
    int64_t fa;
    lane_and_final(&s, &c, &lane, &fa);
    int final = lane == 0 || swept[lane] >= fa;
    PyObject *samples = PyList_New(0);
    if (!samples) return NULL;
    int rc = 1;
    int64_t fd = s.imp + c.observe;
    if (!final && c.early && fd < fa && fd <= swept[0]) /* _settle: the first, due at once */
        rc = add_sample(w, bp, samples, iid, iid_len, &s, 0, 0, swept[0], swept[0], swept, &c);
    if (rc > 0 && final) /* _settle: the final, at once */
        rc = add_sample(w, bp, samples, iid, iid_len, &s, 2, 5, fa, swept[lane], swept, &c);
    if (!samples_kept(rc, samples)) return rc < 0 ? NULL : Py_NewRef(Py_None);
    PyObject *state;
    if (applied) { /* the impression's state with the times of its steps */
        state = PyBytes_FromStringAndSize(PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data));
        if (!state) {
            Py_DECREF(samples);
            return NULL;
        }
        for (int k = 0; k < applied; k++) put_be((unsigned char *)PyBytes_AS_STRING(state) + 9 + 8 * k, (uint64_t)s.t[k], 8);
    } else {
        state = Py_NewRef(data);
    }
    int64_t d[LANES];
    next_dues(&s, pswept, &c, d);
    PyObject *dues = dues_tuple(d);
    if (!dues) {
        Py_DECREF(samples);
        Py_DECREF(state);
        return NULL;
    }
    return Py_BuildValue("(NNN)", state, dues, samples);
}

static PyObject *advance_impression(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError,
                        "advance_impression(ikey, state, old, swept, partition_swept, cfg, msgpack, policy)");
        return NULL;
    }
    int64_t swept[LANES], pswept[LANES];
    Cfg c;
    Writer w = {0};
    int ok = read_advance_args(args + 3, swept, pswept, &c, &w);
    if (ok < 0) return NULL;
    if (!ok) Py_RETURN_NONE;
    Buf b = {0};
    PyObject *r = adv_imp(args[0], args[1], args[2], swept, pswept, &c, &w, &b);
    PyMem_Free(b.p);
    writer_free(&w);
    return r;
}

/* advance() of one event of a step (click .. activation), alone in its batch, read by
   parse_event: on no state, it is held for its impression (a stub); on the usual state (the
   impression seen, nothing held), it is a duplicate or the next step in order, counted, with its
   correction and final samples as the Python core makes them. None for everything else - it
   would be rejected, held behind a missing step, the funnel is final or not the usual state -
   which the Python core decides. Else (changed, state bytes, dues, [(kind, elapsed_ms, sample)],
   duplicate). */
static PyObject *adv_step(PyObject *key, PyObject *old, PyObject *raw, long step, const int64_t *swept,
                          const int64_t *pswept, const Cfg *cp, Writer *w, Buf *bp) {
    const Cfg c = *cp;
    if (step < 1 || step > 4 || !PyBytes_CheckExact(key) || !PyBytes_CheckExact(raw)) Py_RETURN_NONE;
    w->features_ready = 0; /* the features of this state, when a sample is written */
    Slice iid, eid, bank, feats;
    int64_t t;
    const char *ikey = PyBytes_AS_STRING(key);
    Py_ssize_t ikey_len = PyBytes_GET_SIZE(key);
    if (!parse_event(PyBytes_AS_STRING(raw), PyBytes_GET_SIZE(raw), (int)step, &iid, &t, &eid, &bank, &feats) ||
        iid.n != ikey_len || memcmp(iid.p, ikey, (size_t)ikey_len) || !plain_text(ikey, ikey_len))
        Py_RETURN_NONE;
    HeldEv held[4];
    int nh = 0;
    if (old != Py_None && PyBytes_CheckExact(old) && read_stub(PyBytes_AS_STRING(old), PyBytes_GET_SIZE(old), held, &nh)) {
        for (int i = 0; i < nh; i++) /* its step is held already: a duplicate */
            if (held[i].step == step) return Py_BuildValue("(OOO[]O)", Py_False, Py_None, Py_None, Py_True);
    } else if (old != Py_None) {
        goto usual;
    }
    { /* held for its impression: a new stub, or one more event on the stub */
        int64_t due = t + c.grace + step * c.skew;
        if (swept[0] >= due) Py_RETURN_NONE; /* its impression's grace is over: a dead letter */
        Py_ssize_t n_raw = PyBytes_GET_SIZE(raw);
        if (bank.n > 0xffff || n_raw > 0xffffffffLL) Py_RETURN_NONE;
        Py_ssize_t n_old = old == Py_None ? 0 : PyBytes_GET_SIZE(old);
        Py_ssize_t n = (n_old ? n_old : HEAD_SIZE + bank.n) + HELD_HEAD + eid.n + n_raw;
        PyObject *state = PyBytes_FromStringAndSize(NULL, n);
        if (!state) return NULL;
        unsigned char *q = (unsigned char *)PyBytes_AS_STRING(state);
        if (n_old) { /* the stub's bytes as they are (the same layout), one more held event */
            memcpy(q, PyBytes_AS_STRING(old), (size_t)n_old);
            q[41] = (unsigned char)(nh + 1);
            for (int i = 0; i < nh; i++) {
                int64_t d = held[i].t + c.grace + held[i].step * c.skew;
                if (d < due) due = d;
            }
        } else {
            q[0] = 4;
            memset(q + 1, 0xff, 40); /* impression and four steps: -1 */
            q[41] = 1;
            put_be(q + 42, (uint64_t)bank.n, 2);
            memset(q + 44, 0xff, 4); /* no features */
            memcpy(q + HEAD_SIZE, bank.p, (size_t)bank.n);
            n_old = HEAD_SIZE + bank.n;
        }
        put_held(q + n_old, (int)step, t, swept[step], &eid, raw);
        int64_t d[LANES] = {due, NO_DUE, NO_DUE, NO_DUE, NO_DUE}; /* next_dues of a stub */
        PyObject *dues = dues_tuple(d);
        if (!dues) {
            Py_DECREF(state);
            return NULL;
        }
        return Py_BuildValue("(ONN[]O)", Py_True, state, dues, Py_False);
    }
usual:;
    State s;
    if (!PyBytes_CheckExact(old) || !read_state(PyBytes_AS_STRING(old), PyBytes_GET_SIZE(old), &s))
        Py_RETURN_NONE;
    if (s.t[step - 1] != NONE_T) return Py_BuildValue("(OOO[]O)", Py_False, Py_None, Py_None, Py_True); /* a duplicate */
    int lane;
    int64_t fa;
    lane_and_final(&s, &c, &lane, &fa);
    if (lane == 0 || swept[lane] >= fa) Py_RETURN_NONE; /* final already: a dead letter */
    int r = reached(&s);
    if (step != r + 1) Py_RETURN_NONE; /* held behind a missing step */
    int64_t pred = step_time(&s, r);
    if (t < pred - c.skew || t > fa || swept[step] >= fa) Py_RETURN_NONE; /* it does not count: a dead letter */
    int64_t fd = s.imp + c.observe;
    int first_out = c.early && fd < fa && fd <= swept[0]; /* first_due(old) <= swept[0] */
    s.t[step - 1] = t;
    PyObject *samples = PyList_New(0);
    if (!samples) return NULL;
    int rc = 1;
    if (first_out) rc = add_sample(w, bp, samples, ikey, ikey_len, &s, 1, (int)step, t, swept[0], swept, &c);
    int lane2;
    int64_t fa2;
    lane_and_final(&s, &c, &lane2, &fa2);
    if (rc > 0 && (lane2 == 0 || swept[lane2] >= fa2)) /* _settle: final now */
        rc = add_sample(w, bp, samples, ikey, ikey_len, &s, 2, 5, fa2, swept[lane2], swept, &c);
    if (!samples_kept(rc, samples)) return rc < 0 ? NULL : Py_NewRef(Py_None);
    PyObject *state = PyBytes_FromStringAndSize(PyBytes_AS_STRING(old), PyBytes_GET_SIZE(old));
    if (!state) {
        Py_DECREF(samples);
        return NULL;
    }
    unsigned char *q = (unsigned char *)PyBytes_AS_STRING(state) + 9 + 8 * (step - 1);
    for (int i = 0; i < 8; i++) q[i] = (unsigned char)((uint64_t)t >> (56 - 8 * i));
    int64_t d[LANES];
    next_dues(&s, pswept, &c, d);
    PyObject *dues = dues_tuple(d);
    if (!dues) {
        Py_DECREF(samples);
        Py_DECREF(state);
        return NULL;
    }
    return Py_BuildValue("(ONNNO)", Py_True, state, dues, samples, Py_False);
}

static PyObject *advance_step(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 9) {
        PyErr_SetString(PyExc_TypeError,
                        "advance_step(ikey, old, raw, step, swept, partition_swept, cfg, msgpack, policy)");
        return NULL;
    }
    long step = PyLong_AsLong(args[3]);
    if (step == -1 && PyErr_Occurred()) return NULL;
    int64_t swept[LANES], pswept[LANES];
    Cfg c;
    Writer w = {0};
    int ok = read_advance_args(args + 4, swept, pswept, &c, &w);
    if (ok < 0) return NULL;
    if (!ok) Py_RETURN_NONE;
    Buf b = {0};
    PyObject *r = adv_step(args[0], args[1], args[2], step, swept, pswept, &c, &w, &b);
    PyMem_Free(b.p);
    writer_free(&w);
    return r;
}

/* advance_groups(keys, olds, groups, partition_swept, cfg, msgpack, policy, output, topic, out,
   delays): the compiled path of FunnelJoin.on_batch over one partition's groups - for each key
   (its stored state in olds), advance_impression / advance_step over its group's events in order
   while they are vouched for (a group item is (step, event, raw, swept, vouched): vouched None for
   an event the compiled path did not read) and neither declines, each on the state the last left.
   The samples go to out as output(topic, key, sample) in order; a final's elapsed ms to delays
   (a list, or None). Returns (puts, rest, kinds, duplicates):
   - puts: [(key, state, dues)] of the groups taken whole that changed their state;
   - rest: [(index, done, state, changed)] of the groups it stopped in: the Python core takes
     their events from index `done` on, from `state` (bytes or None), `changed` whether one before
     changed it;
   - kinds: the samples out per kind (first, correction, final); duplicates: per step.
   The same calls and results as the Python loop around advance_impression / advance_step did. */
static int out_sample(PyTypeObject *otype, PyObject *topic, PyObject *key, PyObject *sample, PyObject *out,
                      PyObject *delays, long *kinds) {
    if (!PyTuple_Check(sample) || PyTuple_GET_SIZE(sample) != 3) {
        PyErr_SetString(PyExc_SystemError, "a sample: (kind, elapsed_ms, value)");
        return -1;
    }
    long kind = PyLong_AsLong(PyTuple_GET_ITEM(sample, 0));
    if (kind < 0 || kind > 2) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_SystemError, "a sample's kind: 0, 1 or 2");
        return -1;
    }
    PyObject *o = otype->tp_alloc(otype, 3);
    if (!o) return -1;
    PyObject *value = PyTuple_GET_ITEM(sample, 2);
    Py_INCREF(topic);
    Py_INCREF(key);
    Py_INCREF(value);
    PyTuple_SET_ITEM(o, 0, topic);
    PyTuple_SET_ITEM(o, 1, key);
    PyTuple_SET_ITEM(o, 2, value);
    int rc = PyList_Append(out, o);
    Py_DECREF(o);
    if (rc < 0) return -1;
    kinds[kind]++;
    if (kind == 2 && delays != Py_None && PyList_Append(delays, PyTuple_GET_ITEM(sample, 1)) < 0) return -1;
    return 0;
}

static PyObject *advance_groups(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 11) {
        PyErr_SetString(PyExc_TypeError, "advance_groups(keys, olds, groups, partition_swept, cfg, msgpack, policy, "
                                         "output, topic, out, delays)");
        return NULL;
    }
    PyObject *keys = args[0], *olds = args[1], *groups = args[2], *topic = args[8], *out = args[9],
             *delays = args[10];
    if (!PyList_Check(keys) || !PyList_Check(olds) || !PyList_Check(groups) ||
        PyList_GET_SIZE(olds) != PyList_GET_SIZE(keys) || PyList_GET_SIZE(groups) != PyList_GET_SIZE(keys) ||
        !PyType_Check(args[7]) || !PyType_IsSubtype((PyTypeObject *)args[7], &PyTuple_Type) || !PyList_Check(out) ||
        (delays != Py_None && !PyList_Check(delays))) {
        PyErr_SetString(PyExc_TypeError, "advance_groups: keys, olds and groups lists of one length, output a tuple "
                                         "type, out a list, delays a list or None");
        return NULL;
    }
    PyTypeObject *otype = (PyTypeObject *)args[7];
    int64_t pswept[LANES], swept[LANES];
    Cfg c;
    Writer w = {0};
    if (read_i64s(args[3], pswept, LANES, "partition_swept") < 0 || read_cfg(args[4], &c) < 0 ||
        read_writer(args[5], args[6], &w) < 0)
        return NULL;
    int pswept_ok = lanes_in_range(pswept), swept_ok = 0;
    PyObject *last_swept = NULL;
    long kinds[3] = {0, 0, 0}, dups[LANES] = {0, 0, 0, 0, 0};
    Buf b = {0};
    PyObject *puts = PyList_New(0), *rest = PyList_New(0), *state = NULL, *dues = NULL, *r = NULL;
    if (!puts || !rest) goto error;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(keys); i++) {
        PyObject *key = PyList_GET_ITEM(keys, i), *group = PyList_GET_ITEM(groups, i);
        if (!PyList_Check(group)) {
            PyErr_SetString(PyExc_TypeError, "advance_groups: each group a list");
            goto error;
        }
        state = Py_NewRef(PyList_GET_ITEM(olds, i));
        dues = Py_NewRef(Py_None);
        int changed = 0;
        Py_ssize_t done = 0, n = PyList_GET_SIZE(group);
        for (; done < n; done++) {
            PyObject *item = PyList_GET_ITEM(group, done);
            if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 5) {
                PyErr_SetString(PyExc_TypeError, "advance_groups: a group's item (step, event, raw, swept, vouched)");
                goto error;
            }
            PyObject *vouched = PyTuple_GET_ITEM(item, 4);
            if (vouched == Py_None) break;
            long step = PyLong_AsLong(PyTuple_GET_ITEM(item, 0));
            if (step == -1 && PyErr_Occurred()) goto error;
            PyObject *sw = PyTuple_GET_ITEM(item, 3);
            if (sw != last_swept) { /* (a partition's impressions share one tuple: read once) */
                if (read_i64s(sw, swept, LANES, "swept") < 0) goto error;
                swept_ok = lanes_in_range(swept);
                last_swept = sw; /* borrowed: the groups hold every item for the call */
            }
            if (!pswept_ok || !swept_ok) break;
            PyObject *samples;
            if (step == 0) { /* on no state, or on the stub of its events read ahead of it */
                if (!PyTuple_Check(vouched) || PyTuple_GET_SIZE(vouched) != 3) {
                    PyErr_SetString(PyExc_TypeError, "advance_groups: vouched (impression id, time, state)");
                    goto error;
                }
                r = adv_imp(key, PyTuple_GET_ITEM(vouched, 2), state, swept, pswept, &c, &w, &b);
                if (!r) goto error;
                if (r == Py_None) break;
                Py_SETREF(state, Py_NewRef(PyTuple_GET_ITEM(r, 0)));
                Py_SETREF(dues, Py_NewRef(PyTuple_GET_ITEM(r, 1)));
                changed = 1;
                samples = PyTuple_GET_ITEM(r, 2);
            } else {
                r = adv_step(key, state, PyTuple_GET_ITEM(item, 2), step, swept, pswept, &c, &w, &b);
                if (!r) goto error;
                if (r == Py_None) break;
                if (PyTuple_GET_ITEM(r, 0) == Py_True) {
                    Py_SETREF(state, Py_NewRef(PyTuple_GET_ITEM(r, 1)));
                    Py_SETREF(dues, Py_NewRef(PyTuple_GET_ITEM(r, 2)));
                    changed = 1;
                }
                samples = PyTuple_GET_ITEM(r, 3);
                if (PyTuple_GET_ITEM(r, 4) == Py_True) dups[step]++;
            }
            for (Py_ssize_t k = 0; k < PyList_GET_SIZE(samples); k++)
                if (out_sample(otype, topic, key, PyList_GET_ITEM(samples, k), out, delays, kinds) < 0) goto error;
            Py_CLEAR(r);
        }
        Py_CLEAR(r); /* a decline's None */
        PyObject *row = NULL;
        if (done < n)
            row = Py_BuildValue("(nnOO)", i, done, state, changed ? Py_True : Py_False);
        else if (changed)
            row = PyTuple_Pack(3, key, state, dues);
        if (done < n || changed) {
            if (!row || PyList_Append(done < n ? rest : puts, row) < 0) {
                Py_XDECREF(row);
                goto error;
            }
            Py_DECREF(row);
        }
        Py_CLEAR(state);
        Py_CLEAR(dues);
    }
    PyMem_Free(b.p);
    writer_free(&w);
    return Py_BuildValue("(NN(lll)(lllll))", puts, rest, kinds[0], kinds[1], kinds[2], dups[0], dups[1], dups[2],
                         dups[3], dups[4]);
error:
    Py_XDECREF(r);
    Py_XDECREF(state);
    Py_XDECREF(dues);
    Py_XDECREF(puts);
    Py_XDECREF(rest);
    PyMem_Free(b.p);
    writer_free(&w);
    return NULL;
}

/* sweep_out(keys, olds, prev, now, cfg, msgpack, policy, output, topic, out, delays):
   sweep_states with FunnelJoin.sweep's handling of its results - the samples go to out as
   output(topic, key, sample) in order, a final's elapsed ms to delays (a list, or None). Returns
   (visited, purges, reschedules, declined, kinds): the states found (olds not None), the keys to
   delete, [(key, dues)] to reschedule, the indexes of the states the Python core sweeps, and the
   samples out per kind (first, correction, final). */
static PyObject *sweep_out(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 11) {
        PyErr_SetString(PyExc_TypeError,
                        "sweep_out(keys, olds, prev, now, cfg, msgpack, policy, output, topic, out, delays)");
        return NULL;
    }
    PyObject *keys = args[0], *olds = args[1], *topic = args[8], *out = args[9], *delays = args[10];
    if (!PyList_Check(keys) || !PyList_Check(olds) || PyList_GET_SIZE(keys) != PyList_GET_SIZE(olds) ||
        !PyType_Check(args[7]) || !PyType_IsSubtype((PyTypeObject *)args[7], &PyTuple_Type) || !PyList_Check(out) ||
        (delays != Py_None && !PyList_Check(delays))) {
        PyErr_SetString(PyExc_TypeError, "sweep_out: keys and olds lists of one length, output a tuple type, out a "
                                         "list, delays a list or None");
        return NULL;
    }
    PyTypeObject *otype = (PyTypeObject *)args[7];
    int64_t prev[LANES], now[LANES];
    Cfg c;
    Writer w = {0};
    if (read_i64s(args[2], prev, LANES, "prev") < 0 || read_i64s(args[3], now, LANES, "now") < 0 ||
        read_cfg(args[4], &c) < 0 || read_writer(args[5], args[6], &w) < 0)
        return NULL;
    int in_range = lanes_in_range(prev) && lanes_in_range(now);
    long kinds[3] = {0, 0, 0};
    Py_ssize_t visited = 0;
    Buf b = {0};
    PyObject *purges = PyList_New(0), *rescheduled = PyList_New(0), *declined = PyList_New(0), *r = NULL;
    if (!purges || !rescheduled || !declined) goto error;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(keys); i++) {
        PyObject *key = PyList_GET_ITEM(keys, i), *old = PyList_GET_ITEM(olds, i);
        if (old == Py_None) continue; /* no state: nothing to sweep */
        visited++;
        r = in_range ? sweep_one(&w, &b, key, old, prev, now, &c) : Py_NewRef(Py_None);
        if (!r) goto error;
        if (r == Py_None) {
            PyObject *index = PyLong_FromSsize_t(i);
            if (!index || PyList_Append(declined, index) < 0) {
                Py_XDECREF(index);
                goto error;
            }
            Py_DECREF(index);
        } else {
            PyObject *samples = PyTuple_GET_ITEM(r, 2);
            for (Py_ssize_t k = 0; k < PyList_GET_SIZE(samples); k++)
                if (out_sample(otype, topic, key, PyList_GET_ITEM(samples, k), out, delays, kinds) < 0) goto error;
            if (PyTuple_GET_ITEM(r, 0) == Py_True) {
                if (PyList_Append(purges, key) < 0) goto error;
            } else {
                PyObject *row = PyTuple_Pack(2, key, PyTuple_GET_ITEM(r, 1));
                if (!row || PyList_Append(rescheduled, row) < 0) {
                    Py_XDECREF(row);
                    goto error;
                }
                Py_DECREF(row);
            }
        }
        Py_CLEAR(r);
    }
    PyMem_Free(b.p);
    writer_free(&w);
    return Py_BuildValue("(nNNN(lll))", visited, purges, rescheduled, declined, kinds[0], kinds[1], kinds[2]);
error:
    Py_XDECREF(r);
    Py_XDECREF(purges);
    Py_XDECREF(rescheduled);
    Py_XDECREF(declined);
    PyMem_Free(b.p);
    writer_free(&w);
    return NULL;
}

/* ------------------------------------------------------------------------------------------ */
/* gather: the per-record half of FunnelJoin.on_batch                                            */

typedef struct {
    long partition;
    PyObject *p;      /* the join's _Partition (owned) */
    PyObject *wm;     /* its PartitionWatermark (owned) */
    PyObject *swept;  /* its swept lanes, a 5-tuple (owned) */
    int64_t swept_v[LANES];
    PyObject *groups; /* impression key -> [item] (owned; also in the result) */
    int64_t held[5];  /* the last impressions' times not yet observed (a ring of the newest five) */
    Py_ssize_t n_held;
    int held_behind;
} GPart;

static PyObject *S_observe, *S_observe_many, *S_lane, *S_swept, *S_wm, *S_impression_id, *S_event_time_ms,
    *S_encode, *EMPTY_BYTES;

/* the impressions read since the partition's watermark last saw a record, observed at once */
static int observe_held(GPart *g, PyObject *now) {
    if (!g->n_held) return 0;
    Py_ssize_t k = g->n_held < 5 ? g->n_held : 5;
    PyObject *times = PyList_New(k);
    if (!times) return -1;
    for (Py_ssize_t j = 0; j < k; j++) { /* oldest first */
        PyObject *t = PyLong_FromLongLong(g->held[(g->n_held - k + j) % 5]);
        if (!t) {
            Py_DECREF(times);
            return -1;
        }
        PyList_SET_ITEM(times, j, t);
    }
    PyObject *zero = PyLong_FromLong(0);
    PyObject *r = zero ? PyObject_CallMethodObjArgs(g->wm, S_observe_many, zero, times, g->held_behind ? Py_True : Py_False,
                                                    now, NULL)
                       : NULL;
    Py_XDECREF(zero);
    Py_DECREF(times);
    if (!r) return -1;
    Py_DECREF(r);
    g->n_held = 0;
    return 0;
}

static void gparts_free(GPart *gp, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_XDECREF(gp[i].p);
        Py_XDECREF(gp[i].wm);
        Py_XDECREF(gp[i].swept);
        Py_XDECREF(gp[i].groups);
    }
    PyMem_Free(gp);
}

/* gather(records, steps, pre, events, part, now, horizon, event_type): FunnelJoin.on_batch's pass
   over the records in fetch order - each record's impression id and event time (pre's, or its
   decoded Event's), the future check against horizon (None: none), each record's lanes (its own
   topic's as the records before it left it: PartitionWatermark.lane, then observe; a partition's
   impressions observed together before the next record of another topic of it, or at the end -
   observe_many, the same as one at a time) and its group. Returns (groups, parts, counts, dead):
   partition -> {impression key -> [(step, event, raw, swept, vouched)]} in fetch order, partition
   -> its _Partition (part(partition)), the records per step, and [(index, event time or None)] of
   the records to dead-letter in fetch order (None: not an event - events[index] says why; a time:
   ahead of horizon). */
static PyObject *gather(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError, "gather(records, steps, pre, events, part, now, horizon, event_type)");
        return NULL;
    }
    PyObject *records = args[0], *steps = args[1], *pre = args[2], *events = args[3], *part = args[4],
             *now = args[5], *horizon_obj = args[6], *event_type = args[7];
    if (!PyList_Check(records) || !PyList_Check(steps) || !PyList_Check(events) ||
        (pre != Py_None && !PyList_Check(pre)) || PyList_GET_SIZE(steps) != PyList_GET_SIZE(records) ||
        PyList_GET_SIZE(events) != PyList_GET_SIZE(records) ||
        (pre != Py_None && PyList_GET_SIZE(pre) != PyList_GET_SIZE(records)) || !PyCallable_Check(part)) {
        PyErr_SetString(PyExc_TypeError, "gather: records, steps, events (and pre, or None) lists of one length, "
                                         "part callable");
        return NULL;
    }
    int has_horizon = horizon_obj != Py_None;
    int64_t horizon = 0;
    if (has_horizon) {
        horizon = PyLong_AsLongLong(horizon_obj);
        if (horizon == -1 && PyErr_Occurred()) return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(records), np = 0, cap = 8, last = -1;
    long counts[LANES] = {0, 0, 0, 0, 0};
    GPart *gp = PyMem_Calloc((size_t)cap, sizeof(GPart));
    PyObject *groups = PyDict_New(), *parts = PyDict_New(), *dead = PyList_New(0);
    if (!gp || !groups || !parts || !dead) goto error;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *rec = PyList_GET_ITEM(records, i);
        if (!PyTuple_Check(rec) || PyTuple_GET_SIZE(rec) != 6) {
            PyErr_SetString(PyExc_TypeError, "gather: a record (topic, partition, key, value, offset, behind)");
            goto error;
        }
        long step = PyLong_AsLong(PyList_GET_ITEM(steps, i));
        if (step == -1 && PyErr_Occurred()) goto error;
        if (step < 0 || step >= LANES) {
            PyErr_SetString(PyExc_ValueError, "gather: a step in 0..4");
            goto error;
        }
        counts[step]++;
        long partition = PyLong_AsLong(PyTuple_GET_ITEM(rec, 1));
        if (partition == -1 && PyErr_Occurred()) goto error;
        GPart *g = NULL;
        if (last >= 0 && gp[last].partition == partition) {
            g = &gp[last];
        } else {
            for (Py_ssize_t j = 0; j < np; j++)
                if (gp[j].partition == partition) {
                    g = &gp[j];
                    last = j;
                    break;
                }
        }
        if (!g) { /* the batch's first record of this partition */
            if (np == cap) {
                GPart *bigger = PyMem_Realloc(gp, (size_t)(2 * cap) * sizeof(GPart));
                if (!bigger) {
                    PyErr_NoMemory();
                    goto error;
                }
                memset(bigger + cap, 0, (size_t)cap * sizeof(GPart));
                gp = bigger;
                cap *= 2;
            }
            g = &gp[np];
            g->partition = partition;
            last = np++;
            PyObject *key = PyTuple_GET_ITEM(rec, 1);
            if (!(g->p = PyObject_CallOneArg(part, key)) || PyDict_SetItem(parts, key, g->p) < 0) goto error;
            if (!(g->wm = PyObject_GetAttr(g->p, S_wm)) || !(g->swept = PyObject_GetAttr(g->p, S_swept))) goto error;
            if (read_i64s(g->swept, g->swept_v, LANES, "swept") < 0) goto error;
            if (!(g->groups = PyDict_New()) || PyDict_SetItem(groups, key, g->groups) < 0) goto error;
        }
        PyObject *vouched = pre == Py_None ? Py_None : PyList_GET_ITEM(pre, i);
        PyObject *event = Py_None, *ikey = NULL;
        int64_t t;
        if (vouched != Py_None) { /* read by parse_records: (impression id, time, an impression's state) */
            if (!PyTuple_Check(vouched) || PyTuple_GET_SIZE(vouched) != 3) {
                PyErr_SetString(PyExc_TypeError, "gather: pre's (impression id, time, state)");
                goto error;
            }
            ikey = Py_NewRef(PyTuple_GET_ITEM(vouched, 0));
            t = PyLong_AsLongLong(PyTuple_GET_ITEM(vouched, 1));
            if (t == -1 && PyErr_Occurred()) {
                Py_DECREF(ikey);
                goto error;
            }
        } else {
            event = PyList_GET_ITEM(events, i);
            if ((PyObject *)Py_TYPE(event) != event_type) { /* not an event: its dead letter */
                PyObject *row = Py_BuildValue("(nO)", i, Py_None);
                if (!row || PyList_Append(dead, row) < 0) {
                    Py_XDECREF(row);
                    goto error;
                }
                Py_DECREF(row);
                continue;
            }
            PyObject *iid = PyObject_GetAttr(event, S_impression_id);
            ikey = iid ? PyObject_CallMethodNoArgs(iid, S_encode) : NULL;
            Py_XDECREF(iid);
            if (!ikey) goto error;
            PyObject *tobj = PyObject_GetAttr(event, S_event_time_ms);
            t = tobj ? PyLong_AsLongLong(tobj) : -1;
            Py_XDECREF(tobj);
            if (t == -1 && PyErr_Occurred()) {
                Py_DECREF(ikey);
                goto error;
            }
        }
        if (has_horizon && t > horizon) { /* ahead of this joiner's clock: a dead letter */
            Py_DECREF(ikey);
            PyObject *row = Py_BuildValue("(nL)", i, (long long)t);
            if (!row || PyList_Append(dead, row) < 0) {
                Py_XDECREF(row);
                goto error;
            }
            Py_DECREF(row);
            continue;
        }
        PyObject *behind = PyTuple_GET_ITEM(rec, 5);
        PyObject *swept = Py_NewRef(g->swept);
        if (step == 0) {
            g->held[g->n_held % 5] = t;
            g->n_held++;
            int b = PyObject_IsTrue(behind);
            if (b < 0) {
                Py_DECREF(ikey);
                Py_DECREF(swept);
                goto error;
            }
            g->held_behind = b;
        } else {
            PyObject *sobj = PyList_GET_ITEM(steps, i), *own = NULL, *tt = NULL, *r = NULL;
            int ok = observe_held(g, now) == 0 && (own = PyObject_CallMethodObjArgs(g->wm, S_lane, sobj, now, NULL));
            long long ownv = ok ? PyLong_AsLongLong(own) : -1;
            if (ok && ownv == -1 && PyErr_Occurred()) ok = 0;
            if (ok && ownv > g->swept_v[step]) { /* its own topic's lane has moved past the swept one */
                PyObject *lanes = PyTuple_New(LANES);
                if (!lanes) ok = 0;
                for (int k = 0; ok && k < LANES; k++)
                    PyTuple_SET_ITEM(lanes, k, Py_NewRef(k == step ? own : PyTuple_GET_ITEM(g->swept, k)));
                if (ok) Py_SETREF(swept, lanes);
            }
            if (ok) ok = (tt = PyLong_FromLongLong(t)) != NULL;
            if (ok) ok = (r = PyObject_CallMethodObjArgs(g->wm, S_observe, sobj, tt, behind, now, NULL)) != NULL;
            Py_XDECREF(own);
            Py_XDECREF(tt);
            Py_XDECREF(r);
            if (!ok) {
                Py_DECREF(ikey);
                Py_DECREF(swept);
                goto error;
            }
        }
        PyObject *value = PyTuple_GET_ITEM(rec, 3);
        int truthy = value == Py_None ? 0 : PyBytes_CheckExact(value) ? PyBytes_GET_SIZE(value) > 0 : PyObject_IsTrue(value);
        if (truthy < 0) {
            Py_DECREF(ikey);
            Py_DECREF(swept);
            goto error;
        }
        PyObject *raw = truthy ? value : EMPTY_BYTES; /* value or b"" */
        PyObject *item = PyTuple_New(5);
        if (!item) {
            Py_DECREF(ikey);
            Py_DECREF(swept);
            goto error;
        }
        PyTuple_SET_ITEM(item, 0, Py_NewRef(PyList_GET_ITEM(steps, i)));
        PyTuple_SET_ITEM(item, 1, Py_NewRef(event));
        PyTuple_SET_ITEM(item, 2, Py_NewRef(raw));
        PyTuple_SET_ITEM(item, 3, swept);
        PyTuple_SET_ITEM(item, 4, Py_NewRef(vouched));
        PyObject *group = PyDict_GetItemWithError(g->groups, ikey); /* borrowed */
        int rc;
        if (group) {
            rc = PyList_Append(group, item);
        } else if (PyErr_Occurred()) {
            rc = -1;
        } else {
            group = PyList_New(1);
            if (group) {
                PyList_SET_ITEM(group, 0, Py_NewRef(item));
                rc = PyDict_SetItem(g->groups, ikey, group);
                Py_DECREF(group);
            } else {
                rc = -1;
            }
        }
        Py_DECREF(item);
        Py_DECREF(ikey);
        if (rc < 0) goto error;
    }
    for (Py_ssize_t j = 0; j < np; j++) /* the impressions read last: observed before the batch's note */
        if (observe_held(&gp[j], now) < 0) goto error;
    gparts_free(gp, np);
    return Py_BuildValue("(NN(lllll)N)", groups, parts, counts[0], counts[1], counts[2], counts[3], counts[4], dead);
error:
    if (gp) gparts_free(gp, np);
    Py_XDECREF(groups);
    Py_XDECREF(parts);
    Py_XDECREF(dead);
    return NULL;
}

/* ------------------------------------------------------------------------------------------ */
/* FaustTableStore's loops over a batch's keys (stream/join/faust_store.py, docs/joiner.md round 21)  */

/* store_put_many(items, outbox, held, index): for each (key, value, dues) of items: outbox[key] =
   value, held.add(key), index.set(key, dues) - index a DueIndex (this module's), or anything with
   a set method. */
static PyObject *store_put_many(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4 || !PyList_Check(args[0]) || !PyDict_Check(args[1]) || !PySet_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "store_put_many(items: list, outbox: dict, held: set, index)");
        return NULL;
    }
    PyObject *items = args[0], *outbox = args[1], *held = args[2], *index = args[3];
    int native = Py_IS_TYPE(index, &DueIndexType);
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(items); i++) {
        PyObject *it = PyList_GET_ITEM(items, i);
        if (!PyTuple_Check(it) || PyTuple_GET_SIZE(it) != 3) {
            PyErr_SetString(PyExc_TypeError, "store_put_many: (key, value, dues) items");
            return NULL;
        }
        PyObject *key = PyTuple_GET_ITEM(it, 0), *value = PyTuple_GET_ITEM(it, 1), *dues = PyTuple_GET_ITEM(it, 2);
        if (PyDict_SetItem(outbox, key, value) < 0 || PySet_Add(held, key) < 0) return NULL;
        if (native) {
            int64_t d[LANES];
            if (read_dues(dues, d) < 0 || index_set((DueIndexObject *)index, key, d) < 0) return NULL;
        } else {
            PyObject *r = PyObject_CallMethod(index, "set", "OO", key, dues);
            if (!r) return NULL;
            Py_DECREF(r);
        }
    }
    Py_RETURN_NONE;
}

/* store_lookup(keys, held, layers): the states of keys found in memory - None for a key not in
   held (no state), else its value in the first of layers (dicts, newest first) that has it - and
   the indexes of the held keys none has (to be read from RocksDB): (values, ask). */
static PyObject *store_lookup(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3 || !PyList_Check(args[0]) || !PyAnySet_Check(args[1]) || !PyList_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "store_lookup(keys: list, held: set, layers: list of dicts)");
        return NULL;
    }
    PyObject *keys = args[0], *held = args[1], *layers = args[2];
    Py_ssize_t n = PyList_GET_SIZE(keys), nl = PyList_GET_SIZE(layers);
    for (Py_ssize_t j = 0; j < nl; j++)
        if (!PyDict_Check(PyList_GET_ITEM(layers, j))) {
            PyErr_SetString(PyExc_TypeError, "store_lookup: layers are dicts");
            return NULL;
        }
    PyObject *values = PyList_New(n), *ask = PyList_New(0);
    if (!values || !ask) goto fail;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *key = PyList_GET_ITEM(keys, i), *v = NULL;
        int has = PySet_Contains(held, key);
        if (has < 0) goto fail;
        if (has) {
            for (Py_ssize_t j = 0; j < nl && !v; j++) {
                v = PyDict_GetItemWithError(PyList_GET_ITEM(layers, j), key);
                if (!v && PyErr_Occurred()) goto fail;
            }
            if (!v) {
                PyObject *at = PyLong_FromSsize_t(i);
                int bad = !at || PyList_Append(ask, at) < 0;
                Py_XDECREF(at);
                if (bad) goto fail;
            }
        }
        if (!v) v = Py_None;
        Py_INCREF(v);
        PyList_SET_ITEM(values, i, v);
    }
    PyObject *r = PyTuple_Pack(2, values, ask);
    Py_DECREF(values);
    Py_DECREF(ask);
    return r;
fail:
    Py_XDECREF(values);
    Py_XDECREF(ask);
    return NULL;
}

/* ------------------------------------------------------------------------------------------ */
/* Kafka's murmur2 (Java's Utils.murmur2): stream.kafka.partitioner.murmur2 in C                  */

static PyObject *murmur2(PyObject *Py_UNUSED(module), PyObject *arg) {
    if (!PyBytes_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "murmur2(data: bytes)");
        return NULL;
    }
    const unsigned char *d = (const unsigned char *)PyBytes_AS_STRING(arg);
    Py_ssize_t n = PyBytes_GET_SIZE(arg);
    const uint32_t m = 0x5bd1e995u;
    uint32_t h = 0x9747b28cu ^ (uint32_t)n;
    Py_ssize_t n4 = n >> 2;
    for (Py_ssize_t i = 0; i < n4; i++) {
        const unsigned char *q = d + 4 * i;
        uint32_t k = (uint32_t)q[0] | (uint32_t)q[1] << 8 | (uint32_t)q[2] << 16 | (uint32_t)q[3] << 24;
        k *= m;
        k ^= k >> 24;
        k *= m;
        h *= m;
        h ^= k;
    }
    const unsigned char *tail = d + (n & ~(Py_ssize_t)3);
    switch (n & 3) {
    case 3: h ^= (uint32_t)tail[2] << 16; /* fall through */
    case 2: h ^= (uint32_t)tail[1] << 8;  /* fall through */
    case 1: h ^= tail[0]; h *= m;
    }
    h ^= h >> 13;
    h *= m;
    h ^= h >> 15;
    return PyLong_FromUnsignedLong(h);
}

static PyMethodDef module_methods[] = {
    {"sweep_states", (PyCFunction)(void (*)(void))sweep_states, METH_FASTCALL,
     "sweep_states(keys, olds, prev, now, cfg, msgpack, policy): per key None (declined: run the Python "
     "core; also for a missing state) or (purge, dues, [(kind, elapsed_ms, sample bytes)])"},
    {"parse_records", (PyCFunction)(void (*)(void))parse_records, METH_FASTCALL,
     "parse_records(values, steps): per record None (not vouched for: decode it in Python) or, for an event in "
     "the contract's compact form, (impression id, event time, an impression's fresh funnel state or None)"},
    {"advance_impression", (PyCFunction)(void (*)(void))advance_impression, METH_FASTCALL,
     "advance_impression(ikey, state, old, swept, partition_swept, cfg, msgpack, policy): advance() of an "
     "impression on no state or a stub - (state, dues, [(kind, elapsed_ms, sample bytes)]) - or None (the Python "
     "core decides)"},
    {"advance_step", (PyCFunction)(void (*)(void))advance_step, METH_FASTCALL,
     "advance_step(ikey, old, raw, step, swept, partition_swept, cfg, msgpack, policy): advance() of a step's "
     "event alone in its batch - (changed, state, dues, samples, duplicate) - or None (the Python core decides)"},
    {"advance_groups", (PyCFunction)(void (*)(void))advance_groups, METH_FASTCALL,
     "advance_groups(keys, olds, groups, partition_swept, cfg, msgpack, policy, output, topic, out, delays): "
     "advance_impression / advance_step over each key's group of events in order while vouched for and taken - "
     "(puts, rest, kinds, duplicates); samples appended to out"},
    {"sweep_out", (PyCFunction)(void (*)(void))sweep_out, METH_FASTCALL,
     "sweep_out(keys, olds, prev, now, cfg, msgpack, policy, output, topic, out, delays): sweep_states with its "
     "samples appended to out - (visited, purges, reschedules, declined indexes, kinds)"},
    {"gather", (PyCFunction)(void (*)(void))gather, METH_FASTCALL,
     "gather(records, steps, pre, events, part, now, horizon, event_type): FunnelJoin.on_batch's pass over the "
     "records in fetch order - (groups, parts, counts, dead)"},
    {"murmur2", (PyCFunction)murmur2, METH_O, "murmur2(data): Kafka's murmur2 of data (unsigned 32-bit)"},
    {"store_put_many", (PyCFunction)(void (*)(void))store_put_many, METH_FASTCALL,
     "store_put_many(items, outbox, held, index): FaustTableStore.put_many's loop"},
    {"store_lookup", (PyCFunction)(void (*)(void))store_lookup, METH_FASTCALL,
     "store_lookup(keys, held, layers): FaustTableStore.get_many's in-memory part - (values, indexes to ask RocksDB)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "_fastjoin", "The join core's compiled common path (docs/joiner.md).", -1,
    module_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fastjoin(void) {
    if (PyType_Ready(&DueIndexType) < 0) return NULL;
    if (!(S_observe = PyUnicode_InternFromString("observe")) ||
        !(S_observe_many = PyUnicode_InternFromString("observe_many")) ||
        !(S_lane = PyUnicode_InternFromString("lane")) || !(S_swept = PyUnicode_InternFromString("swept")) ||
        !(S_wm = PyUnicode_InternFromString("wm")) ||
        !(S_impression_id = PyUnicode_InternFromString("impression_id")) ||
        !(S_event_time_ms = PyUnicode_InternFromString("event_time_ms")) ||
        !(S_encode = PyUnicode_InternFromString("encode")) || !(EMPTY_BYTES = PyBytes_FromStringAndSize(NULL, 0)))
        return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (!m) return NULL;
    Py_INCREF(&DueIndexType);
    if (PyModule_AddObject(m, "DueIndex", (PyObject *)&DueIndexType) < 0) {
        Py_DECREF(&DueIndexType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
