/* The per-frame scans and framing of relay.session.codec and relay.session.frames, in C.
 *
 * Each function here is a line-for-line port of a Python function kept as its reference
 * (named in its comment); tests/unit/test_accel.py checks that both give the same answer on
 * the layouts, on their near misses and on random bytes. What it saves is the interpreter:
 * the Python versions make ten to fifteen method calls a frame, about 100 ns each on this
 * machine; each function here is one call.
 *
 * The functions keep no reference and write outside no buffer they did not allocate: the
 * inputs are read-only `bytes`, every read is bounded by their length. The one type, `Lane`
 * (a direction's fast path: relay/session/lane.py), holds the two dicts of the meter it
 * counts into, and its own delay buckets.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static const char APPEND_COMPACT[] = "{\"type\":\"input_audio_buffer.append\",\"audio\":\"";
static const char APPEND_SPACED[] = "{\"type\": \"input_audio_buffer.append\", \"audio\": \"";

/* Appends with an event id: a head, the id's value, then a fixed middle (codec._ID_APPENDS). */
static const char *const ID_HEADS[4] = {
    "{\"event_id\": \"",
    "{\"event_id\":\"",
    "{\"type\":\"input_audio_buffer.append\",\"event_id\":\"",
    "{\"type\": \"input_audio_buffer.append\", \"event_id\": \"",
};
static const char *const ID_MIDDLES[4] = {
    "\", \"type\": \"input_audio_buffer.append\", \"audio\": \"",
    "\",\"type\":\"input_audio_buffer.append\",\"audio\":\"",
    "\",\"audio\":\"",
    "\", \"audio\": \"",
};

static const char DELTA_KEY[] = "\"delta\":\"";

static int
starts_with(const char *data, Py_ssize_t size, Py_ssize_t at, const char *prefix)
{
    size_t n = strlen(prefix);
    return at >= 0 && at <= size && (size_t)(size - at) >= n && memcmp(data + at, prefix, n) == 0;
}

/* bytes.find(b'"', start): the index of the first quote at or after start, or -1. */
static Py_ssize_t
find_quote(const char *data, Py_ssize_t size, Py_ssize_t start)
{
    if (start < 0 || start >= size)
        return -1;
    const char *hit = memchr(data + start, '"', (size_t)(size - start));
    return hit == NULL ? -1 : hit - data;
}

/* codec._span_size: decoded bytes of the base64 in data[start:end]. */
static Py_ssize_t
span_size(const char *data, Py_ssize_t start, Py_ssize_t end)
{
    if (end <= start)
        return 0;
    Py_ssize_t padding = (data[end - 1] == '=') + (end - 2 >= start && data[end - 2] == '=');
    Py_ssize_t size = (end - start) * 3 / 4 - padding;
    return size > 0 ? size : 0; /* "=" alone is not -1 bytes */
}

/* codec._audio_to_the_end: the audio string starts at `start` and is the frame's last value,
 * in a frame without a backslash; its decoded size, or -1. */
static Py_ssize_t
audio_to_the_end(const char *data, Py_ssize_t size, Py_ssize_t start)
{
    Py_ssize_t end = size - 2;
    if (find_quote(data, size, start) != end)
        return -1;
    if (size < 2 || data[size - 2] != '"' || data[size - 1] != '}')
        return -1;
    if (memchr(data, '\\', (size_t)size) != NULL)
        return -1;
    return span_size(data, start, end);
}

/* codec._fixed_append_size */
static Py_ssize_t
fixed_append(const char *data, Py_ssize_t size)
{
    if (starts_with(data, size, 0, APPEND_COMPACT))
        return audio_to_the_end(data, size, sizeof(APPEND_COMPACT) - 1);
    if (starts_with(data, size, 0, APPEND_SPACED))
        return audio_to_the_end(data, size, sizeof(APPEND_SPACED) - 1);
    for (int i = 0; i < 4; i++) {
        if (!starts_with(data, size, 0, ID_HEADS[i]))
            continue;
        Py_ssize_t id_end = find_quote(data, size, (Py_ssize_t)strlen(ID_HEADS[i]));
        if (id_end == -1 || !starts_with(data, size, id_end, ID_MIDDLES[i]))
            return -1;
        return audio_to_the_end(data, size, id_end + (Py_ssize_t)strlen(ID_MIDDLES[i]));
    }
    return -1;
}

/* codec._delta_to_the_end */
static Py_ssize_t
delta_end(const char *data, Py_ssize_t size)
{
    Py_ssize_t key = sizeof(DELTA_KEY) - 1;
    const char *hit = NULL;
    /* bytes.find(DELTA_KEY): each quote in turn, until one starts the key. */
    for (Py_ssize_t at = 0; at + key <= size; at++) {
        const char *quote = memchr(data + at, '"', (size_t)(size - at));
        if (quote == NULL || (quote - data) + key > size)
            break;
        if (memcmp(quote, DELTA_KEY, (size_t)key) == 0) {
            hit = quote;
            break;
        }
        at = quote - data;
    }
    if (hit == NULL)
        return -1;
    Py_ssize_t start = (hit - data) + key;
    Py_ssize_t end = size - 2;
    if (find_quote(data, size, start) != end || data[size - 2] != '"' || data[size - 1] != '}')
        return -1;
    return span_size(data, start, end);
}

/* A scan of a bytes object, as a Python int. */
static PyObject *
scan_bytes(PyObject *frame, Py_ssize_t (*scan)(const char *, Py_ssize_t), const char *name)
{
    if (!PyBytes_Check(frame)) {
        PyErr_Format(PyExc_TypeError, "%s takes bytes", name);
        return NULL;
    }
    return PyLong_FromSsize_t(scan(PyBytes_AS_STRING(frame), PyBytes_GET_SIZE(frame)));
}

static PyObject *
fixed_append_size(PyObject *Py_UNUSED(module), PyObject *frame)
{
    return scan_bytes(frame, fixed_append, "fixed_append_size");
}

static PyObject *
delta_to_the_end(PyObject *Py_UNUSED(module), PyObject *frame)
{
    return scan_bytes(frame, delta_end, "delta_to_the_end");
}

/* dst[i] = src[i] ^ key[(offset + i) % 4] (RFC 6455 5.3: `offset` is where src starts in
 * the payload), eight bytes at a time with the key repeated. */
static void
xor_mask(unsigned char *dst, const unsigned char *src, Py_ssize_t length,
         const unsigned char key[4], Py_ssize_t offset)
{
    unsigned char repeated[8];
    for (int i = 0; i < 8; i++)
        repeated[i] = key[(offset + i) & 3];
    uint64_t wide;
    memcpy(&wide, repeated, 8);
    Py_ssize_t i = 0;
    for (; i + 8 <= length; i += 8) {
        uint64_t chunk;
        memcpy(&chunk, src + i, 8);
        chunk ^= wide;
        memcpy(dst + i, &chunk, 8);
    }
    for (; i < length; i++)
        dst[i] = src[i] ^ key[(offset + i) & 3];
}

