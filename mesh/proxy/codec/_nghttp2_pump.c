/* The HTTP/2 engine's session callbacks in C (optional; mesh/proxy/codec/nghttp2_session.py).
 *
 * A Pump feeds an nghttp2 session the peer's bytes (``recv``) and takes the frames it queued
 * (``send``), with the GIL held throughout.  The session's callbacks are the C functions of this
 * module: they collect each received header block into a list of (name, value) tuples and call the
 * Connection's methods with plain ints and bytes, once per frame or DATA chunk, never once per
 * field.  As the fields arrive they also check h2's rules on each block, conservatively: the values
 * of every block, and for the usual request and response heads the names and pseudo-header fields
 * too, so that Python skips the checks they have made (received_headers in h2_connection.py).
 * Without this module the same methods are called from cffi callbacks (``_CffiPump`` in
 * nghttp2_session.py): one Python call per received field, per frame and per chunk, and the GIL
 * dropped and taken around each.
 *
 * ``submit`` sends a header block, its nghttp2_nv array packed in C from the list of fields;
 * ``windows``, ``consume`` and ``resume`` are the flow-control calls made per DATA frame.
 *
 * libnghttp2 is not linked: ``bind`` is given the addresses of the functions named in FUNCTIONS from
 * the library cffi loaded, so there is one copy of it, and the module builds without libnghttp2-dev.
 * Only the frame layout of nghttp2.h (1.52) is declared below.
 *
 * A Pump holds its Connection as a borrowed reference: the Connection owns the Pump and the
 * session, and only drives the session through its own methods, so the Connection is alive
 * whenever a callback runs (and no reference cycle is made).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <sys/types.h>

typedef struct nghttp2_session nghttp2_session;
typedef struct { size_t length; int32_t stream_id; uint8_t type; uint8_t flags; uint8_t reserved; } nghttp2_frame_hd;
typedef struct { int32_t stream_id; int32_t weight; uint8_t exclusive; } nghttp2_priority_spec;
typedef struct { uint8_t *name; uint8_t *value; size_t namelen; size_t valuelen; uint8_t flags; } nghttp2_nv;
typedef struct {
    nghttp2_frame_hd hd; size_t padlen; nghttp2_priority_spec pri_spec; nghttp2_nv *nva; size_t nvlen; int cat;
} nghttp2_headers;
typedef struct { nghttp2_frame_hd hd; uint32_t error_code; } nghttp2_rst_stream;
typedef struct { int32_t settings_id; uint32_t value; } nghttp2_settings_entry;
typedef struct { nghttp2_frame_hd hd; size_t niv; nghttp2_settings_entry *iv; } nghttp2_settings;
typedef struct { nghttp2_frame_hd hd; uint8_t opaque_data[8]; } nghttp2_ping;
typedef struct {
    nghttp2_frame_hd hd; int32_t last_stream_id; uint32_t error_code; uint8_t *opaque_data; size_t opaque_data_len;
    uint8_t reserved;
} nghttp2_goaway;
typedef struct { nghttp2_frame_hd hd; int32_t window_size_increment; uint8_t reserved; } nghttp2_window_update;
typedef union {
    nghttp2_frame_hd hd; nghttp2_headers headers; nghttp2_rst_stream rst_stream; nghttp2_settings settings;
    nghttp2_ping ping; nghttp2_goaway goaway; nghttp2_window_update window_update;
} nghttp2_frame;
typedef union { int fd; void *ptr; } nghttp2_data_source;

typedef ssize_t (*nghttp2_data_source_read_callback)(nghttp2_session *, int32_t, uint8_t *, size_t, uint32_t *,
                                                     nghttp2_data_source *, void *);
typedef struct { nghttp2_data_source source; nghttp2_data_source_read_callback read_callback; } nghttp2_data_provider;

typedef ssize_t (*mem_recv_fn)(nghttp2_session *, const uint8_t *, size_t);
typedef ssize_t (*mem_send_fn)(nghttp2_session *, const uint8_t **);
typedef int32_t (*submit_request_fn)(nghttp2_session *, const nghttp2_priority_spec *, const nghttp2_nv *, size_t,
                                     const nghttp2_data_provider *, void *);
typedef int (*submit_response_fn)(nghttp2_session *, int32_t, const nghttp2_nv *, size_t,
                                  const nghttp2_data_provider *);
typedef int32_t (*submit_headers_fn)(nghttp2_session *, uint8_t, int32_t, const nghttp2_priority_spec *,
                                     const nghttp2_nv *, size_t, void *);
typedef int (*submit_trailer_fn)(nghttp2_session *, int32_t, const nghttp2_nv *, size_t);
typedef int (*consume_fn)(nghttp2_session *, int32_t, size_t);
typedef int (*resume_data_fn)(nghttp2_session *, int32_t);
typedef int32_t (*stream_window_fn)(nghttp2_session *, int32_t);
typedef int32_t (*session_window_fn)(nghttp2_session *);
typedef uint32_t (*remote_settings_fn)(nghttp2_session *, int);

enum { DATA = 0x0, HEADERS = 0x1, RST_STREAM = 0x3, SETTINGS = 0x4, PUSH_PROMISE = 0x5, PING = 0x6, GOAWAY = 0x7,
       WINDOW_UPDATE = 0x8 };
enum { FLAG_END_STREAM = 0x1, FLAG_ACK = 0x1, FLAG_END_HEADERS = 0x4, NV_FLAG_NO_INDEX = 0x1 };
enum { SETTINGS_INITIAL_WINDOW_SIZE = 0x4 };
enum { HCAT_REQUEST = 0, HCAT_RESPONSE = 1 };  /* nghttp2_headers_category */
/* The pseudo-header fields a plain block may hold (see plain_field), one bit each. */
enum { PSEUDO_METHOD = 1, PSEUDO_SCHEME = 2, PSEUDO_AUTHORITY = 4, PSEUDO_PATH = 8, PSEUDO_STATUS = 16 };
enum { REQUEST_PSEUDO = PSEUDO_METHOD | PSEUDO_SCHEME | PSEUDO_AUTHORITY | PSEUDO_PATH };
/* What the Connection's _on_headers is told of a block (nghttp2_session.py has the same names). */
enum { UNCHECKED = 0, VALUES_CHECKED = 1, BLOCK_CHECKED = 2 };
#define ERR_CALLBACK_FAILURE (-902)

