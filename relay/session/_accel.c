/* The per-frame scans and framing of relay.session.codec and relay.session.frames, in C.
 *
 * Each function here is a line-for-line port of a Python function kept as its reference
 * (named in its comment); tests/unit/test_accel.py checks that both give the same answer on
 * the layouts, on their near misses and on random bytes. What it saves is the interpreter:
 * the Python versions make ten to fifteen method calls a frame, about 100 ns each on this
 * machine; each function here is one call.
 *
 * Nothing here keeps a reference or writes outside a buffer it allocated: the inputs are
 * read-only `bytes`, every read is bounded by their length.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

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
    /* XOR eight bytes at a time with the key repeated (the payload starts at key byte 0). */
    uint64_t wide;
    unsigned char repeated[8];
    for (int i = 0; i < 8; i++)
        repeated[i] = mask[i % 4];
    memcpy(&wide, repeated, 8);
    Py_ssize_t i = 0;
    for (; i + 8 <= length; i += 8) {
        uint64_t chunk;
        memcpy(&chunk, payload + i, 8);
        chunk ^= wide;
        memcpy(dst + i, &chunk, 8);
    }
    for (; i < length; i++)
        dst[i] = (unsigned char)payload[i] ^ mask[i % 4];
    return out;
}

static PyMethodDef methods[] = {
    {"fixed_append_size", fixed_append_size, METH_O,
     "An append's decoded audio bytes when the frame has one of the fixed layouts, else -1."},
    {"delta_to_the_end", delta_to_the_end, METH_O,
     "A delta's decoded audio bytes when its value runs to the frame's end, else -1."},
    {"text_frame", (PyCFunction)(void (*)(void))text_frame, METH_FASTCALL,
     "One text frame holding the payload, masked with the key when masked is true."},
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
    return PyModule_Create(&accel_module);
}