/* frames._text_frame: one RFC 6455 text frame (FIN set) holding `payload`, masked with the
 * 4-byte key `mask` (big-endian, as aiohttp packs it) when `masked` is true. */
static PyObject *
text_frame(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyBytes_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "text_frame(payload: bytes, masked: bool, mask: int)");
        return NULL;
    }
    int masked = PyObject_IsTrue(args[1]);
    if (masked < 0)
        return NULL;
    unsigned long key = 0;
    if (masked) {
        key = PyLong_AsUnsignedLongMask(args[2]);
        if (key == (unsigned long)-1 && PyErr_Occurred())
            return NULL;
    }
    const char *payload = PyBytes_AS_STRING(args[0]);
    Py_ssize_t length = PyBytes_GET_SIZE(args[0]);
    unsigned char head[14];
    Py_ssize_t head_size;
    unsigned char flag = masked ? 0x80 : 0;
    head[0] = 0x81;
    if (length < 126) {
        head[1] = flag | (unsigned char)length;
        head_size = 2;
    } else if (length < 65536) {
        head[1] = flag | 126;
        head[2] = (unsigned char)(length >> 8);
        head[3] = (unsigned char)length;
        head_size = 4;
    } else {
        head[1] = flag | 127;
        uint64_t n = (uint64_t)length;
        for (int i = 0; i < 8; i++)
            head[2 + i] = (unsigned char)(n >> (56 - 8 * i));
        head_size = 10;
    }
    unsigned char mask[4] = {
        (unsigned char)(key >> 24), (unsigned char)(key >> 16),
        (unsigned char)(key >> 8), (unsigned char)key,
    };
    if (masked) {
        memcpy(head + head_size, mask, 4);
        head_size += 4;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, head_size + length);
    if (out == NULL)
        return NULL;
    unsigned char *dst = (unsigned char *)PyBytes_AS_STRING(out);
    memcpy(dst, head, (size_t)head_size);
    dst += head_size;
    if (!masked) {
        memcpy(dst, payload, (size_t)length);
        return out;
    }
    xor_mask(dst, (const unsigned char *)payload, length, mask, 0);
    return out;
}

/* --- Lane: relay.session.lane.PyLane, the reference (see that module's docstring) ------- */

typedef struct {
    PyObject_HEAD
    PyObject *events;     /* dict: event type -> count (the meter's) */
    PyObject *chunks;     /* dict: decoded audio bytes -> count (the meter's) */
    Py_ssize_t max_frame; /* -1: no limit */
    Py_ssize_t max_audio; /* -1: no append taken */
    int turn_pending;
    long long bytes;
    Py_ssize_t nbounds;
    double *bounds;       /* the delay histogram's upper bounds, the last +inf */
    long long *counts;
    double sum;
} Lane;

static PyObject *APPEND_KIND; /* "input_audio_buffer.append", interned */

static void
lane_dealloc(Lane *self)
{
    PyObject_GC_UnTrack(self);
    Py_CLEAR(self->events);
    Py_CLEAR(self->chunks);
    PyMem_Free(self->bounds);
    PyMem_Free(self->counts);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
lane_traverse(Lane *self, visitproc visit, void *arg)
{
    Py_VISIT(self->events);
    Py_VISIT(self->chunks);
    return 0;
}

static int
lane_clear(Lane *self)
{
    Py_CLEAR(self->events);
    Py_CLEAR(self->chunks);
    return 0;
}

static int
lane_init(Lane *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"events", "chunks", "bounds", "max_frame", "max_audio", NULL};
    PyObject *events, *chunks, *bounds;
    Py_ssize_t max_frame = -1, max_audio = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O!O!O|nn", keywords, &PyDict_Type, &events,
                                     &PyDict_Type, &chunks, &bounds, &max_frame, &max_audio))
        return -1;
    PyObject *seq = PySequence_Fast(bounds, "bounds must be a sequence of floats");
    if (seq == NULL)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n < 1) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "bounds must not be empty");
        return -1;
    }
    double *values = PyMem_Calloc((size_t)n, sizeof(double));
    long long *counts = PyMem_Calloc((size_t)n, sizeof(long long));
    if (values == NULL || counts == NULL) {
        PyMem_Free(values);
        PyMem_Free(counts);
        Py_DECREF(seq);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        values[i] = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(seq, i));
        if (values[i] == -1.0 && PyErr_Occurred()) {
            PyMem_Free(values);
            PyMem_Free(counts);
            Py_DECREF(seq);
            return -1;
        }
    }
    Py_DECREF(seq);
    Py_INCREF(events);
    Py_XSETREF(self->events, events);
    Py_INCREF(chunks);
    Py_XSETREF(self->chunks, chunks);
    PyMem_Free(self->bounds);
    PyMem_Free(self->counts);
    self->bounds = values;
    self->counts = counts;
    self->nbounds = n;
    self->max_frame = max_frame;
    self->max_audio = max_audio;
    self->turn_pending = 0;
    self->bytes = 0;
    self->sum = 0.0;
    return 0;
}

/* d[key] = d.get(key, 0) + 1 */
static int
increment(PyObject *d, PyObject *key)
{
    PyObject *old = PyDict_GetItemWithError(d, key); /* borrowed */
    long long value = 0;
    if (old != NULL) {
        value = PyLong_AsLongLong(old);
        if (value == -1 && PyErr_Occurred())
            return -1;
    } else if (PyErr_Occurred()) {
        return -1;
    }
    PyObject *new_value = PyLong_FromLongLong(value + 1);
    if (new_value == NULL)
        return -1;
    int result = PyDict_SetItem(d, key, new_value);
    Py_DECREF(new_value);
    return result;
}

/* PyLane._count */
static int
lane_count(Lane *self, PyObject *kind, Py_ssize_t frame_size, Py_ssize_t audio)
{
    PyObject *size = PyLong_FromSsize_t(audio);
    if (size == NULL)
        return -1;
    int result = increment(self->events, kind) < 0 || increment(self->chunks, size) < 0 ? -1 : 0;
    Py_DECREF(size);
    if (result == 0)
        self->bytes += frame_size;
    return result;
}

static int
all_ascii(const char *data, Py_ssize_t size)
{
    unsigned char seen = 0;
    for (Py_ssize_t i = 0; i < size; i++)
        seen |= (unsigned char)data[i];
    return seen < 0x80;
}

/* PyLane.append */
static PyObject *
lane_append(Lane *self, PyObject *frame)
{
    if (!PyBytes_Check(frame)) {
        PyErr_SetString(PyExc_TypeError, "append takes bytes");
        return NULL;
    }
    const char *data = PyBytes_AS_STRING(frame);
    Py_ssize_t size = PyBytes_GET_SIZE(frame);
    if (self->max_frame >= 0 && size > self->max_frame)
        return PyLong_FromLong(-1);
    Py_ssize_t audio = fixed_append(data, size);
    if (audio < 0 || audio > self->max_audio || !all_ascii(data, size))
        return PyLong_FromLong(-1);
    if (lane_count(self, APPEND_KIND, size, audio) < 0)
        return NULL;
    return PyLong_FromSsize_t(audio);
}