static mem_recv_fn mem_recv;
static mem_send_fn mem_send;
static submit_request_fn submit_request;
static submit_response_fn submit_response;
static submit_headers_fn submit_headers;
static submit_trailer_fn submit_trailer;
static consume_fn consume;
static resume_data_fn resume_data;
static stream_window_fn stream_remote_window;
static session_window_fn remote_window;
static remote_settings_fn remote_settings;
static PyObject *never_indexed;  /* hpack.NeverIndexedHeaderTuple */
static PyObject *on_error;       /* called with (type, value, traceback) when a method raised */

/* The Connection's methods the callbacks call (interned names). */
static PyObject *s_begin_headers, *s_over_limit, *s_headers, *s_end_stream, *s_window_update, *s_settings,
    *s_rst_stream, *s_ping_ack, *s_goaway, *s_invalid_frame, *s_data, *s_close, *s_take, *s_header_limit;

typedef struct {
    PyObject_HEAD
    PyObject *conn;            /* borrowed: see the top of this file */
    nghttp2_session *session;
    PyObject *block;           /* the list the header block being received goes into; NULL: dropped */
    Py_ssize_t size;           /* of that header list, as SETTINGS_MAX_HEADER_LIST_SIZE counts it */
    Py_ssize_t limit;          /* the Connection's _header_limit when the block began */
    int clean;                 /* every value of that block passes h2's value rules, and none is a cookie */
    int plain;                 /* every field of it so far is plain (plain_field) */
    unsigned pseudo;           /* the PSEUDO_ bits of the pseudo-header fields it holds so far */
    int regular_seen;          /* it holds a regular field */
} Pump;

/* A method raised: hand the exception to on_error (which logs it), and tell nghttp2 to stop. */
static int failed(void) {
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyErr_NormalizeException(&type, &value, &traceback);
    PyObject *result = PyObject_CallFunctionObjArgs(on_error, type, value ? value : Py_None,
                                                    traceback ? traceback : Py_None, NULL);
    if (result == NULL) {
        PyErr_WriteUnraisable(on_error);
    }
    Py_XDECREF(result);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(traceback);
    return ERR_CALLBACK_FAILURE;
}

/* conn.<name>(*args) with ``count`` arguments (up to four; NULL after them), which this function
 * releases (any of the ``count`` may be NULL: then it fails, with the error set by what made the NULL). */
