/* The per-record work of the joiner's fetch path in C (docs/joiner.md, "Round 21"), each the twin
 * of the Python beside it (tests/unit/test_lean_fetch.py and tests/unit/test_faust_bulk.py compare
 * them):
 *
 * - lean_records: a record batch's records as LeanRecords (stream.kafka.lean_fetch: aiokafka's
 *   ConsumerRecord fields, in its order, as a tuple) - what aiokafka's PartitionRecords builds one
 *   dataclass and one generator step at a time.
 * - fetch_batches: a fetch's records in faust's round-robin order (stream.kafka.faust_bulk.fetch_order)
 *   as the join's (topic, partition, key, value, offset, behind) tuples, cut into batches, each
 *   with its topic partitions' spans of offsets (stream.kafka.faust_bulk).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define LEAN_FIELDS 11 /* topic, partition, offset, timestamp, timestamp_type, key, value, checksum,
                          serialized_key_size, serialized_value_size, headers */

static PyObject *S_offset, *S_timestamp, *S_timestamp_type, *S_key, *S_value, *S_checksum, *S_headers;

static PyObject *size_of(PyObject *o) {
    if (o == Py_None) return PyLong_FromLong(-1);
    Py_ssize_t n = PyBytes_Check(o) ? PyBytes_GET_SIZE(o) : PyObject_Size(o);
    return n < 0 ? NULL : PyLong_FromSsize_t(n);
}

/* lean_records(batch, topic, partition, min_offset, cls): the records of batch (an iterable of
   aiokafka's batch records) from min_offset on, each cls(topic, partition, offset, timestamp,
   timestamp_type, key, value, checksum, len(key) or -1, len(value) or -1, tuple(headers)) - cls a
   tuple type of eleven fields. */
static PyObject *lean_records(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5 || !PyType_Check(args[4]) || !PyType_IsSubtype((PyTypeObject *)args[4], &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "lean_records(batch, topic, partition, min_offset, cls: a tuple type)");
        return NULL;
    }
    PyObject *topic = args[1], *partition = args[2];
    long long min_offset = PyLong_AsLongLong(args[3]);
    if (min_offset == -1 && PyErr_Occurred()) return NULL;
    PyTypeObject *cls = (PyTypeObject *)args[4];
    PyObject *it = PyObject_GetIter(args[0]);
    if (!it) return NULL;
    PyObject *out = PyList_New(0);
    if (!out) {
        Py_DECREF(it);
        return NULL;
    }
    PyObject *rec;
    while ((rec = PyIter_Next(it))) {
        PyObject *f[LEAN_FIELDS] = {NULL};
        PyObject *item = NULL;
        f[2] = PyObject_GetAttr(rec, S_offset);
        if (!f[2]) goto fail;
        long long offset = PyLong_AsLongLong(f[2]);
        if (offset == -1 && PyErr_Occurred()) goto fail;
        if (offset < min_offset) { /* read already (a compressed message set's head): skipped, as aiokafka */
            Py_DECREF(f[2]);
            Py_DECREF(rec);
            continue;
        }
        if (!(f[3] = PyObject_GetAttr(rec, S_timestamp)) || !(f[4] = PyObject_GetAttr(rec, S_timestamp_type)) ||
            !(f[5] = PyObject_GetAttr(rec, S_key)) || !(f[6] = PyObject_GetAttr(rec, S_value)) ||
            !(f[7] = PyObject_GetAttr(rec, S_checksum)) || !(f[8] = size_of(f[5])) || !(f[9] = size_of(f[6])))
            goto fail;
        PyObject *headers = PyObject_GetAttr(rec, S_headers);
        if (!headers) goto fail;
        f[10] = PySequence_Tuple(headers);
        Py_DECREF(headers);
        if (!f[10]) goto fail;
        item = cls->tp_alloc(cls, LEAN_FIELDS);
        if (!item) goto fail;
        Py_INCREF(topic);
        Py_INCREF(partition);
        f[0] = topic;
        f[1] = partition;
        for (int j = 0; j < LEAN_FIELDS; j++) {
            PyTuple_SET_ITEM(item, j, f[j]); /* the item owns them now */
            f[j] = NULL;
        }
        Py_DECREF(rec);
        if (PyList_Append(out, item) < 0) {
            Py_DECREF(item);
            Py_DECREF(it);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(item);
        continue;
    fail:
        for (int j = 0; j < LEAN_FIELDS; j++) Py_XDECREF(f[j]);
        Py_DECREF(rec);
        Py_DECREF(it);
        Py_DECREF(out);
        return NULL;
    }
    Py_DECREF(it);
    if (PyErr_Occurred()) {
        Py_DECREF(out);
        return NULL;
    }
    return out;
}