/* PyLane.delta */
static PyObject *
lane_delta(Lane *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyUnicode_Check(args[0]) || !PyBytes_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "delta(kind: str, frame: bytes)");
        return NULL;
    }
    if (self->turn_pending)
        return PyLong_FromLong(-1);
    Py_ssize_t size = PyBytes_GET_SIZE(args[1]);
    Py_ssize_t audio = delta_end(PyBytes_AS_STRING(args[1]), size);
    if (audio >= 0 && lane_count(self, args[0], size, audio) < 0)
        return NULL;
    return PyLong_FromSsize_t(audio);
}

/* PyLane.written: time.perf_counter() is CLOCK_MONOTONIC on Linux (tests/unit/test_lane.py
 * checks the two agree). */
static PyObject *
lane_written(Lane *self, PyObject *arrived)
{
    double then = PyFloat_AsDouble(arrived);
    if (then == -1.0 && PyErr_Occurred())
        return NULL;
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    double delay = (double)now.tv_sec + (double)now.tv_nsec * 1e-9 - then;
    /* bisect_left: the first bound at or above the delay (the last is +inf). */
    Py_ssize_t low = 0, high = self->nbounds;
    while (low < high) {
        Py_ssize_t mid = (low + high) / 2;
        if (self->bounds[mid] < delay)
            low = mid + 1;
        else
            high = mid;
    }
    if (low >= self->nbounds) /* NaN, or no +inf bound: the last bucket */
        low = self->nbounds - 1;
    self->counts[low] += 1;
    self->sum += delay;
    Py_RETURN_NONE;
}

/* PyLane.drain */
static PyObject *
lane_drain(Lane *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *counts = PyList_New(self->nbounds);
    if (counts == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < self->nbounds; i++) {
        PyObject *count = PyLong_FromLongLong(self->counts[i]);
        if (count == NULL) {
            Py_DECREF(counts);
            return NULL;
        }
        PyList_SET_ITEM(counts, i, count);
    }
    PyObject *drained = Py_BuildValue("(LNd)", self->bytes, counts, self->sum);
    if (drained == NULL)
        return NULL;
    memset(self->counts, 0, (size_t)self->nbounds * sizeof(long long));
    self->bytes = 0;
    self->sum = 0.0;
    return drained;
}

static PyObject *
lane_get_turn_pending(Lane *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->turn_pending);
}

static int
lane_set_turn_pending(Lane *self, PyObject *value, void *Py_UNUSED(closure))
{
    int flag = value == NULL ? 0 : PyObject_IsTrue(value);
    if (flag < 0)
        return -1;
    self->turn_pending = flag;
    return 0;
}

static PyObject *
lane_get_bytes(Lane *self, void *Py_UNUSED(closure))
{
    return PyLong_FromLongLong(self->bytes);
}

static PyGetSetDef lane_getset[] = {
    {"turn_pending", (getter)lane_get_turn_pending, (setter)lane_set_turn_pending,
     "While true, deltas are left to the general path (the meter times the first audio).",
     NULL},
    {"bytes", (getter)lane_get_bytes, NULL, "Frame bytes taken since the last drain.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef lane_methods[] = {
    {"append", (PyCFunction)lane_append, METH_O,
     "A fixed-layout append the policy allows, counted: its audio bytes; else -1."},
    {"delta", (PyCFunction)(void (*)(void))lane_delta, METH_FASTCALL,
     "An audio delta whose audio runs to the end, counted: its audio bytes; else -1."},
    {"written", (PyCFunction)lane_written, METH_O,
     "The frame that arrived at this perf_counter() reading was written: its delay."},
    {"drain", (PyCFunction)lane_drain, METH_NOARGS,
     "(bytes, delay bucket counts, delay sum) since the last drain."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject LaneType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "relay.session._accel.Lane",
    .tp_doc = "A direction's per-frame fast path (relay.session.lane.PyLane is the reference).",
    .tp_basicsize = sizeof(Lane),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)lane_init,
    .tp_dealloc = (destructor)lane_dealloc,
    .tp_traverse = (traverseproc)lane_traverse,
    .tp_clear = (inquiry)lane_clear,
    .tp_methods = lane_methods,
    .tp_getset = lane_getset,
};

/* --- MessageBudget: the bytes of client messages a process holds while they arrive -------
 *
 * A message is held from its first frame's header until its last byte has arrived, up to
 * max_message_bytes per connection; a client sending most of a large message and then
 * nothing (or fragments, between which it may answer pings for ever) holds that memory. The
 * splitters of a process's client connections reserve each data frame's announced length
 * here at its header and release a message's bytes once it is whole (or the connection is
 * gone). A frame that would take `held` past `limit` is refused (Splitter.split), unless
 * its message is `small` in all: live audio goes on while a full budget refuses large ones
 * (up to twice the limit, which nothing passes).
 * A team's budget has the process's as its `parent`: a frame must fit in both. */

typedef struct MessageBudget {
    PyObject_HEAD
    Py_ssize_t limit;           /* 0: none */
    Py_ssize_t small;           /* messages of at most this many bytes pass up to 2 x limit */
    Py_ssize_t held;
    struct MessageBudget *parent; /* counted there too, or NULL */
} MessageBudget;

static PyTypeObject MessageBudgetType;

static int
budget_init(MessageBudget *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"limit", "small", "parent", NULL};
    Py_ssize_t limit, small = 65536;
    PyObject *parent = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "n|nO", keywords, &limit, &small, &parent))
        return -1;
    if (limit < 0 || small < 0) {
        PyErr_SetString(PyExc_ValueError, "limit and small must not be negative");
        return -1;
    }
    if (parent != Py_None && (!PyObject_TypeCheck(parent, &MessageBudgetType) ||
                              ((MessageBudget *)parent)->parent != NULL)) {
        PyErr_SetString(PyExc_TypeError, "parent must be a MessageBudget without a parent");
        return -1;
    }
    self->limit = limit;
    self->small = small;
    self->held = 0;
    Py_XSETREF(self->parent, parent == Py_None ? NULL : (MessageBudget *)Py_NewRef(parent));
    return 0;
}

static void
budget_dealloc(MessageBudget *self)
{
    Py_CLEAR(self->parent);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Bytes ``budget`` can still take: up to its limit, or for a small message up to twice it
 * (live audio goes on past the limit, but not without end: many connections each holding
 * a small message half-sent would). */
static Py_ssize_t
budget_room(const MessageBudget *budget, int small)
{
    Py_ssize_t limit = budget->limit;
    if (limit == 0 || (small && limit > PY_SSIZE_T_MAX / 2))
        return PY_SSIZE_T_MAX - budget->held;
    return (small ? 2 * limit : limit) - budget->held;
}

static PyMemberDef budget_members[] = {
    {"limit", T_PYSSIZET, offsetof(MessageBudget, limit), 0,
     "Bytes the process may hold of messages still arriving (0: no limit)."},
    {"small", T_PYSSIZET, offsetof(MessageBudget, small), READONLY,
     "Messages of at most this many bytes in all are refused only past twice the limit."},
    {"held", T_PYSSIZET, offsetof(MessageBudget, held), READONLY,
     "Bytes announced by the frames of messages still arriving."},
    {"parent", T_OBJECT, offsetof(MessageBudget, parent), READONLY,
     "The budget these bytes are counted in too (the process's, for a team's), or None."},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject MessageBudgetType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "relay.session._accel.MessageBudget",
    .tp_doc = "The bytes of client messages a process holds while they arrive.",
    .tp_basicsize = sizeof(MessageBudget),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)budget_init,
    .tp_dealloc = (destructor)budget_dealloc,
    .tp_members = budget_members,
};