static PyObject *call(Pump *pump, PyObject *name, size_t count, PyObject *a, PyObject *b, PyObject *c,
                      PyObject *d) {
    PyObject *stack[6] = {NULL, pump->conn, a, b, c, d};
    PyObject *result = NULL;
    if ((count < 1 || a) && (count < 2 || b) && (count < 3 || c) && (count < 4 || d)) {
        result = PyObject_VectorcallMethod(name, stack + 1, (count + 1) | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    }
    Py_XDECREF(a);
    Py_XDECREF(b);
    Py_XDECREF(c);
    Py_XDECREF(d);
    return result;
}

/* A call whose result is ignored (as the cffi callbacks ignore it): 0, or the failure. */
static int notify(Pump *pump, PyObject *name, size_t count, PyObject *a, PyObject *b, PyObject *c, PyObject *d) {
    PyObject *result = call(pump, name, count, a, b, c, d);
    if (result == NULL) {
        return failed();
    }
    Py_DECREF(result);
    return 0;
}

/* A call whose result is the int the callback returns to nghttp2. */
static int answer(Pump *pump, PyObject *name, size_t count, PyObject *a, PyObject *b, PyObject *c, PyObject *d) {
    PyObject *result = call(pump, name, count, a, b, c, d);
    if (result == NULL) {
        return failed();
    }
    long value = PyLong_AsLong(result);
    Py_DECREF(result);
    if (value == -1 && PyErr_Occurred()) {
        return failed();
    }
    return (int)value;
}

static int on_begin_headers(nghttp2_session *session, const nghttp2_frame *frame, void *user_data) {
    Pump *pump = user_data;
    PyGILState_STATE gil = PyGILState_Ensure();
    int rv = 0;
    Py_CLEAR(pump->block);
    PyObject *block = call(pump, s_begin_headers, 1, PyLong_FromLong(frame->hd.stream_id), NULL, NULL, NULL);
    if (block == NULL) {
        rv = failed();
    } else if (block == Py_None) {
        Py_DECREF(block);
    } else {
        PyObject *limit = PyObject_GetAttr(pump->conn, s_header_limit);
        pump->limit = limit ? PyLong_AsSsize_t(limit) : -1;
        Py_XDECREF(limit);
        if (pump->limit == -1 && PyErr_Occurred()) {
            Py_DECREF(block);
            rv = failed();
        } else {
            pump->block = block;
            pump->size = 0;
            pump->clean = 1;
            pump->plain = 1;
            pump->pseudo = 0;
            pump->regular_seen = 0;
        }
    }
    PyGILState_Release(gil);
    return rv;
}

/* Whether a received field passes h2's rules for a value (no NUL, LF or CR; no space or tab at either
 * end) and is no cookie (cookies are joined before the checks): then received_headers need not scan
 * the values of its block again (``clean``). */
static int clean_field(const uint8_t *name, size_t namelen, const uint8_t *value, size_t valuelen) {
    if (namelen == 6 && memcmp(name, "cookie", 6) == 0) {
        return 0;
    }
    if (valuelen == 0) {
        return 1;
    }
    if (value[0] == ' ' || value[0] == '\t' || value[valuelen - 1] == ' ' || value[valuelen - 1] == '\t') {
        return 0;
    }
    return !memchr(value, 0, valuelen) && !memchr(value, '\n', valuelen) && !memchr(value, '\r', valuelen);
}

/* A byte a plain field name may hold: lower-case letters, digits and RFC 9110's other token
 * characters.  Fewer than h2 accepts (it also takes most other printable ASCII), never upper case,
 * a colon, a space, a control byte or one above 0x7e. */
static int plain_name_byte(uint8_t c) {
    return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' || c == '_' || c == '.' || c == '!' ||
           c == '#' || c == '$' || c == '%' || c == '&' || c == '\'' || c == '*' || c == '+' || c == '^' ||
           c == '`' || c == '|' || c == '~';
}

/* Whether a name is one whose rule depends on its value or on the rest of the block (te, host), or
 * one h2 refuses (the connection-specific fields). */
static int special_name(const uint8_t *name, size_t len) {
    switch (len) {
    case 2: return memcmp(name, "te", 2) == 0;
    case 4: return memcmp(name, "host", 4) == 0;
    case 7: return memcmp(name, "upgrade", 7) == 0;
    case 10: return memcmp(name, "connection", 10) == 0 || memcmp(name, "keep-alive", 10) == 0;
    case 16: return memcmp(name, "proxy-connection", 16) == 0;
    case 17: return memcmp(name, "transfer-encoding", 17) == 0;
    default: return 0;
    }
}

static unsigned pseudo_bit(const uint8_t *name, size_t len) {
    if (len == 7) {
        if (memcmp(name, ":method", 7) == 0) return PSEUDO_METHOD;
        if (memcmp(name, ":scheme", 7) == 0) return PSEUDO_SCHEME;
        if (memcmp(name, ":status", 7) == 0) return PSEUDO_STATUS;
    } else if (len == 10 && memcmp(name, ":authority", 10) == 0) {
        return PSEUDO_AUTHORITY;
    } else if (len == 5 && memcmp(name, ":path", 5) == 0) {
        return PSEUDO_PATH;
    }
    return 0;
}

/* Whether a received field keeps its block plain: a block of plain fields, all of them clean
 * (clean_field), whose pseudo-header fields are those of a request (not CONNECT) or of a response
 * (see on_frame_recv), passes every rule received_headers checks, which can then return it as it is
 * (BLOCK_CHECKED).  Judged conservatively: a field this does not know to pass, such as an unusual name
 * character, ``te`` or ``host``, only sends its block the whole way in Python, which finds the errors
 * and words them. */
static int plain_field(Pump *pump, const uint8_t *name, size_t namelen, const uint8_t *value, size_t valuelen) {
    if (namelen == 0) {
        return 0;
    }
    if (name[0] == ':') {
        unsigned bit = pseudo_bit(name, namelen);
        if (bit == 0 || pump->regular_seen || (pump->pseudo & bit)) {
            return 0;  /* unknown, after a regular field, or repeated */
        }
        if ((bit == PSEUDO_PATH && valuelen == 0) ||
            (bit == PSEUDO_METHOD && valuelen == 7 && memcmp(value, "CONNECT", 7) == 0)) {
            return 0;
        }
        pump->pseudo |= bit;
        return 1;
    }
    for (size_t i = 0; i < namelen; i++) {
        if (!plain_name_byte(name[i])) {
            return 0;
        }
    }
    if (special_name(name, namelen)) {
        return 0;
    }
    pump->regular_seen = 1;
    return 1;
}

static int on_header(nghttp2_session *session, const nghttp2_frame *frame, const uint8_t *name, size_t namelen,
                     const uint8_t *value, size_t valuelen, uint8_t flags, void *user_data) {
    Pump *pump = user_data;
    if (pump->block == NULL) {
        return 0;
    }
    PyGILState_STATE gil = PyGILState_Ensure();
    int rv = 0;
    pump->size += (Py_ssize_t)(namelen + valuelen + 32);
    if (pump->size > pump->limit) {
        rv = answer(pump, s_over_limit, 1, PyBool_FromLong(frame->hd.flags & FLAG_END_HEADERS), NULL, NULL, NULL);
    } else {
        if (pump->clean && !clean_field(name, namelen, value, valuelen)) {
            pump->clean = 0;
        }
        if (pump->plain && !plain_field(pump, name, namelen, value, valuelen)) {
            pump->plain = 0;
        }
        PyObject *pair = PyTuple_New(2);
        PyObject *n = PyBytes_FromStringAndSize((const char *)name, (Py_ssize_t)namelen);
        PyObject *v = PyBytes_FromStringAndSize((const char *)value, (Py_ssize_t)valuelen);
        PyObject *field = NULL;
        if (pair && n && v) {
            PyTuple_SET_ITEM(pair, 0, n);
            PyTuple_SET_ITEM(pair, 1, v);
            n = v = NULL;
            if (flags & NV_FLAG_NO_INDEX) {  /* tuple.__new__(NeverIndexedHeaderTuple, pair) */
                PyObject *args = PyTuple_Pack(1, pair);
                field = args ? PyTuple_Type.tp_new((PyTypeObject *)never_indexed, args, NULL) : NULL;
                Py_XDECREF(args);
                Py_DECREF(pair);
            } else {
                field = pair;
            }
            pair = NULL;
        }
        Py_XDECREF(pair);
        Py_XDECREF(n);
        Py_XDECREF(v);
        if (field == NULL || PyList_Append(pump->block, field) < 0) {
            rv = failed();
        }
        Py_XDECREF(field);
    }
    PyGILState_Release(gil);
    return rv;
}

static PyObject *settings_list(const nghttp2_settings *settings) {
    PyObject *entries = PyList_New((Py_ssize_t)settings->niv);
    for (size_t index = 0; entries && index < settings->niv; index++) {
        PyObject *entry = Py_BuildValue("(iI)", settings->iv[index].settings_id,
                                        (unsigned int)settings->iv[index].value);
        if (entry == NULL) {
            Py_CLEAR(entries);
        } else {
            PyList_SET_ITEM(entries, (Py_ssize_t)index, entry);
        }
    }
    return entries;
}

/* What is known of the header block that has just ended (category ``cat``): UNCHECKED,
 * VALUES_CHECKED (clean) or BLOCK_CHECKED (clean and plain, with a request's four pseudo-header fields
 * in a request or a response's :status alone in a response; trailers and other blocks never). */
static long checked_level(const Pump *pump, int cat) {
    if (pump->block == NULL || !pump->clean) {
        return UNCHECKED;
    }
    if (pump->plain && ((cat == HCAT_REQUEST && pump->pseudo == REQUEST_PSEUDO) ||
                        (cat == HCAT_RESPONSE && pump->pseudo == PSEUDO_STATUS))) {
        return BLOCK_CHECKED;
    }
    return VALUES_CHECKED;
}

static int on_frame_recv(nghttp2_session *session, const nghttp2_frame *frame, void *user_data) {
    Pump *pump = user_data;
    int32_t stream_id = frame->hd.stream_id;
    uint8_t flags = frame->hd.flags;
    int rv = 0;
    PyGILState_STATE gil = PyGILState_Ensure();
    switch (frame->hd.type) {
    case DATA:
        if (flags & FLAG_END_STREAM) {
            rv = notify(pump, s_end_stream, 1, PyLong_FromLong(stream_id), NULL, NULL, NULL);
        }
        break;
    case HEADERS:
        rv = notify(pump, s_headers, 4, PyLong_FromLong(stream_id), PyLong_FromLong(flags),
                    PyLong_FromLong(frame->headers.cat), PyLong_FromLong(checked_level(pump, frame->headers.cat)));
        Py_CLEAR(pump->block);
        break;
    case PUSH_PROMISE:
        Py_CLEAR(pump->block);
        break;
    case WINDOW_UPDATE:
        rv = notify(pump, s_window_update, 2, PyLong_FromLong(stream_id),
                    PyLong_FromLong(frame->window_update.window_size_increment), NULL, NULL);
        break;
    case SETTINGS:
        if (!(flags & FLAG_ACK)) {
            rv = notify(pump, s_settings, 1, settings_list(&frame->settings), NULL, NULL, NULL);
        }
        break;
    case RST_STREAM:
        rv = notify(pump, s_rst_stream, 2, PyLong_FromLong(stream_id),
                    PyLong_FromUnsignedLong(frame->rst_stream.error_code), NULL, NULL);
        break;
    case PING:
        if (flags & FLAG_ACK) {
            rv = notify(pump, s_ping_ack, 1, PyBytes_FromStringAndSize((const char *)frame->ping.opaque_data, 8),
                        NULL, NULL, NULL);
        }
        break;
    case GOAWAY: {
        const nghttp2_goaway *goaway = &frame->goaway;
        PyObject *data = goaway->opaque_data_len
            ? PyBytes_FromStringAndSize((const char *)goaway->opaque_data, (Py_ssize_t)goaway->opaque_data_len)
            : Py_NewRef(Py_None);
        rv = notify(pump, s_goaway, 3, PyLong_FromLong(goaway->last_stream_id),
                    PyLong_FromUnsignedLong(goaway->error_code), data, NULL);
        break;
    }
    default:
        break;
    }
    PyGILState_Release(gil);
    return rv;
}

static int on_invalid_frame_recv(nghttp2_session *session, const nghttp2_frame *frame, int lib_error,
                                 void *user_data) {
    PyGILState_STATE gil = PyGILState_Ensure();
    int rv = notify(user_data, s_invalid_frame, 2, PyLong_FromLong(frame->hd.stream_id), PyLong_FromLong(lib_error),
                    NULL, NULL);
    PyGILState_Release(gil);
    return rv;
}

static int on_data_chunk_recv(nghttp2_session *session, uint8_t flags, int32_t stream_id, const uint8_t *data,
                              size_t length, void *user_data) {
    PyGILState_STATE gil = PyGILState_Ensure();
    int rv = answer(user_data, s_data, 2, PyLong_FromLong(stream_id),
                    PyBytes_FromStringAndSize((const char *)data, (Py_ssize_t)length), NULL, NULL);
    PyGILState_Release(gil);
    return rv;
}

static int on_stream_close(nghttp2_session *session, int32_t stream_id, uint32_t error_code, void *user_data) {
    PyGILState_STATE gil = PyGILState_Ensure();
    int rv = notify(user_data, s_close, 2, PyLong_FromLong(stream_id), PyLong_FromUnsignedLong(error_code), NULL, NULL);
    PyGILState_Release(gil);
    return rv;
}

/* The data provider: conn._take(stream_id, length) gives an int for nghttp2 (deferred, an error) or
 * (bytes-like of at most ``length``, the data flags to set). */
static ssize_t on_read(nghttp2_session *session, int32_t stream_id, uint8_t *buffer, size_t length,
                       uint32_t *data_flags, nghttp2_data_source *source, void *user_data) {
    PyGILState_STATE gil = PyGILState_Ensure();
    ssize_t rv;
    PyObject *taken = call(user_data, s_take, 2, PyLong_FromLong(stream_id), PyLong_FromSize_t(length), NULL, NULL);
    if (taken == NULL) {
        rv = failed();
    } else if (PyLong_Check(taken)) {
        rv = PyLong_AsSsize_t(taken);
        if (rv == -1 && PyErr_Occurred()) {
            rv = failed();
        }
    } else {
        Py_buffer view;
        long flags;
        if (!PyTuple_Check(taken) || PyTuple_GET_SIZE(taken) != 2) {
            PyErr_SetString(PyExc_TypeError, "_take must give an int or (data, flags)");
            rv = failed();
        } else if ((flags = PyLong_AsLong(PyTuple_GET_ITEM(taken, 1))) == -1 && PyErr_Occurred()) {
            rv = failed();
        } else if (PyObject_GetBuffer(PyTuple_GET_ITEM(taken, 0), &view, PyBUF_SIMPLE) < 0) {
            rv = failed();
        } else {
            if ((size_t)view.len > length) {
                PyErr_SetString(PyExc_ValueError, "_take gave more than it was asked for");
                rv = failed();
            } else {
                memcpy(buffer, view.buf, (size_t)view.len);
                *data_flags |= (uint32_t)flags;
                rv = view.len;
            }
            PyBuffer_Release(&view);
        }
    }
    Py_XDECREF(taken);
    PyGILState_Release(gil);
    return rv;
}

/* What every stream's DATA comes from: on_read, which asks the connection's _take. */
static const nghttp2_data_provider provider = {{0}, on_read};

/* -- header blocks sent ------------------------------------------------------------------------ */

enum { SUBMIT_REQUEST = 0, SUBMIT_RESPONSE = 1, SUBMIT_HEADERS = 2, SUBMIT_TRAILER = 3 };

/* ``text`` as the bytes to send: bytes as they are, str as UTF-8, anything else as str()'s UTF-8 (as
 * hpack_c.HeaderArray takes them).  A new object is appended to ``keep``, which holds it while used. */
static int field_bytes(PyObject *text, PyObject *keep, uint8_t **data, size_t *length) {
    if (PyBytes_Check(text)) {
        *data = (uint8_t *)PyBytes_AS_STRING(text);
        *length = (size_t)PyBytes_GET_SIZE(text);
        return 0;
    }
    PyObject *string = PyUnicode_Check(text) ? Py_NewRef(text) : PyObject_Str(text);
    if (string == NULL) {
        return -1;
    }
    PyObject *encoded = PyUnicode_AsUTF8String(string);
    Py_DECREF(string);
    if (encoded == NULL || PyList_Append(keep, encoded) < 0) {
        Py_XDECREF(encoded);
        return -1;
    }
    Py_DECREF(encoded);
    *data = (uint8_t *)PyBytes_AS_STRING(encoded);
    *length = (size_t)PyBytes_GET_SIZE(encoded);
    return 0;
}

/* Whether ``header`` is to be sent never indexed, as hpack_c.HeaderArray decides it: never for a plain
 * tuple (h2 drops a third item), when hpack's ``indexable`` is false (NeverIndexedHeaderTuple), and
 * for any other sequence when it has a true third item; -1 on error. */
static int never_indexed_field(PyObject *header) {
    if (PyTuple_CheckExact(header)) {
        return 0;
    }
    PyObject *indexable = PyObject_GetAttrString(header, "indexable");
    if (indexable != NULL) {
        int truth = PyObject_IsTrue(indexable);
        Py_DECREF(indexable);
        return truth < 0 ? -1 : !truth;
    }
    if (!PyErr_ExceptionMatches(PyExc_AttributeError)) {
        return -1;
    }
    PyErr_Clear();
    if (PySequence_Size(header) > 2) {
        PyObject *flag = PySequence_GetItem(header, 2);
        int truth = flag ? PyObject_IsTrue(flag) : -1;
        Py_XDECREF(flag);
        return truth;
    }
    return 0;
}

/* Pack ``headers`` (a list or tuple of (name, value) pairs, HeaderTuples or triples) into ``nva``
 * (``count`` of them); -1 on error. */
static int pack_fields(PyObject *headers, nghttp2_nv *nva, Py_ssize_t count, PyObject *keep) {
    PyObject **items = PySequence_Fast_ITEMS(headers);
    for (Py_ssize_t index = 0; index < count; index++) {
        PyObject *header = items[index];
        nghttp2_nv *nv = &nva[index];
        int flag;
        if (PyTuple_Check(header) && PyTuple_GET_SIZE(header) >= 2) {
            if (field_bytes(PyTuple_GET_ITEM(header, 0), keep, &nv->name, &nv->namelen) < 0 ||
                field_bytes(PyTuple_GET_ITEM(header, 1), keep, &nv->value, &nv->valuelen) < 0) {
                return -1;
            }
        } else {
            PyObject *name = PySequence_GetItem(header, 0);
            PyObject *value = name ? PySequence_GetItem(header, 1) : NULL;
            int failed = value == NULL || PyList_Append(keep, name) < 0 || PyList_Append(keep, value) < 0 ||
                field_bytes(name, keep, &nv->name, &nv->namelen) < 0 ||
                field_bytes(value, keep, &nv->value, &nv->valuelen) < 0;
            Py_XDECREF(name);
            Py_XDECREF(value);
            if (failed) {
                return -1;
            }
        }
        if ((flag = never_indexed_field(header)) < 0) {
            return -1;
        }
        nv->flags = flag ? NV_FLAG_NO_INDEX : 0;
    }
    return 0;
}

/* -- the Pump type ---------------------------------------------------------------------------- */

static int pump_init(Pump *self, PyObject *args, PyObject *kwargs) {
    PyObject *conn;
    if (!PyArg_ParseTuple(args, "O:Pump", &conn)) {
        return -1;
    }
    self->conn = conn;
    return 0;
}

static void pump_dealloc(Pump *self) {
    Py_CLEAR(self->block);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Whether the pump has its session (else a RuntimeError is set). */
static int attached(Pump *self) {
    if (self->session == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "a Pump is used before Pump.attach");
        return 0;
    }
    return 1;
}

static PyObject *pump_recv(Pump *self, PyObject *data) {
    Py_buffer view;
    if (!attached(self)) {
        return NULL;
    }
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    ssize_t used = mem_recv(self->session, view.buf, (size_t)view.len);
    PyBuffer_Release(&view);
    return PyLong_FromSsize_t(used);
}

static PyObject *pump_send(Pump *self, PyObject *out) {
    const uint8_t *sent;
    ssize_t size;
    PyObject *goaway = NULL;
    if (!attached(self)) {
        return NULL;
    }
    if (!PyList_Check(out)) {
        PyErr_SetString(PyExc_TypeError, "Pump.send wants a list");
        return NULL;
    }
    while ((size = mem_send(self->session, &sent)) > 0) {
        PyObject *frame = PyBytes_FromStringAndSize((const char *)sent, size);
        if (frame == NULL || PyList_Append(out, frame) < 0) {
            Py_XDECREF(frame);
            Py_XDECREF(goaway);
            return NULL;
        }
        if (goaway == NULL && size > 3 && sent[3] == GOAWAY) {
            goaway = Py_NewRef(frame);
        }
        Py_DECREF(frame);
    }
    if (size < 0) {
        Py_XDECREF(goaway);
        return PyLong_FromSsize_t(size);
    }
    return goaway ? goaway : Py_NewRef(Py_None);
}

static PyObject *pump_submit(Pump *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "submit(kind, stream_id, headers, with_data)");
        return NULL;
    }
    if (!attached(self)) {
        return NULL;
    }
    int kind = PyLong_AsLong(args[0]);
    int32_t stream_id = PyLong_AsLong(args[1]);
    int with_data = PyObject_IsTrue(args[3]);
    if (PyErr_Occurred()) {
        return NULL;
    }
    PyObject *headers = PySequence_Fast(args[2], "headers must be a sequence");
    if (headers == NULL) {
        return NULL;
    }
    Py_ssize_t count = PySequence_Fast_GET_SIZE(headers);
    nghttp2_nv fixed[32];
    nghttp2_nv *nva = count <= 32 ? fixed : PyMem_New(nghttp2_nv, count);
    PyObject *keep = PyList_New(0);  /* what field_bytes made, alive until nghttp2 copied the block */
    PyObject *result = NULL;
    if (nva == NULL) {
        PyErr_NoMemory();
    } else if (keep != NULL && pack_fields(headers, nva, count, keep) == 0) {
        const nghttp2_data_provider *data = with_data ? &provider : NULL;
        long got;
        switch (kind) {
        case SUBMIT_REQUEST:
            got = submit_request(self->session, NULL, nva, (size_t)count, data, NULL);
            break;
        case SUBMIT_RESPONSE:
            got = submit_response(self->session, stream_id, nva, (size_t)count, data);
            break;
        case SUBMIT_HEADERS:
            got = submit_headers(self->session, 0, stream_id, NULL, nva, (size_t)count, NULL);
            break;
        default:
            got = submit_trailer(self->session, stream_id, nva, (size_t)count);
            break;
        }
        result = PyLong_FromLong(got);
    }
    if (nva != fixed) {
        PyMem_Free(nva);
    }
    Py_XDECREF(keep);
    Py_DECREF(headers);
    return result;
}