/* a record's offset, key and value (new references): a LeanRecord's by position, anything else's
   (aiokafka's ConsumerRecord) by name */
static int record_fields(PyObject *rec, PyObject **offset, PyObject **key, PyObject **value) {
    if (PyTuple_Check(rec) && PyTuple_GET_SIZE(rec) == LEAN_FIELDS) {
        *offset = PyTuple_GET_ITEM(rec, 2);
        *key = PyTuple_GET_ITEM(rec, 5);
        *value = PyTuple_GET_ITEM(rec, 6);
        Py_INCREF(*offset);
        Py_INCREF(*key);
        Py_INCREF(*value);
        return 0;
    }
    *offset = PyObject_GetAttr(rec, S_offset);
    *key = *offset ? PyObject_GetAttr(rec, S_key) : NULL;
    *value = *key ? PyObject_GetAttr(rec, S_value) : NULL;
    if (*value) return 0;
    Py_XDECREF(*offset);
    Py_XDECREF(*key);
    return -1;
}

/* a batch being built: the join's records and their spans (open: tp -> its span, a list) */
typedef struct {
    PyObject *batch, *spans, *open;
} Chunk;

static int chunk_init(Chunk *c) {
    c->batch = PyList_New(0);
    c->spans = PyList_New(0);
    c->open = PyDict_New();
    return c->batch && c->spans && c->open ? 0 : -1;
}

static void chunk_clear(Chunk *c) {
    Py_CLEAR(c->batch);
    Py_CLEAR(c->spans);
    Py_CLEAR(c->open);
}

/* append rec of tp (a (topic, partition) tuple) to the chunk: its join record and its span */
static int chunk_add(Chunk *c, PyObject *tp, PyObject *rec, PyObject *hws) {
    if (!PyTuple_Check(tp) || PyTuple_GET_SIZE(tp) != 2) {
        PyErr_SetString(PyExc_TypeError, "a topic partition is a (topic, partition) tuple");
        return -1;
    }
    PyObject *offset, *key, *value;
    if (record_fields(rec, &offset, &key, &value) < 0) return -1;
    long long off = PyLong_AsLongLong(offset);
    int behind = 0;
    PyObject *hw = (off == -1 && PyErr_Occurred()) ? NULL : PyDict_GetItemWithError(hws, tp);
    if (hw && hw != Py_None) {
        long long h = PyLong_AsLongLong(hw);
        if (h == -1 && PyErr_Occurred()) hw = NULL;
        behind = off + 1 < h;
    }
    if (!hw && PyErr_Occurred()) {
        Py_DECREF(offset);
        Py_DECREF(key);
        Py_DECREF(value);
        return -1;
    }
    PyObject *t = PyTuple_New(6);
    if (!t) {
        Py_DECREF(offset);
        Py_DECREF(key);
        Py_DECREF(value);
        return -1;
    }
    PyObject *topic = PyTuple_GET_ITEM(tp, 0), *partition = PyTuple_GET_ITEM(tp, 1), *b = behind ? Py_True : Py_False;
    Py_INCREF(topic);
    Py_INCREF(partition);
    Py_INCREF(b);
    Py_INCREF(offset); /* one for the record, one kept for the span */
    PyTuple_SET_ITEM(t, 0, topic);
    PyTuple_SET_ITEM(t, 1, partition);
    PyTuple_SET_ITEM(t, 2, key);
    PyTuple_SET_ITEM(t, 3, value);
    PyTuple_SET_ITEM(t, 4, offset);
    PyTuple_SET_ITEM(t, 5, b);
    int bad = PyList_Append(c->batch, t) < 0;
    Py_DECREF(t);
    if (bad) {
        Py_DECREF(offset);
        return -1;
    }
    PyObject *span = PyDict_GetItemWithError(c->open, tp); /* borrowed */
    if (span) {
        PyObject *old = PyList_GET_ITEM(span, 2);
        PyList_SET_ITEM(span, 2, offset); /* takes the kept reference */
        Py_DECREF(old);
        return 0;
    }
    if (PyErr_Occurred() || !(span = PyList_New(3))) {
        Py_DECREF(offset);
        return -1;
    }
    Py_INCREF(tp);
    Py_INCREF(offset);
    PyList_SET_ITEM(span, 0, tp);
    PyList_SET_ITEM(span, 1, offset);
    PyList_SET_ITEM(span, 2, offset);
    bad = PyDict_SetItem(c->open, tp, span) < 0 || PyList_Append(c->spans, span) < 0;
    Py_DECREF(span);
    return bad ? -1 : 0;
}

