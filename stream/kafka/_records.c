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

static PyMethodDef module_methods[] = {
    {"lean_records", (PyCFunction)(void (*)(void))lean_records, METH_FASTCALL,
     "lean_records(batch, topic, partition, min_offset, cls): the batch's records from min_offset on as cls "
     "(aiokafka's ConsumerRecord fields, in its order)"},
    {"fetch_batches", (PyCFunction)(void (*)(void))fetch_batches, METH_FASTCALL,
     "fetch_batches(records, highwaters, first, size): a fetch's records in faust's round-robin order, in batches "
     "of first, then size records, each as bulk_chunk makes it"},
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
    return PyModule_Create(&moduledef);
}