/* --- Splitter: large text frames filled past aiohttp's reader ---------------------------
 *
 * aiohttp's reader keeps a frame's pieces, joins them, copies them to unmask and hands on a
 * copy of that: an 8 MiB event costs 16 MiB while the last two live. A connection's
 * splitter sees every read first (relay.session.frames.feed) and walks every frame header.
 * A frame whose header is whole in one read, and which is a final, unfragmented,
 * uncompressed text frame of at least `large` bytes and under `max_size`, masked as this
 * side's frames are, it fills into one `bytes` of the announced length, unmasking as the
 * pieces arrive. Every other byte goes to aiohttp's reader, in order. Its oracle is that
 * reader (tests/unit/test_splitter.py): the same messages, in the same order. A frame
 * masked otherwise than this side's must be (a client's unmasked, a server's masked), which
 * aiohttp's reader takes, is refused (RFC 6455 5.1: the connection MUST be failed). */

typedef struct {
    PyObject_HEAD
    PyObject *queue;            /* where the glue puts the messages */
    int masked;                 /* this side's frames are masked (a client's) */
    Py_ssize_t large;
    Py_ssize_t max_size;        /* aiohttp's max_msg_size; 0: none */
    unsigned char head[14];
    int head_len;               /* header bytes seen of the next frame (0: at a boundary) */
    unsigned long long skip;    /* payload bytes still to pass to aiohttp */
    int fragmented;             /* inside a fragmented data message */
    PyObject *buffer;           /* the large frame being filled, or NULL */
    Py_ssize_t filled;
    Py_ssize_t size;
    unsigned char key[4];
    MessageBudget *budget;      /* what this connection's messages are counted in, or NULL */
    Py_ssize_t holding;         /* bytes reserved there for the message arriving */
    int ends_message;           /* the frame being passed on is its message's last */
    int refused;                /* a frame was refused: nothing more is read */
    Py_ssize_t fragments;       /* frames of the data message arriving */
} Splitter;

/* Frames one data message may arrive in: each costs the reader as much as a whole message,
 * so a message in millions of 1-byte fragments held the event loop for seconds. Clients
 * send a message whole, or in a few large fragments. */
#define MAX_FRAGMENTS 16384

/* Give back what the message arriving held: it is whole, or its connection is gone. */
static void
release(Splitter *self)
{
    MessageBudget *budget = self->budget;
    if (budget != NULL) {
        budget->held -= self->holding;
        if (budget->parent != NULL)
            budget->parent->held -= self->holding;
    }
    self->holding = 0;
}

static void
splitter_dealloc(Splitter *self)
{
    PyObject_GC_UnTrack(self);
    release(self);
    Py_CLEAR(self->budget);
    Py_CLEAR(self->queue);
    Py_CLEAR(self->buffer);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
splitter_traverse(Splitter *self, visitproc visit, void *arg)
{
    Py_VISIT(self->queue);
    return 0;
}

static int
splitter_clear(Splitter *self)
{
    Py_CLEAR(self->queue);
    return 0;
}

static int
splitter_init(Splitter *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"queue", "masked", "large", "max_size", "budget", NULL};
    PyObject *queue, *budget = Py_None;
    int masked;
    Py_ssize_t large, max_size;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "Opnn|O", keywords, &queue, &masked, &large,
                                     &max_size, &budget))
        return -1;
    if (budget != Py_None && !PyObject_TypeCheck(budget, &MessageBudgetType)) {
        PyErr_SetString(PyExc_TypeError, "budget must be a MessageBudget or None");
        return -1;
    }
    if (large < 1 || max_size < 0) {
        PyErr_SetString(PyExc_ValueError, "large must be positive, max_size not negative");
        return -1;
    }
    Py_INCREF(queue);
    Py_XSETREF(self->queue, queue);
    Py_CLEAR(self->buffer);
    release(self);
    Py_XSETREF(self->budget, budget == Py_None ? NULL : (MessageBudget *)Py_NewRef(budget));
    self->ends_message = self->refused = 0;
    self->masked = masked;
    self->large = large;
    self->max_size = max_size;
    self->head_len = 0;
    self->skip = 0;
    self->fragmented = 0;
    self->fragments = 0;
    self->filled = self->size = 0;
    return 0;
}

static int
header_size(const unsigned char *head)
{
    int length = head[1] & 0x7f;
    return 2 + (length == 126 ? 2 : length == 127 ? 8 : 0) + ((head[1] & 0x80) ? 4 : 0);
}

/* Append (kind, part) to *out, made on first use: kind is True for a large frame's payload,
 * False for bytes for the reader, None for a refused frame (part: its length). 0, or -1
 * with an exception. */
static int
emit(PyObject **out, PyObject *kind, PyObject *part)
{
    if (part == NULL)
        return -1;
    if (*out == NULL && (*out = PyList_New(0)) == NULL) {
        Py_DECREF(part);
        return -1;
    }
    PyObject *pair = Py_BuildValue("(ON)", kind, part);
    if (pair == NULL)
        return -1;
    int appended = PyList_Append(*out, pair);
    Py_DECREF(pair);
    return appended;
}