/* the chunk as (batch, spans), each span a tuple; the chunk is cleared */
static PyObject *chunk_take(Chunk *c) {
    PyObject *r = NULL;
    for (Py_ssize_t j = 0; j < PyList_GET_SIZE(c->spans); j++) {
        PyObject *t = PyList_AsTuple(PyList_GET_ITEM(c->spans, j));
        if (!t) goto done;
        PyList_SetItem(c->spans, j, t);
    }
    r = PyTuple_Pack(2, c->batch, c->spans);
done:
    chunk_clear(c);
    return r;
}

/* fetch_batches(records, highwaters, first, size): the records of a fetch - {tp: [record]}, tp a
   (topic, partition) tuple - in the order of faust's DefaultSchedulingStrategy (round robin over
   the topics in the order they first appear, each topic's turn taking its partitions round robin;
   stream.kafka.faust_bulk.fetch_order), cut into batches of first records, then of size each:
   [(records, spans)], records as the join reads them - (topic, partition, key, value, offset,
   behind), behind being offset + 1 < highwaters[tp] (False where it is None) - and per topic
   partition of the batch, in the order of its first record, (tp, first offset, last offset): the
   caller hands over only partitions whose records are consecutive offsets. */
typedef struct {
    Py_ssize_t first, n; /* its partitions: parts[first:first + n] */
    Py_ssize_t round, next; /* the inner round robin: the round, and the next partition in it */
    Py_ssize_t rounds;      /* its longest partition's length */
} Topic;

typedef struct {
    PyObject *tp, *recs; /* borrowed (the dict holds them) */
    Py_ssize_t len;
} Part;