static PyObject *pump_windows(Pump *self, PyObject *arg) {
    int32_t stream_id = PyLong_AsLong(arg);
    if (!attached(self) || (stream_id == -1 && PyErr_Occurred())) {
        return NULL;
    }
    long window = stream_remote_window(self->session, stream_id);
    if (window < 0) {  /* a request whose HEADERS are not sent yet: nghttp2 opens the stream then */
        window = (long)remote_settings(self->session, SETTINGS_INITIAL_WINDOW_SIZE);
    }
    return Py_BuildValue("(li)", window, remote_window(self->session));
}

static PyObject *pump_consume(Pump *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "consume(stream_id, size)");
        return NULL;
    }
    int32_t stream_id = PyLong_AsLong(args[0]);
    size_t size = PyLong_AsSize_t(args[1]);
    if (!attached(self) || PyErr_Occurred()) {
        return NULL;
    }
    return PyLong_FromLong(consume(self->session, stream_id, size));
}

static PyObject *pump_resume(Pump *self, PyObject *arg) {
    int32_t stream_id = PyLong_AsLong(arg);
    if (!attached(self) || (stream_id == -1 && PyErr_Occurred())) {
        return NULL;
    }
    return PyLong_FromLong(resume_data(self->session, stream_id));
}

static PyObject *pump_attach(Pump *self, PyObject *address) {
    void *session = PyLong_AsVoidPtr(address);
    if (session == NULL && PyErr_Occurred()) {
        return NULL;
    }
    self->session = session;
    Py_RETURN_NONE;
}