static PyObject *
splitter_split(Splitter *self, PyObject *data)
{
    if (!PyBytes_Check(data)) {
        PyErr_SetString(PyExc_TypeError, "split(data: bytes)");
        return NULL;
    }
    if (self->refused)
        return PyList_New(0); /* the connection is being closed: nothing more is read */
    const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(data);
    Py_ssize_t n = PyBytes_GET_SIZE(data);
    PyObject *out = NULL;
    int changed = self->buffer != NULL; /* this read starts inside a frame being filled */
    Py_ssize_t pos = 0, seg = 0;        /* seg: the first byte not yet handed on */
    while (pos < n) {
        if (self->buffer != NULL) {
            Py_ssize_t take = self->size - self->filled;
            if (take > n - pos)
                take = n - pos;
            unsigned char *dst = (unsigned char *)PyBytes_AS_STRING(self->buffer) + self->filled;
            xor_mask(dst, p + pos, take, self->key, self->filled);
            self->filled += take;
            pos += take;
            seg = pos;
            if (self->filled == self->size) {
                PyObject *message = self->buffer;
                self->buffer = NULL;
                release(self);
                if (emit(&out, Py_True, message) < 0)
                    goto error;
            }
            continue;
        }
        if (self->skip) {
            unsigned long long take = self->skip;
            if (take > (unsigned long long)(n - pos))
                take = (unsigned long long)(n - pos);
            pos += (Py_ssize_t)take;
            self->skip -= take;
            if (self->skip == 0 && self->ends_message)
                release(self);
            continue;
        }
        Py_ssize_t start = pos - self->head_len; /* negative: the header began in an earlier read */
        while (pos < n && self->head_len < 2)
            self->head[self->head_len++] = p[pos++];
        if (self->head_len < 2)
            break;
        int need = header_size(self->head);
        while (pos < n && self->head_len < need)
            self->head[self->head_len++] = p[pos++];
        if (self->head_len < need)
            break;
        const unsigned char *head = self->head;
        int fin = head[0] & 0x80, rsv = head[0] & 0x70, opcode = head[0] & 0x0f;
        int masked = (head[1] & 0x80) != 0, short_length = head[1] & 0x7f;
        unsigned long long length = (unsigned long long)short_length;
        if (short_length == 126)
            length = ((unsigned long long)head[2] << 8) | head[3];
        else if (short_length == 127) {
            length = 0;
            for (int i = 0; i < 8; i++)
                length = (length << 8) | head[2 + i];
        }
        self->head_len = 0;
        if (masked != self->masked) { /* RFC 6455 5.1: refused, kind None, length -2 */
            if (start > seg &&
                emit(&out, Py_False, PyBytes_FromStringAndSize((const char *)p + seg, start - seg)) < 0)
                goto error;
            if (emit(&out, Py_None, PyLong_FromLong(-2)) < 0)
                goto error;
            self->refused = 1;
            return out;
        }
        self->ends_message = opcode < 3 && fin;
        if (opcode < 3) {
            self->fragments = opcode == 0 ? self->fragments + 1 : 1;
            if (self->fragments > MAX_FRAGMENTS) { /* refused: kind None, length -1 */
                if (start > seg &&
                    emit(&out, Py_False,
                         PyBytes_FromStringAndSize((const char *)p + seg, start - seg)) < 0)
                    goto error;
                if (emit(&out, Py_None, PyLong_FromLong(-1)) < 0)
                    goto error;
                self->refused = 1;
                return out;
            }
        }
        /* A data frame's length is reserved, unless aiohttp's reader refuses it as too big
         * (its test, with the message's earlier fragments: 1009 follows). */
        if (opcode < 3 && self->budget != NULL && length > 0 &&
            !(self->max_size != 0 &&
              length >= (unsigned long long)(self->max_size - self->holding))) {
            MessageBudget *budget = self->budget, *parent = budget->parent;
            int small = self->holding <= budget->small &&
                        length <= (unsigned long long)(budget->small - self->holding);
            Py_ssize_t room = budget_room(budget, small);
            if (parent != NULL && budget_room(parent, small) < room)
                room = budget_room(parent, small);
            if (room <= 0 || length > (unsigned long long)room) {
                if (start > seg &&
                    emit(&out, Py_False,
                         PyBytes_FromStringAndSize((const char *)p + seg, start - seg)) < 0)
                    goto error;
                if (emit(&out, Py_None, PyLong_FromUnsignedLongLong(length)) < 0)
                    goto error;
                self->refused = 1;
                return out;
            }
            budget->held += (Py_ssize_t)length;
            if (parent != NULL)
                parent->held += (Py_ssize_t)length;
            self->holding += (Py_ssize_t)length;
        }
        if (start >= 0 && fin && !rsv && opcode == 1 && !self->fragmented &&
            masked == self->masked && length >= (unsigned long long)self->large &&
            (self->max_size == 0 || length < (unsigned long long)self->max_size) &&
            length <= (unsigned long long)PY_SSIZE_T_MAX) {
            if (start > seg &&
                emit(&out, Py_False, PyBytes_FromStringAndSize((const char *)p + seg, start - seg)) < 0)
                goto error;
            self->buffer = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)length);
            if (self->buffer == NULL)
                goto error;
            self->size = (Py_ssize_t)length;
            self->filled = 0;
            if (masked)
                memcpy(self->key, head + need - 4, 4);
            else
                memset(self->key, 0, 4);
            seg = pos;
            changed = 1;
            continue;
        }
        if (opcode < 3) { /* data frames: a message without FIN continues in the next ones */
            if (opcode != 0 && !fin)
                self->fragmented = 1;
            else if (opcode == 0 && fin)
                self->fragmented = 0;
        }
        self->skip = length;
        if (length == 0 && self->ends_message)
            release(self);
    }
    if (out == NULL && !changed)
        Py_RETURN_NONE; /* all of it to aiohttp, as it came */
    if (seg < n && emit(&out, Py_False, PyBytes_FromStringAndSize((const char *)p + seg, n - seg)) < 0)
        goto error;
    if (out == NULL)
        out = PyList_New(0);
    return out;
error:
    Py_XDECREF(out);
    return NULL;
}

static PyMemberDef splitter_members[] = {
    {"queue", T_OBJECT, offsetof(Splitter, queue), READONLY, "Where the messages go."},
    {"budget", T_OBJECT, offsetof(Splitter, budget), READONLY,
     "The MessageBudget its messages are counted in, or None."},
    {"masked", T_INT, offsetof(Splitter, masked), READONLY,
     "1 when this side's frames must be masked (a client's), else 0."},
    {NULL, 0, 0, 0, NULL},
};

static PyMethodDef splitter_methods[] = {
    {"split", (PyCFunction)splitter_split, METH_O,
     "None: all of data goes to aiohttp's reader. Else [(is_message, bytes)], in order: the "
     "parts for the reader, and the payloads of the large frames filled."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject SplitterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "relay.session._accel.Splitter",
    .tp_doc = "A connection's large text frames, filled past aiohttp's reader.",
    .tp_basicsize = sizeof(Splitter),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)splitter_init,
    .tp_dealloc = (destructor)splitter_dealloc,
    .tp_traverse = (traverseproc)splitter_traverse,
    .tp_clear = (inquiry)splitter_clear,
    .tp_methods = splitter_methods,
    .tp_members = splitter_members,
};

/* --- scan_event: a client event judged as codec.parse_event_strict judges it, without the GIL
 *
 * codec.parse_event_strict (stdlib json, a duplicate key refused in any object, NaN and
 * Infinity refused) is the reference: tests/unit/test_scan_event.py holds the two to the same
 * verdict on corpora and random bytes. This walks the JSON without building it, with the GIL
 * released, so a large event is judged in a thread while the event loop goes on. What it
 * answers: invalid (at a byte), a duplicate key (which), not an object, too deep for it (the
 * caller parses), or valid, with the raw spans of the top-level `type` and `audio` values
 * and how many values it holds (what a parse of it would build).
 * Keys are compared decoded, as Python compares the str keys json makes: escapes written
 * out as UTF-8 (a \u surrogate pair joined; a lone surrogate as its three bytes, which no
 * valid UTF-8 holds, so it equals only itself), the rest as it is. Decoded keys are never
 * longer than they were. The input must be valid UTF-8 (the relay refuses a frame that is
 * not, 1007, before judging it). */

#define SCAN_MAX_DEPTH 512

