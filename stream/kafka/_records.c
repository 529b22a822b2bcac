/* The per-record work of the joiner's fetch path in C (docs/joiner.md, "Round 21"), each the twin
 * of the Python beside it (tests/unit/test_lean_fetch.py and tests/unit/test_faust_bulk.py compare
 * them):
 *
 * - lean_records: a record batch's records as LeanRecords (stream.kafka.lean_fetch: aiokafka's
 *   ConsumerRecord fields, in its order, as a tuple) - what aiokafka's PartitionRecords builds one
 *   dataclass and one generator step at a time.
 * - bulk_chunk: a span of a fetch's (tp, record) pairs as the join's (topic, partition, key, value,
 *   offset, behind) tuples and each topic partition's span of offsets (stream.kafka.faust_bulk).
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

/* bulk_chunk(pairs, start, end, highwaters): pairs[start:end] - (tp, record) in fetch order, tp a
   (topic, partition) tuple - as ([(topic, partition, key, value, offset, behind)], [(tp, first
   offset, last offset)]): behind is offset + 1 < highwaters[tp] (False where it is None), and a
   topic partition's span covers its records of the chunk (the caller hands over only partitions
   whose records are consecutive offsets), in the order of its first record. */
static PyObject *bulk_chunk(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4 || !PyList_Check(args[0]) || !PyDict_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError, "bulk_chunk(pairs: list, start, end, highwaters: dict)");
        return NULL;
    }
    PyObject *pairs = args[0], *hws = args[3];
    Py_ssize_t start = PyLong_AsSsize_t(args[1]), end = PyLong_AsSsize_t(args[2]);
    if ((start == -1 || end == -1) && PyErr_Occurred()) return NULL;
    if (start < 0) start = 0;
    if (end > PyList_GET_SIZE(pairs)) end = PyList_GET_SIZE(pairs);
    if (end < start) end = start;
    PyObject *batch = PyList_New(end - start);
    PyObject *spans = PyList_New(0);
    PyObject *open = PyDict_New(); /* tp -> its span (a list [tp, first, last]) */
    if (!batch || !spans || !open) goto fail;
    for (Py_ssize_t i = start; i < end; i++) {
        PyObject *pair = PyList_GET_ITEM(pairs, i);
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2 || !PyTuple_Check(PyTuple_GET_ITEM(pair, 0)) ||
            PyTuple_GET_SIZE(PyTuple_GET_ITEM(pair, 0)) != 2) {
            PyErr_SetString(PyExc_TypeError, "bulk_chunk: pairs of ((topic, partition), record)");
            goto fail;
        }
        PyObject *tp = PyTuple_GET_ITEM(pair, 0), *offset, *key, *value;
        if (record_fields(PyTuple_GET_ITEM(pair, 1), &offset, &key, &value) < 0) goto fail;
        long long off = PyLong_AsLongLong(offset);
        PyObject *hw = (off == -1 && PyErr_Occurred()) ? NULL : PyDict_GetItemWithError(hws, tp);
        int behind = 0;
        if (hw && hw != Py_None) {
            long long h = PyLong_AsLongLong(hw);
            if (h == -1 && PyErr_Occurred()) hw = NULL;
            behind = off + 1 < h;
        }
        if (!hw && PyErr_Occurred()) {
            Py_DECREF(offset);
            Py_DECREF(key);
            Py_DECREF(value);
            goto fail;
        }
        PyObject *topic = PyTuple_GET_ITEM(tp, 0), *partition = PyTuple_GET_ITEM(tp, 1);
        Py_INCREF(topic);
        Py_INCREF(partition);
        PyObject *b = behind ? Py_True : Py_False;
        Py_INCREF(b);
        Py_INCREF(offset);
        PyObject *t = PyTuple_New(6);
        if (!t) {
            Py_DECREF(topic);
            Py_DECREF(partition);
            Py_DECREF(b);
            Py_DECREF(offset);
            Py_DECREF(offset);
            Py_DECREF(key);
            Py_DECREF(value);
            goto fail;
        }
        PyTuple_SET_ITEM(t, 0, topic);
        PyTuple_SET_ITEM(t, 1, partition);
        PyTuple_SET_ITEM(t, 2, key);
        PyTuple_SET_ITEM(t, 3, value);
        PyTuple_SET_ITEM(t, 4, offset);
        PyTuple_SET_ITEM(t, 5, b);
        PyList_SET_ITEM(batch, i - start, t);
        PyObject *span = PyDict_GetItemWithError(open, tp); /* borrowed */
        if (span) {
            PyObject *old = PyList_GET_ITEM(span, 2);
            PyList_SET_ITEM(span, 2, offset); /* takes the extra reference */
            Py_DECREF(old);
        } else {
            if (PyErr_Occurred()) {
                Py_DECREF(offset);
                goto fail;
            }
            span = PyList_New(3);
            if (!span) {
                Py_DECREF(offset);
                goto fail;
            }
            Py_INCREF(tp);
            Py_INCREF(offset);
            PyList_SET_ITEM(span, 0, tp);
            PyList_SET_ITEM(span, 1, offset);
            PyList_SET_ITEM(span, 2, offset);
            int bad = PyDict_SetItem(open, tp, span) < 0 || PyList_Append(spans, span) < 0;
            Py_DECREF(span);
            if (bad) goto fail;
        }
    }
    for (Py_ssize_t j = 0; j < PyList_GET_SIZE(spans); j++) { /* each span as a tuple */
        PyObject *t = PyList_AsTuple(PyList_GET_ITEM(spans, j));
        if (!t) goto fail;
        PyList_SetItem(spans, j, t);
    }
    Py_DECREF(open);
    PyObject *r = PyTuple_Pack(2, batch, spans);
    Py_DECREF(batch);
    Py_DECREF(spans);
    return r;
fail:
    Py_XDECREF(batch);
    Py_XDECREF(spans);
    Py_XDECREF(open);
    return NULL;
}

static PyMethodDef module_methods[] = {
    {"lean_records", (PyCFunction)(void (*)(void))lean_records, METH_FASTCALL,
     "lean_records(batch, topic, partition, min_offset, cls): the batch's records from min_offset on as cls "
     "(aiokafka's ConsumerRecord fields, in its order)"},
    {"bulk_chunk", (PyCFunction)(void (*)(void))bulk_chunk, METH_FASTCALL,
     "bulk_chunk(pairs, start, end, highwaters): pairs[start:end] as the join's records and per topic partition "
     "(tp, first offset, last offset)"},
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