static PyMethodDef pump_methods[] = {
    {"attach", (PyCFunction)pump_attach, METH_O,
     "attach(address): the nghttp2_session (its address) this pump drives; its user_data is the pump"},
    {"recv", (PyCFunction)pump_recv, METH_O,
     "recv(data) -> int: nghttp2_session_mem_recv of ``data``, the callbacks calling the connection's methods"},
    {"submit", (PyCFunction)(void (*)(void))pump_submit, METH_FASTCALL,
     "submit(kind, stream_id, headers, with_data) -> int: a header block (0 request, 1 response, 2 headers, "
     "3 trailers), with the data provider when ``with_data``; what the nghttp2_submit_* function returned"},
    {"windows", (PyCFunction)pump_windows, METH_O,
     "windows(stream_id) -> (stream, connection): the peer's send windows (the stream's initial one before "
     "its HEADERS go)"},
    {"consume", (PyCFunction)(void (*)(void))pump_consume, METH_FASTCALL,
     "consume(stream_id, size) -> int: nghttp2_session_consume"},
    {"resume", (PyCFunction)pump_resume, METH_O, "resume(stream_id) -> int: nghttp2_session_resume_data"},
    {"send", (PyCFunction)pump_send, METH_O,
     "send(out) -> None | bytes | int: append every frame nghttp2_session_mem_send gives to the list ``out``; "
     "the first GOAWAY frame among them, or mem_send's error"},
    {NULL},
};