static PyObject *fetch_batches(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4 || !PyDict_Check(args[0]) || !PyDict_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "fetch_batches(records: dict, highwaters: dict, first, size)");
        return NULL;
    }
    PyObject *records = args[0], *hws = args[1];
    Py_ssize_t first = PyLong_AsSsize_t(args[2]), size = PyLong_AsSsize_t(args[3]);
    if ((first == -1 || size == -1) && PyErr_Occurred()) return NULL;
    if (size < 1 || first < 1) {
        PyErr_SetString(PyExc_ValueError, "fetch_batches: batches of at least one record");
        return NULL;
    }
    Py_ssize_t np = PyDict_GET_SIZE(records), nt = 0;
    Part *parts = PyMem_Calloc(np ? np : 1, sizeof(Part));
    Topic *topics = PyMem_Calloc(np ? np : 1, sizeof(Topic));
    Py_ssize_t *order = PyMem_Calloc(np ? np : 1, sizeof(Py_ssize_t)); /* parts grouped by topic */
    PyObject **names = PyMem_Calloc(np ? np : 1, sizeof(PyObject *));
    PyObject *out = PyList_New(0);
    Chunk c = {NULL, NULL, NULL};
    if (!parts || !topics || !order || !names || !out) goto fail;
    /* the topics in the order they first appear, each with its partitions in their order */
    Py_ssize_t pos = 0, i = 0;
    PyObject *tp, *recs;
    while (PyDict_Next(records, &pos, &tp, &recs)) {
        if (!PyTuple_Check(tp) || PyTuple_GET_SIZE(tp) != 2 || !PyList_Check(recs)) {
            PyErr_SetString(PyExc_TypeError, "fetch_batches: {(topic, partition): [record]}");
            goto fail;
        }
        parts[i].tp = tp;
        parts[i].recs = recs;
        parts[i].len = PyList_GET_SIZE(recs);
        PyObject *name = PyTuple_GET_ITEM(tp, 0);
        Py_ssize_t t = 0;
        for (; t < nt; t++) {
            int eq = names[t] == name ? 1 : PyObject_RichCompareBool(names[t], name, Py_EQ);
            if (eq < 0) goto fail;
            if (eq) break;
        }
        if (t == nt) {
            names[nt] = name;
            topics[nt].n = 0;
            nt++;
        }
        topics[t].n++;
        i++;
    }
    /* parts grouped by topic (stable): each topic's partitions in their order */
    Py_ssize_t at = 0;
    for (Py_ssize_t t = 0; t < nt; t++) {
        topics[t].first = at;
        Py_ssize_t k = 0;
        for (Py_ssize_t j = 0; j < np && k < topics[t].n; j++) {
            PyObject *name = PyTuple_GET_ITEM(parts[j].tp, 0);
            int eq = names[t] == name ? 1 : PyObject_RichCompareBool(names[t], name, Py_EQ);
            if (eq < 0) goto fail;
            if (eq) {
                order[at++] = j;
                k++;
                if (parts[j].len > topics[t].rounds) topics[t].rounds = parts[j].len;
            }
        }
    }
    /* the outer round robin: each live topic in turn gives its next record */
    Py_ssize_t live = 0, in_chunk = 0, limit = first;
    for (Py_ssize_t t = 0; t < nt; t++) live += topics[t].rounds > 0;
    while (live) {
        for (Py_ssize_t t = 0; t < nt; t++) {
            Topic *top = &topics[t];
            if (top->round >= top->rounds) continue;
            /* its inner round robin: the next partition with a record in this round */
            Part *part = NULL;
            while (!part) {
                if (top->next >= top->n) {
                    top->next = 0;
                    top->round++;
                    if (top->round >= top->rounds) break;
                }
                Part *cand = &parts[order[top->first + top->next++]];
                if (cand->len > top->round) part = cand;
            }
            if (!part) { /* this topic ran out */
                live--;
                continue;
            }
            if (!c.batch && chunk_init(&c) < 0) goto fail;
            if (chunk_add(&c, part->tp, PyList_GET_ITEM(part->recs, top->round), hws) < 0) goto fail;
            if (++in_chunk == limit) {
                PyObject *done = chunk_take(&c);
                if (!done) goto fail;
                int bad = PyList_Append(out, done) < 0;
                Py_DECREF(done);
                if (bad) goto fail;
                in_chunk = 0;
                limit = size;
            }
        }
    }
    if (c.batch && in_chunk) {
        PyObject *done = chunk_take(&c);
        if (!done) goto fail;
        int bad = PyList_Append(out, done) < 0;
        Py_DECREF(done);
        if (bad) goto fail;
    }
    chunk_clear(&c);
    PyMem_Free(parts);
    PyMem_Free(topics);
    PyMem_Free(order);
    PyMem_Free(names);
    return out;
fail:
    chunk_clear(&c);
    PyMem_Free(parts);
    PyMem_Free(topics);
    PyMem_Free(order);
    PyMem_Free(names);
    Py_XDECREF(out);
    return NULL;
}

/* ------------------------------------------------------------------------------------------ */
/* RecordBatchWriter: aiokafka's DefaultRecordBatchBuilder (magic 2, no compression) for the
   joiner's producer: the same bytes, its CRC computed by the crc32c package (hardware CRC32C where
   the CPU has it; aiokafka's own is a software one) once per batch, and append_many for a run of
   records of one partition. */

#define HEADER_SIZE 61   /* baseOffset .. recordCount */
#define ATTRIBUTES_AT 21 /* the CRC covers the batch from here */
#define CRC_AT 17