enum { SCAN_OK = 0, SCAN_NOT_OBJECT = 2, SCAN_DUPLICATE = 3, SCAN_INVALID = 4, SCAN_DEEP = 5,
       SCAN_NO_MEMORY = 6 };

typedef struct {
    Py_ssize_t offset, length; /* in the scan's decoded bytes */
    Py_ssize_t order;          /* its place in the object */
    const unsigned char *at;   /* set when the object's keys are compared */
} ScanKey;

typedef struct {
    const unsigned char *p;
    Py_ssize_t n, pos;
    int depth, status;
    Py_ssize_t max_digits;     /* sys.get_int_max_str_digits() (0: none) */
    unsigned char *points;     /* the decoded keys of the objects open now */
    Py_ssize_t points_len, points_cap;
    ScanKey *keys;
    Py_ssize_t keys_len, keys_cap;
    unsigned char *duplicate;  /* a copy of the duplicate key, for the message */
    Py_ssize_t duplicate_len;
    Py_ssize_t type_start, type_end, audio_start, audio_end; /* raw spans, quotes included */
    Py_ssize_t values;         /* every value: objects, arrays, strings, numbers, literals */
} Scan;

static int scan_value(Scan *s);

static void
scan_ws(Scan *s)
{
    while (s->pos < s->n) {
        unsigned char c = s->p[s->pos];
        if (c != ' ' && c != '\t' && c != '\n' && c != '\r')
            break;
        s->pos++;
    }
}

static int
scan_fail(Scan *s, int status)
{
    if (s->status == SCAN_OK)
        s->status = status;
    return -1;
}

/* Room for `more` decoded bytes. */
static int
reserve_points(Scan *s, Py_ssize_t more)
{
    if (s->points_len + more > s->points_cap) {
        Py_ssize_t cap = s->points_cap ? s->points_cap : 256;
        while (cap < s->points_len + more)
            cap *= 2;
        unsigned char *grown = PyMem_RawRealloc(s->points, (size_t)cap);
        if (grown == NULL)
            return scan_fail(s, SCAN_NO_MEMORY);
        s->points = grown;
        s->points_cap = cap;
    }
    return 0;
}

/* An escape's code point, as (generalized) UTF-8: at most the escape's own length. */
static int
push_point(Scan *s, uint32_t point)
{
    if (reserve_points(s, 4) < 0)
        return -1;
    unsigned char *out = s->points + s->points_len;
    if (point < 0x80) {
        out[0] = (unsigned char)point;
        s->points_len += 1;
    } else if (point < 0x800) {
        out[0] = (unsigned char)(0xc0 | (point >> 6));
        out[1] = (unsigned char)(0x80 | (point & 0x3f));
        s->points_len += 2;
    } else if (point < 0x10000) {
        out[0] = (unsigned char)(0xe0 | (point >> 12));
        out[1] = (unsigned char)(0x80 | ((point >> 6) & 0x3f));
        out[2] = (unsigned char)(0x80 | (point & 0x3f));
        s->points_len += 3;
    } else {
        out[0] = (unsigned char)(0xf0 | (point >> 18));
        out[1] = (unsigned char)(0x80 | ((point >> 12) & 0x3f));
        out[2] = (unsigned char)(0x80 | ((point >> 6) & 0x3f));
        out[3] = (unsigned char)(0x80 | (point & 0x3f));
        s->points_len += 4;
    }
    return 0;
}

static int
hex4(const unsigned char *p, uint32_t *out)
{
    uint32_t value = 0;
    for (int i = 0; i < 4; i++) {
        unsigned char c = p[i];
        value <<= 4;
        if (c >= '0' && c <= '9')
            value |= (uint32_t)(c - '0');
        else if (c >= 'a' && c <= 'f')
            value |= (uint32_t)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F')
            value |= (uint32_t)(c - 'A' + 10);
        else
            return -1;
    }
    *out = value;
    return 0;
}

/* A string at s->pos (its opening quote); with `decode`, its code points are pushed. */
static int
scan_string(Scan *s, int decode)
{
    const unsigned char *p = s->p;
    Py_ssize_t i = s->pos + 1, n = s->n;
    for (;;) {
        if (i >= n)
            return scan_fail(s, SCAN_INVALID);
        unsigned char c = p[i];
        if (c == '"') {
            s->pos = i + 1;
            return 0;
        }
        if (c < 0x20) {
            s->pos = i;
            return scan_fail(s, SCAN_INVALID); /* a raw control character (strict) */
        }
        if (c != '\\') {
            if (decode) { /* as it is: UTF-8 already */
                if (reserve_points(s, 1) < 0)
                    return -1;
                s->points[s->points_len++] = c;
            }
            i++;
            continue;
        }
        if (i + 1 >= n)
            return scan_fail(s, SCAN_INVALID);
        unsigned char e = p[i + 1];
        uint32_t point;
        switch (e) {
        case '"': point = '"'; break;
        case '\\': point = '\\'; break;
        case '/': point = '/'; break;
        case 'b': point = '\b'; break;
        case 'f': point = '\f'; break;
        case 'n': point = '\n'; break;
        case 'r': point = '\r'; break;
        case 't': point = '\t'; break;
        case 'u':
            if (i + 6 > n || hex4(p + i + 2, &point) < 0) {
                s->pos = i;
                return scan_fail(s, SCAN_INVALID);
            }
            /* json joins a high surrogate and an escaped low one that follows it. */
            if (point >= 0xd800 && point <= 0xdbff && i + 12 <= n && p[i + 6] == '\\' &&
                p[i + 7] == 'u') {
                uint32_t low;
                if (hex4(p + i + 8, &low) == 0 && low >= 0xdc00 && low <= 0xdfff) {
                    point = 0x10000 + ((point - 0xd800) << 10) + (low - 0xdc00);
                    i += 6;
                }
            }
            i += 4;
            break;
        default:
            s->pos = i;
            return scan_fail(s, SCAN_INVALID);
        }
        if (decode && push_point(s, point) < 0)
            return -1;
        i += 2;
    }
}

/* Whether a number literal (valid JSON) is past a double's range: the service reads numbers
 * as doubles (orjson: "number is infinity when parsed as double") and refuses the event.
 * Only a literal with an exponent, or 309 integer digits or more, can be; strtod, not
 * Python's parser: the scan may run without the GIL. */
static int
number_overflows(const unsigned char *t, Py_ssize_t len, Py_ssize_t int_digits, int exponent)
{
    if (!exponent && int_digits < 309)
        return 0;
    char small[64];
    char *buf = len < (Py_ssize_t)sizeof(small) ? small : malloc((size_t)len + 1);
    if (buf == NULL)
        return 1; /* out of memory for a copy: refused rather than judged unread */
    memcpy(buf, t, (size_t)len);
    buf[len] = '\0';
    double value = strtod(buf, NULL);
    if (buf != small)
        free(buf);
    return isinf(value);
}

/* A number at s->pos, as json's scanner reads one; an integer of more than max_digits
 * digits is refused, as int() refuses it, and one past a double's range as the service
 * refuses it (`number_overflows`). */