static PyTypeObject PumpType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "mesh.proxy.codec._nghttp2_pump.Pump",
    .tp_doc = "Pump(connection): drives an nghttp2 session for a Connection, with this module's callbacks.",
    .tp_basicsize = sizeof(Pump),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)pump_init,
    .tp_dealloc = (destructor)pump_dealloc,
    .tp_methods = pump_methods,
};

/* -- the module ----------------------------------------------------------------------------- */

/* The address of libnghttp2's function ``name`` in the dict ``functions``; NULL with an error set. */
static void *function(PyObject *functions, const char *name) {
    PyObject *address = PyDict_GetItemString(functions, name);
    if (address == NULL) {
        PyErr_Format(PyExc_KeyError, "bind: no address for %s", name);
        return NULL;
    }
    return PyLong_AsVoidPtr(address);
}

static PyObject *bind(PyObject *module, PyObject *args) {
    PyObject *functions, *tuple_type, *error_handler;
    if (!PyArg_ParseTuple(args, "O!OO:bind", &PyDict_Type, &functions, &tuple_type, &error_handler)) {
        return NULL;
    }
    if (!(mem_recv = (mem_recv_fn)function(functions, "nghttp2_session_mem_recv")) ||
        !(mem_send = (mem_send_fn)function(functions, "nghttp2_session_mem_send")) ||
        !(submit_request = (submit_request_fn)function(functions, "nghttp2_submit_request")) ||
        !(submit_response = (submit_response_fn)function(functions, "nghttp2_submit_response")) ||
        !(submit_headers = (submit_headers_fn)function(functions, "nghttp2_submit_headers")) ||
        !(submit_trailer = (submit_trailer_fn)function(functions, "nghttp2_submit_trailer")) ||
        !(consume = (consume_fn)function(functions, "nghttp2_session_consume")) ||
        !(resume_data = (resume_data_fn)function(functions, "nghttp2_session_resume_data")) ||
        !(stream_remote_window = (stream_window_fn)function(functions,
                                                            "nghttp2_session_get_stream_remote_window_size")) ||
        !(remote_window = (session_window_fn)function(functions, "nghttp2_session_get_remote_window_size")) ||
        !(remote_settings = (remote_settings_fn)function(functions, "nghttp2_session_get_remote_settings"))) {
        return NULL;
    }
    if (!PyType_Check(tuple_type) || !PyType_IsSubtype((PyTypeObject *)tuple_type, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "bind wants a tuple subclass for never-indexed fields");
        return NULL;
    }
    Py_XSETREF(never_indexed, Py_NewRef(tuple_type));
    Py_XSETREF(on_error, Py_NewRef(error_handler));
    Py_RETURN_NONE;
}