typedef struct {
    PyObject_HEAD
    PyObject *ba; /* the batch's bytearray (handed over by build) */
    char *buf;    /* its bytes */
    Py_ssize_t len, cap, batch_size;
    int64_t first_ts, max_ts, last_offset, producer_id;
    int32_t num_records, base_sequence;
    int16_t producer_epoch;
    int has_first, transactional, built;
} WriterObject;

static PyObject *crc32c_func, *time_func; /* crc32c.crc32c, time.time */

/* room for more bytes: the bytearray grown (doubling), len kept as what is written */
static int w_reserve(WriterObject *w, Py_ssize_t more) {
    if (w->len + more <= w->cap) return 0;
    Py_ssize_t cap = w->cap ? w->cap : 4096;
    while (cap < w->len + more) cap *= 2;
    if (PyByteArray_Resize(w->ba, cap) < 0) return -1;
    w->buf = PyByteArray_AS_STRING(w->ba);
    w->cap = cap;
    return 0;
}

static int varint_size(int64_t v) {
    uint64_t z = ((uint64_t)v << 1) ^ (uint64_t)(v >> 63);
    int n = 1;
    while (z >= 0x80) {
        z >>= 7;
        n++;
    }
    return n;
}

static char *put_varint(char *p, int64_t v) {
    uint64_t z = ((uint64_t)v << 1) ^ (uint64_t)(v >> 63);
    while (z >= 0x80) {
        *p++ = (char)((z & 0x7f) | 0x80);
        z >>= 7;
    }
    *p++ = (char)z;
    return p;
}

/* bytes-like views of key and value (None: absent) */
static int view_of(PyObject *o, Py_buffer *v, const char *what) {
    if (o == Py_None) {
        v->obj = NULL;
        v->buf = NULL;
        v->len = -1;
        return 0;
    }
    if (!PyBytes_Check(o) && !PyByteArray_Check(o) && !PyMemoryView_Check(o)) {
        PyErr_Format(PyExc_TypeError, "Not supported type for %s: %s", what, Py_TYPE(o)->tp_name);
        return -1;
    }
    return PyObject_GetBuffer(o, v, PyBUF_SIMPLE);
}