static int
scan_number(Scan *s)
{
    const unsigned char *p = s->p;
    Py_ssize_t i = s->pos, n = s->n;
    if (i < n && p[i] == '-')
        i++;
    if (i >= n || p[i] < '0' || p[i] > '9')
        return scan_fail(s, SCAN_INVALID);
    Py_ssize_t digits_start = i;
    if (p[i] == '0')
        i++;
    else
        while (i < n && p[i] >= '0' && p[i] <= '9')
            i++;
    Py_ssize_t digits = i - digits_start;
    int integer = 1, exponent = 0;
    if (i + 1 < n && p[i] == '.' && p[i + 1] >= '0' && p[i + 1] <= '9') {
        integer = 0;
        i += 2;
        while (i < n && p[i] >= '0' && p[i] <= '9')
            i++;
    }
    if (i < n && (p[i] == 'e' || p[i] == 'E')) {
        Py_ssize_t j = i + 1;
        if (j < n && (p[j] == '+' || p[j] == '-'))
            j++;
        if (j < n && p[j] >= '0' && p[j] <= '9') {
            integer = 0;
            exponent = 1;
            i = j;
            while (i < n && p[i] >= '0' && p[i] <= '9')
                i++;
        }
    }
    if (integer && s->max_digits > 0 && digits > s->max_digits)
        return scan_fail(s, SCAN_INVALID);
    if (number_overflows(p + s->pos, i - s->pos, digits, exponent))
        return scan_fail(s, SCAN_INVALID);
    s->pos = i;
    return 0;
}

static int
scan_literal(Scan *s, const char *word)
{
    size_t length = strlen(word);
    if ((size_t)(s->n - s->pos) < length || memcmp(s->p + s->pos, word, length) != 0)
        return scan_fail(s, SCAN_INVALID);
    s->pos += (Py_ssize_t)length;
    return 0;
}

static int
same_key(const ScanKey *x, const ScanKey *y)
{
    return x->length == y->length && memcmp(x->at, y->at, (size_t)x->length) == 0;
}

/* By content, then by place: equal keys end up together, in the order they came. */
static int
compare_keys(const void *a, const void *b)
{
    const ScanKey *x = a, *y = b;
    if (x->length != y->length)
        return x->length < y->length ? -1 : 1;
    int content = memcmp(x->at, y->at, (size_t)x->length);
    if (content != 0)
        return content;
    return x->order < y->order ? -1 : x->order > y->order;
}

/* The keys of the object just closed (from key `first` on, their code points from
 * `first_point` on): a duplicate fails the scan (the one json names: the first key, in
 * order, that repeats one before it); else they are dropped. */
static int
check_keys(Scan *s, Py_ssize_t first, Py_ssize_t first_point)
{
    Py_ssize_t count = s->keys_len - first;
    if (count >= 2) {
        ScanKey *keys = s->keys + first;
        for (Py_ssize_t i = 0; i < count; i++) {
            keys[i].at = s->points + keys[i].offset;
            keys[i].order = i;
        }
        qsort(keys, (size_t)count, sizeof(ScanKey), compare_keys);
        const ScanKey *repeat = NULL;
        for (Py_ssize_t i = 1; i < count; i++)
            if (same_key(&keys[i - 1], &keys[i]) && !(i >= 2 && same_key(&keys[i - 2], &keys[i])) &&
                (repeat == NULL || keys[i].order < repeat->order))
                repeat = &keys[i]; /* the second of a run: where that key first repeats */
        if (repeat != NULL) {
            size_t size = (size_t)repeat->length;
            s->duplicate = PyMem_RawMalloc(size ? size : 1);
            if (s->duplicate == NULL)
                return scan_fail(s, SCAN_NO_MEMORY);
            memcpy(s->duplicate, repeat->at, size);
            s->duplicate_len = repeat->length;
            return scan_fail(s, SCAN_DUPLICATE);
        }
    }
    s->points_len = first_point;
    s->keys_len = first;
    return 0;
}

static int
is_word(const Scan *s, const ScanKey *key, const char *word)
{
    Py_ssize_t length = (Py_ssize_t)strlen(word);
    if (key->length != length)
        return 0;
    return memcmp(s->points + key->offset, word, (size_t)length) == 0;
}

static int
scan_object(Scan *s)
{
    int top = s->depth == 1;
    Py_ssize_t first = s->keys_len, first_point = s->points_len;
    s->pos++; /* { */
    scan_ws(s);
    if (s->pos < s->n && s->p[s->pos] == '}') {
        s->pos++;
        return 0;
    }
    for (;;) {
        if (s->pos >= s->n || s->p[s->pos] != '"')
            return scan_fail(s, SCAN_INVALID);
        if (s->keys_len == s->keys_cap) {
            Py_ssize_t cap = s->keys_cap ? 2 * s->keys_cap : 64;
            ScanKey *grown = PyMem_RawRealloc(s->keys, (size_t)cap * sizeof(ScanKey));
            if (grown == NULL)
                return scan_fail(s, SCAN_NO_MEMORY);
            s->keys = grown;
            s->keys_cap = cap;
        }
        ScanKey *key = &s->keys[s->keys_len++];
        key->offset = s->points_len;
        if (scan_string(s, 1) < 0)
            return -1;
        key = &s->keys[s->keys_len - 1];
        key->length = s->points_len - key->offset;
        scan_ws(s);
        if (s->pos >= s->n || s->p[s->pos] != ':')
            return scan_fail(s, SCAN_INVALID);
        s->pos++;
        scan_ws(s);
        Py_ssize_t start = s->pos;
        if (scan_value(s) < 0)
            return -1;
        if (top && s->p[start] == '"') {
            key = &s->keys[s->keys_len - 1];
            if (is_word(s, key, "type")) {
                s->type_start = start;
                s->type_end = s->pos;
            } else if (is_word(s, key, "audio")) {
                s->audio_start = start;
                s->audio_end = s->pos;
            }
        }
        scan_ws(s);
        if (s->pos < s->n && s->p[s->pos] == ',') {
            s->pos++;
            scan_ws(s);
            continue;
        }
        if (s->pos < s->n && s->p[s->pos] == '}') {
            s->pos++;
            return check_keys(s, first, first_point);
        }
        return scan_fail(s, SCAN_INVALID);
    }
}

static int
scan_array(Scan *s)
{
    s->pos++; /* [ */
    scan_ws(s);
    if (s->pos < s->n && s->p[s->pos] == ']') {
        s->pos++;
        return 0;
    }
    for (;;) {
        if (scan_value(s) < 0)
            return -1;
        scan_ws(s);
        if (s->pos < s->n && s->p[s->pos] == ',') {
            s->pos++;
            scan_ws(s);
            continue;
        }
        if (s->pos < s->n && s->p[s->pos] == ']') {
            s->pos++;
            return 0;
        }
        return scan_fail(s, SCAN_INVALID);
    }
}