static PyObject *callback_addresses(PyObject *module, PyObject *unused) {
    return Py_BuildValue("{sNsNsNsNsNsN}",
                         "on_begin_headers", PyLong_FromVoidPtr((void *)on_begin_headers),
                         "on_header", PyLong_FromVoidPtr((void *)on_header),
                         "on_frame_recv", PyLong_FromVoidPtr((void *)on_frame_recv),
                         "on_invalid_frame_recv", PyLong_FromVoidPtr((void *)on_invalid_frame_recv),
                         "on_data_chunk_recv", PyLong_FromVoidPtr((void *)on_data_chunk_recv),
                         "on_stream_close", PyLong_FromVoidPtr((void *)on_stream_close));
}

static PyMethodDef module_methods[] = {
    {"bind", bind, METH_VARARGS,
     "bind(functions, never_indexed, on_error): {name: address} of libnghttp2's functions called here "
     "(FUNCTIONS), hpack.NeverIndexedHeaderTuple, and the function given (type, value, traceback) of an "
     "exception a connection's method raised in a callback"},
    {"callback_addresses", callback_addresses, METH_NOARGS,
     "callback_addresses() -> {name: address}: the session callbacks (the data provider is submit's)"},
    {NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_nghttp2_pump", "The HTTP/2 engine's session callbacks in C (see the C source).", -1,
    module_methods,
};

PyMODINIT_FUNC PyInit__nghttp2_pump(void) {
    struct { PyObject **name; const char *text; } names[] = {
        {&s_begin_headers, "_on_begin_headers"}, {&s_over_limit, "_over_limit"}, {&s_headers, "_on_headers"},
        {&s_end_stream, "_on_end_stream"}, {&s_window_update, "_on_window_update"}, {&s_settings, "_on_settings"},
        {&s_rst_stream, "_on_rst_stream"}, {&s_ping_ack, "_on_ping_ack"}, {&s_goaway, "_on_goaway"},
        {&s_invalid_frame, "_on_invalid_frame"}, {&s_data, "_on_data"}, {&s_close, "_on_close"},
        {&s_take, "_take"}, {&s_header_limit, "_header_limit"},
    };
    for (size_t index = 0; index < sizeof(names) / sizeof(names[0]); index++) {
        if ((*names[index].name = PyUnicode_InternFromString(names[index].text)) == NULL) {
            return NULL;
        }
    }
    if (PyType_Ready(&PumpType) < 0) {
        return NULL;
    }
    PyObject *module = PyModule_Create(&module_def);
    if (module == NULL) {
        return NULL;
    }
    if (PyModule_AddObject(module, "FUNCTIONS", Py_BuildValue("(sssssssssss)", "nghttp2_session_mem_recv",
            "nghttp2_session_mem_send", "nghttp2_submit_request", "nghttp2_submit_response",
            "nghttp2_submit_headers", "nghttp2_submit_trailer", "nghttp2_session_consume",
            "nghttp2_session_resume_data", "nghttp2_session_get_stream_remote_window_size",
            "nghttp2_session_get_remote_window_size", "nghttp2_session_get_remote_settings")) < 0 ||
        PyModule_AddObject(module, "Pump", Py_NewRef((PyObject *)&PumpType)) < 0) {
        Py_DECREF((PyObject *)&PumpType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