/* one record: 1 appended, 0 the batch is full (nothing written), -1 an error */
static int w_append(WriterObject *w, int64_t offset, int64_t ts, PyObject *key, PyObject *value, PyObject *headers) {
    if (w->built) {
        PyErr_SetString(PyExc_RuntimeError, "the batch is built already");
        return -1;
    }
    Py_buffer kv, vv;
    if (view_of(key, &kv, "key") < 0) return -1;
    if (view_of(value, &vv, "value") < 0) {
        if (kv.obj) PyBuffer_Release(&kv);
        return -1;
    }
    Py_ssize_t nh = 0;
    PyObject *hs = NULL;
    int r = -1;
    if (headers != Py_None) {
        hs = PySequence_Fast(headers, "headers are a sequence of (str, bytes or None)");
        if (!hs) goto done;
        nh = PySequence_Fast_GET_SIZE(hs);
    }
    int first = !w->has_first;
    int64_t delta = first ? 0 : ts - w->first_ts;
    Py_ssize_t body = 1 + varint_size(delta) + varint_size(offset) + varint_size(kv.len) + (kv.len > 0 ? kv.len : 0) +
                      varint_size(vv.len) + (vv.len > 0 ? vv.len : 0) + varint_size(nh);
    for (Py_ssize_t i = 0; i < nh; i++) {
        PyObject *h = PySequence_Fast_GET_ITEM(hs, i);
        if (!PyTuple_Check(h) || PyTuple_GET_SIZE(h) != 2 || !PyUnicode_Check(PyTuple_GET_ITEM(h, 0))) {
            PyErr_SetString(PyExc_TypeError, "a header is a (str, bytes or None) tuple");
            goto done;
        }
        Py_ssize_t kl;
        if (!PyUnicode_AsUTF8AndSize(PyTuple_GET_ITEM(h, 0), &kl)) goto done;
        PyObject *hv = PyTuple_GET_ITEM(h, 1);
        if (hv != Py_None && !PyBytes_Check(hv)) {
            PyErr_SetString(PyExc_TypeError, "a header's value is bytes or None");
            goto done;
        }
        Py_ssize_t vl = hv == Py_None ? -1 : PyBytes_GET_SIZE(hv);
        body += varint_size(kl) + kl + varint_size(vl) + (vl > 0 ? vl : 0);
    }
    Py_ssize_t required = body + varint_size(body);
    if (!first && required + w->len > w->batch_size) {
        r = 0;
        goto done;
    }
    if (w_reserve(w, required) < 0) goto done;
    char *p = w->buf + w->len;
    p = put_varint(p, body);
    *p++ = 0; /* attributes */
    p = put_varint(p, delta);
    p = put_varint(p, offset);
    p = put_varint(p, kv.len);
    if (kv.len > 0) {
        memcpy(p, kv.buf, kv.len);
        p += kv.len;
    }
    p = put_varint(p, vv.len);
    if (vv.len > 0) {
        memcpy(p, vv.buf, vv.len);
        p += vv.len;
    }
    p = put_varint(p, nh);
    for (Py_ssize_t i = 0; i < nh; i++) {
        PyObject *h = PySequence_Fast_GET_ITEM(hs, i);
        Py_ssize_t kl;
        const char *k = PyUnicode_AsUTF8AndSize(PyTuple_GET_ITEM(h, 0), &kl);
        p = put_varint(p, kl);
        memcpy(p, k, kl);
        p += kl;
        PyObject *hv = PyTuple_GET_ITEM(h, 1);
        Py_ssize_t vl = hv == Py_None ? -1 : PyBytes_GET_SIZE(hv);
        p = put_varint(p, vl);
        if (vl > 0) {
            memcpy(p, PyBytes_AS_STRING(hv), vl);
            p += vl;
        }
    }
    w->len = p - w->buf;
    if (first) {
        w->first_ts = w->max_ts = ts;
        w->has_first = 1;
    } else if (ts > w->max_ts) {
        w->max_ts = ts;
    }
    w->num_records++;
    w->last_offset = offset;
    r = 1;
done:
    Py_XDECREF(hs);
    if (kv.obj) PyBuffer_Release(&kv);
    if (vv.obj) PyBuffer_Release(&vv);
    return r;
}

static int as_i64(PyObject *o, int64_t *out, const char *what) {
    if (!PyLong_CheckExact(o)) {
        PyErr_Format(PyExc_TypeError, "%s: an int, not %s", what, Py_TYPE(o)->tp_name);
        return -1;
    }
    long long v = PyLong_AsLongLong(o);
    if (v == -1 && PyErr_Occurred()) return -1;
    *out = v;
    return 0;
}

/* append(offset, timestamp, key, value, headers): True, or None when the batch is full */
static PyObject *Writer_append(WriterObject *w, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "append(offset, timestamp, key, value, headers)");
        return NULL;
    }
    int64_t offset, ts;
    if (as_i64(args[0], &offset, "offset") < 0) return NULL;
    if (args[1] == Py_None) { /* now, as aiokafka stamps it */
        PyObject *now = PyObject_CallNoArgs(time_func);
        if (!now) return NULL;
        double t = PyFloat_AsDouble(now);
        Py_DECREF(now);
        if (t == -1.0 && PyErr_Occurred()) return NULL;
        ts = (int64_t)(t * 1000);
    } else if (as_i64(args[1], &ts, "timestamp") < 0) {
        return NULL;
    }
    int r = w_append(w, offset, ts, args[2], args[3], args[4]);
    if (r < 0) return NULL;
    if (!r) Py_RETURN_NONE;
    Py_RETURN_TRUE;
}

/* append_many(first_offset, timestamp, records, start): records[start:] - (key, value) pairs, no
   headers - at offsets first_offset, first_offset + 1, ... while they fit; how many went in */