static int
scan_value(Scan *s)
{
    if (s->pos >= s->n)
        return scan_fail(s, SCAN_INVALID);
    s->values++;
    unsigned char c = s->p[s->pos];
    if (c == '{' || c == '[') {
        if (++s->depth > SCAN_MAX_DEPTH)
            return scan_fail(s, SCAN_DEEP);
        int result = c == '{' ? scan_object(s) : scan_array(s);
        s->depth--;
        return result;
    }
    if (c == '"')
        return scan_string(s, 0);
    if (c == 't')
        return scan_literal(s, "true");
    if (c == 'f')
        return scan_literal(s, "false");
    if (c == 'n')
        return scan_literal(s, "null");
    if (c == '-' || (c >= '0' && c <= '9'))
        return scan_number(s); /* NaN, Infinity and -Infinity fail here: not JSON */
    return scan_fail(s, SCAN_INVALID);
}

/* Whether bytes.decode("utf-8") takes ``p``: well-formed UTF-8, without overlong forms,
 * surrogates or anything past U+10FFFF. ASCII is checked eight bytes at a time. */
static int
utf8_valid(const unsigned char *p, Py_ssize_t n)
{
    Py_ssize_t i = 0;
    while (i < n) {
        uint64_t word;
        while (i + 8 <= n) {
            memcpy(&word, p + i, 8);
            if (word & 0x8080808080808080ULL)
                break;
            i += 8;
        }
        if (i >= n)
            break;
        unsigned char c = p[i];
        if (c < 0x80) {
            i++;
        } else if (c >= 0xc2 && c <= 0xdf) {
            if (i + 1 >= n || (p[i + 1] & 0xc0) != 0x80)
                return 0;
            i += 2;
        } else if (c >= 0xe0 && c <= 0xef) {
            if (i + 2 >= n || (p[i + 1] & 0xc0) != 0x80 || (p[i + 2] & 0xc0) != 0x80)
                return 0;
            if ((c == 0xe0 && p[i + 1] < 0xa0) || (c == 0xed && p[i + 1] >= 0xa0))
                return 0; /* overlong; a surrogate */
            i += 3;
        } else if (c >= 0xf0 && c <= 0xf4) {
            if (i + 3 >= n || (p[i + 1] & 0xc0) != 0x80 || (p[i + 2] & 0xc0) != 0x80 ||
                (p[i + 3] & 0xc0) != 0x80)
                return 0;
            if ((c == 0xf0 && p[i + 1] < 0x90) || (c == 0xf4 && p[i + 1] >= 0x90))
                return 0; /* overlong; past U+10FFFF */
            i += 4;
        } else {
            return 0;
        }
    }
    return 1;
}

/* is_utf8(data: bytes) -> bool, without the GIL (codec.read_large calls it in a thread). */
static PyObject *
is_utf8(PyObject *module, PyObject *data)
{
    (void)module;
    if (!PyBytes_Check(data)) {
        PyErr_SetString(PyExc_TypeError, "is_utf8(data: bytes)");
        return NULL;
    }
    int valid;
    Py_BEGIN_ALLOW_THREADS
    valid = utf8_valid((const unsigned char *)PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data));
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(valid);
}

/* scan_event(frame: bytes, max_digits: int) -> tuple: see the section's comment. */
static PyObject *
scan_event(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 2 || !PyBytes_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "scan_event(frame: bytes, max_digits: int)");
        return NULL;
    }
    Py_ssize_t max_digits = PyLong_AsSsize_t(args[1]);
    if (max_digits == -1 && PyErr_Occurred())
        return NULL;
    Scan s;
    memset(&s, 0, sizeof s);
    s.p = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    s.n = PyBytes_GET_SIZE(args[0]);
    s.max_digits = max_digits;
    s.type_start = s.type_end = s.audio_start = s.audio_end = -1;
    int object;
    Py_BEGIN_ALLOW_THREADS /* the frame is immutable bytes, held by the caller */
    scan_ws(&s);
    object = s.pos < s.n && s.p[s.pos] == '{';
    if (scan_value(&s) == 0) {
        scan_ws(&s);
        if (s.pos != s.n)
            scan_fail(&s, SCAN_INVALID); /* extra data */
        else if (!object)
            s.status = SCAN_NOT_OBJECT;
    }
    Py_END_ALLOW_THREADS
    PyObject *result;
    if (s.status == SCAN_NO_MEMORY)
        result = PyErr_NoMemory();
    else if (s.status == SCAN_DUPLICATE)
        result = Py_BuildValue(
            "(iN)", s.status,
            PyUnicode_DecodeUTF8((const char *)s.duplicate, s.duplicate_len, "surrogatepass"));
    else if (s.status == SCAN_INVALID)
        result = Py_BuildValue("(in)", s.status, s.pos);
    else
        result = Py_BuildValue("(innnnn)", s.status, s.type_start, s.type_end, s.audio_start,
                               s.audio_end, s.values);
    PyMem_RawFree(s.points);
    PyMem_RawFree(s.keys);
    PyMem_RawFree(s.duplicate);
    return result;
}

static PyMethodDef methods[] = {
    {"fixed_append_size", fixed_append_size, METH_O,
     "An append's decoded audio bytes when the frame has one of the fixed layouts, else -1."},
    {"delta_to_the_end", delta_to_the_end, METH_O,
     "A delta's decoded audio bytes when its value runs to the frame's end, else -1."},
    {"text_frame", (PyCFunction)(void (*)(void))text_frame, METH_FASTCALL,
     "One text frame holding the payload, masked with the key when masked is true."},
    {"is_utf8", is_utf8, METH_O,
     "Whether data.decode('utf-8') would succeed; the GIL is released meanwhile."},
    {"scan_event", (PyCFunction)(void (*)(void))scan_event, METH_FASTCALL,
     "A client event judged as codec.parse_event_strict judges it, without the GIL: "
     "(status, ...) (codec.read_scanned reads it)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef accel_module = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "relay.session._accel",
    .m_doc = "The per-frame scans and framing, in C (the Python versions are the reference).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__accel(void)
{
    if (PyType_Ready(&LaneType) < 0 || PyType_Ready(&SplitterType) < 0 ||
        PyType_Ready(&MessageBudgetType) < 0)
        return NULL;
    APPEND_KIND = PyUnicode_InternFromString("input_audio_buffer.append");
    if (APPEND_KIND == NULL)
        return NULL;
    PyObject *module = PyModule_Create(&accel_module);
    if (module == NULL)
        return NULL;
    Py_INCREF(&LaneType);
    if (PyModule_AddObject(module, "Lane", (PyObject *)&LaneType) < 0) {
        Py_DECREF(&LaneType);
        Py_DECREF(module);
        return NULL;
    }
    Py_INCREF(&SplitterType);
    if (PyModule_AddObject(module, "Splitter", (PyObject *)&SplitterType) < 0) {
        Py_DECREF(&SplitterType);
        Py_DECREF(module);
        return NULL;
    }
    Py_INCREF(&MessageBudgetType);
    if (PyModule_AddObject(module, "MessageBudget", (PyObject *)&MessageBudgetType) < 0) {
        Py_DECREF(&MessageBudgetType);
        Py_DECREF(module);
        return NULL;
    }
    if (PyModule_AddIntConstant(module, "MAX_FRAGMENTS", MAX_FRAGMENTS) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