static PyObject *Writer_append_many(WriterObject *w, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4 || !PyList_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "append_many(first_offset, timestamp, records: list, start)");
        return NULL;
    }
    int64_t offset, ts;
    if (as_i64(args[0], &offset, "offset") < 0 || as_i64(args[1], &ts, "timestamp") < 0) return NULL;
    Py_ssize_t start = PyLong_AsSsize_t(args[3]);
    if (start == -1 && PyErr_Occurred()) return NULL;
    PyObject *records = args[2];
    Py_ssize_t n = 0;
    for (Py_ssize_t i = start < 0 ? 0 : start; i < PyList_GET_SIZE(records); i++, n++) {
        PyObject *kv = PyList_GET_ITEM(records, i);
        if (!PyTuple_Check(kv) || PyTuple_GET_SIZE(kv) != 2) {
            PyErr_SetString(PyExc_TypeError, "append_many: (key, value) pairs");
            return NULL;
        }
        int r = w_append(w, offset + n, ts, PyTuple_GET_ITEM(kv, 0), PyTuple_GET_ITEM(kv, 1), Py_None);
        if (r < 0) return NULL;
        if (!r) break;
    }
    return PyLong_FromSsize_t(n);
}

static void put_be(char *p, uint64_t v, int n) {
    for (int i = n - 1; i >= 0; i--) {
        p[i] = (char)(v & 0xff);
        v >>= 8;
    }
}

/* build(): the batch as a bytearray, its header and CRC written; once */
static PyObject *Writer_build(WriterObject *w, PyObject *Py_UNUSED(ignored)) {
    if (w->built) {
        PyErr_SetString(PyExc_RuntimeError, "the batch is built already");
        return NULL;
    }
    char *h = w->buf;
    put_be(h, 0, 8);                                          /* baseOffset: the broker's */
    put_be(h + 8, (uint64_t)(w->len - 12), 4);               /* batchLength: from here on */
    put_be(h + 12, (uint64_t)(int64_t)-1, 4);                /* partitionLeaderEpoch: none */
    h[16] = 2;                                                /* magic */
    put_be(h + 21, w->transactional ? 0x10 : 0, 2);          /* attributes */
    put_be(h + 23, (uint64_t)w->last_offset, 4);             /* lastOffsetDelta */
    put_be(h + 27, (uint64_t)(w->has_first ? w->first_ts : 0), 8);
    put_be(h + 35, (uint64_t)(w->has_first ? w->max_ts : 0), 8);
    put_be(h + 43, (uint64_t)w->producer_id, 8);
    put_be(h + 51, (uint64_t)(int64_t)w->producer_epoch, 2);
    put_be(h + 53, (uint64_t)(int64_t)w->base_sequence, 4);
    put_be(h + 57, (uint64_t)w->num_records, 4);
    PyObject *view = PyMemoryView_FromMemory(h + ATTRIBUTES_AT, w->len - ATTRIBUTES_AT, PyBUF_READ);
    if (!view) return NULL;
    PyObject *crc = PyObject_CallOneArg(crc32c_func, view);
    Py_DECREF(view);
    if (!crc) return NULL;
    unsigned long c = PyLong_AsUnsignedLong(crc);
    Py_DECREF(crc);
    if (c == (unsigned long)-1 && PyErr_Occurred()) return NULL;
    put_be(h + CRC_AT, c, 4);
    w->built = 1;
    if (PyByteArray_Resize(w->ba, w->len) < 0) return NULL;
    w->buf = NULL;
    w->cap = 0;
    PyObject *out = w->ba;
    w->ba = NULL;
    return out;
}

static PyObject *Writer_size(WriterObject *w, PyObject *Py_UNUSED(ignored)) { return PyLong_FromSsize_t(w->len); }

static PyObject *Writer_set_producer_state(WriterObject *w, PyObject *args) {
    long long pid;
    int epoch, seq;
    if (!PyArg_ParseTuple(args, "Lii", &pid, &epoch, &seq)) return NULL;
    w->producer_id = pid;
    w->producer_epoch = (int16_t)epoch;
    w->base_sequence = seq;
    Py_RETURN_NONE;
}

static PyObject *Writer_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"batch_size", "is_transactional", NULL};
    Py_ssize_t batch_size;
    int transactional = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "n|p", kwlist, &batch_size, &transactional)) return NULL;
    WriterObject *w = (WriterObject *)type->tp_alloc(type, 0);
    if (!w) return NULL;
    w->batch_size = batch_size;
    w->transactional = transactional;
    w->producer_id = -1;
    w->producer_epoch = -1;
    w->base_sequence = 0; /* aiokafka's BatchBuilder gives its builder base_sequence=0 */
    if (!(w->ba = PyByteArray_FromStringAndSize(NULL, 0)) || w_reserve(w, HEADER_SIZE) < 0) {
        Py_DECREF(w);
        return NULL;
    }
    memset(w->buf, 0, HEADER_SIZE);
    w->len = HEADER_SIZE;
    return (PyObject *)w;
}

static void Writer_dealloc(WriterObject *w) {
    Py_XDECREF(w->ba);
    Py_TYPE(w)->tp_free((PyObject *)w);
}

static PyMethodDef Writer_methods[] = {
    {"append", (PyCFunction)(void (*)(void))Writer_append, METH_FASTCALL,
     "append(offset, timestamp, key, value, headers): True, or None when the batch is full"},
    {"append_many", (PyCFunction)(void (*)(void))Writer_append_many, METH_FASTCALL,
     "append_many(first_offset, timestamp, records, start): records[start:] while they fit; how many went in"},
    {"build", (PyCFunction)Writer_build, METH_NOARGS, "build(): the record batch (bytearray), once"},
    {"size", (PyCFunction)Writer_size, METH_NOARGS, "size(): bytes written so far"},
    {"set_producer_state", (PyCFunction)Writer_set_producer_state, METH_VARARGS,
     "set_producer_state(producer_id, producer_epoch, base_sequence)"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject WriterType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "stream.kafka._records.RecordBatchWriter",
    .tp_basicsize = sizeof(WriterObject),
    .tp_dealloc = (destructor)Writer_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "RecordBatchWriter(batch_size, is_transactional=False): aiokafka's DefaultRecordBatchBuilder "
              "(magic 2, no compression), its CRC by the crc32c package",
    .tp_methods = Writer_methods,
    .tp_new = Writer_new,
};

static PyMethodDef module_methods[] = {
    {"lean_records", (PyCFunction)(void (*)(void))lean_records, METH_FASTCALL,
     "lean_records(batch, topic, partition, min_offset, cls): the batch's records from min_offset on as cls "
     "(aiokafka's ConsumerRecord fields, in its order)"},
    {"fetch_batches", (PyCFunction)(void (*)(void))fetch_batches, METH_FASTCALL,
     "fetch_batches(records, highwaters, first, size): a fetch's records in faust's round-robin order as the join's "
     "records, in batches of first, then size records, each with its partitions' spans of offsets"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "_records", "The joiner's fetch path, per record, in C (docs/joiner.md).", -1,
    module_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__records(void) {
    if (!(S_offset = PyUnicode_InternFromString("offset")) ||
        !(S_timestamp = PyUnicode_InternFromString("timestamp")) ||
        !(S_timestamp_type = PyUnicode_InternFromString("timestamp_type")) ||
        !(S_key = PyUnicode_InternFromString("key")) || !(S_value = PyUnicode_InternFromString("value")) ||
        !(S_checksum = PyUnicode_InternFromString("checksum")) ||
        !(S_headers = PyUnicode_InternFromString("headers")))
        return NULL;
    if (PyType_Ready(&WriterType) < 0) return NULL;
    PyObject *crc32c = PyImport_ImportModule("crc32c");
    if (!crc32c) return NULL;
    crc32c_func = PyObject_GetAttrString(crc32c, "crc32c");
    Py_DECREF(crc32c);
    if (!crc32c_func) return NULL;
    PyObject *time_mod = PyImport_ImportModule("time");
    if (!time_mod) return NULL;
    time_func = PyObject_GetAttrString(time_mod, "time");
    Py_DECREF(time_mod);
    if (!time_func) return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (!m) return NULL;
    Py_INCREF(&WriterType);
    if (PyModule_AddObject(m, "RecordBatchWriter", (PyObject *)&WriterType) < 0) {
        Py_DECREF(&WriterType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
