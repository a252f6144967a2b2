/* A batch of JPEGs decoded into one uint8 N x H x W x 3 buffer with the GIL released once.
 *
 * Why C: the loader's decode threads each take the GIL back after every image when the decoder is
 * called per image from Python, and on a busy machine those hand-overs cost about a third of a
 * decode. Here a whole batch is decoded (and flipped) without Python in between. A flipped image is
 * decoded into a scratch image and copied out mirrored, five pixels per byte shuffle where the CPU has
 * SSSE3: mirroring pixel by pixel afterwards cost ~15 % of a 112x112 decode (bench/loader.py).
 *
 * Only the plain case is handled: a baseline or progressive YCbCr or grayscale JPEG of exactly the
 * slot's size, with no EXIF segment and nothing libjpeg warns about. Every other image is left to the
 * Python path (cv2.imdecode, which rotates by EXIF, resizes, converts CMYK and keeps what decodes of
 * a damaged file): its status byte says so. libjpeg's defaults (accurate integer IDCT, smooth chroma
 * upsampling) are the settings cv2.imdecode uses, so the pixels are cv2's.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jpeglib.h>

enum { DECODED = 0, LEFT_TO_PYTHON = 1 };

typedef struct {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
} bail_out;

static void bail_on_error(j_common_ptr cinfo) { longjmp(((bail_out *)cinfo->err)->jump, 1); }

/* A warning (level -1) means damaged data: cv2 decides what to keep of it, so stop here. */
static void bail_on_warning(j_common_ptr cinfo, int level) {
    if (level < 0) longjmp(((bail_out *)cinfo->err)->jump, 1);
}

static void say_nothing(j_common_ptr cinfo) { (void)cinfo; }

/* An APP1 "Exif" segment among the application segments that lead the file (cv2 rotates by it). */
static int has_exif(const uint8_t *p, size_t n) {
    size_t pos = 2;
    while (n >= 8 && pos < n - 8 && p[pos] == 0xFF) {
        uint8_t marker = p[pos + 1];
        if (!((marker >= 0xE0 && marker <= 0xEF) || marker == 0xFE)) return 0;
        if (marker == 0xE1 && memcmp(p + pos + 4, "Exif", 4) == 0) return 1;
        pos += 2 + ((size_t)p[pos + 2] << 8 | p[pos + 3]);
    }
    return 0;
}

/* Row `src` mirrored left-right into `dst` (rows of 3-byte pixels), from dst pixel `from` on. */
static void mirror_copy_plain(uint8_t *dst, const uint8_t *src, JDIMENSION from, JDIMENSION width) {
    for (JDIMENSION x = from; x < width; x++) {
        const uint8_t *p = src + (size_t)(width - 1 - x) * 3;
        dst[3 * x] = p[0], dst[3 * x + 1] = p[1], dst[3 * x + 2] = p[2];
    }
}

#if defined(__x86_64__) || defined(__i386__)
#include <tmmintrin.h>
#define MIRROR_SIMD 1
/* Five pixels a step with one byte shuffle (a plain pixel loop costs ~15 % of a 112x112 decode).
 * dst pixels j..j+4 are src pixels w-1-j..w-5-j: a 16-byte load at src pixel w-5-j, reversed by
 * pixel. Each store's 16th byte spills into dst pixel j+5, which the next step (or the plain loop)
 * writes: steps stop while that pixel is still in the row. The load at j = 0 reads one byte past the
 * row, so `src` needs a byte of padding after its last row. */
__attribute__((target("ssse3"))) static void mirror_copy_ssse3(uint8_t *dst, const uint8_t *src,
                                                                JDIMENSION width) {
    const __m128i by_pixel = _mm_setr_epi8(12, 13, 14, 9, 10, 11, 6, 7, 8, 3, 4, 5, 0, 1, 2, 15);
    JDIMENSION j = 0;
    for (; j + 6 <= width; j += 5) {
        __m128i v = _mm_loadu_si128((const __m128i *)(src + (size_t)(width - 5 - j) * 3));
        _mm_storeu_si128((__m128i *)(dst + (size_t)j * 3), _mm_shuffle_epi8(v, by_pixel));
    }
    mirror_copy_plain(dst, src, j, width);
}
#else
#define MIRROR_SIMD 0
#endif

static int use_ssse3; /* set once at import */

/* `height` rows of `src` (one byte of padding after them) mirrored into `dst`. */
static void mirror_image(uint8_t *dst, const uint8_t *src, JDIMENSION height, JDIMENSION width) {
    size_t row = (size_t)width * 3;
    for (JDIMENSION y = 0; y < height; y++) {
#if MIRROR_SIMD
        if (use_ssse3) {
            mirror_copy_ssse3(dst + y * row, src + y * row, width);
            continue;
        }
#endif
        mirror_copy_plain(dst + y * row, src + y * row, 0, width);
    }
}

/* One image into `target` (its slot, or the scratch image a mirrored one is copied from); DECODED or
 * LEFT_TO_PYTHON. The setjmp lives here so that nothing the longjmp skips over is a local the caller
 * still needs. */
static int decode_one(struct jpeg_decompress_struct *cinfo, bail_out *err, const uint8_t *p, size_t n,
                      uint8_t *target, JSAMPROW *rows, JDIMENSION height, JDIMENSION width,
                      J_COLOR_SPACE order) {
    if (n < 4 || p[0] != 0xFF || p[1] != 0xD8 || has_exif(p, n)) return LEFT_TO_PYTHON;
    if (setjmp(err->jump)) {
        jpeg_abort_decompress(cinfo);
        return LEFT_TO_PYTHON;
    }
    jpeg_mem_src(cinfo, p, (unsigned long)n);
    jpeg_read_header(cinfo, TRUE);
    if (cinfo->image_width != width || cinfo->image_height != height ||
        (cinfo->jpeg_color_space != JCS_YCbCr && cinfo->jpeg_color_space != JCS_GRAYSCALE)) {
        jpeg_abort_decompress(cinfo);
        return LEFT_TO_PYTHON;
    }
    cinfo->out_color_space = order;
    jpeg_start_decompress(cinfo);
    /* every row's address at once: libjpeg hands out as many rows per call as it has ready */
    for (JDIMENSION y = 0; y < height; y++) rows[y] = target + (size_t)y * width * 3;
    while (cinfo->output_scanline < height)
        jpeg_read_scanlines(cinfo, rows + cinfo->output_scanline, height - cinfo->output_scanline);
    jpeg_finish_decompress(cinfo);
    return DECODED;
}

static int get_buffer(PyObject *obj, Py_buffer *view, int writable, const char *what) {
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0)) < 0) return -1;
    if (view->itemsize < 1) {
        PyErr_Format(PyExc_TypeError, "%s: not a byte buffer", what);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(decode_batch_doc,
"decode_batch(sources, which, starts, ends, flips, out, height, width, rgb) -> bytes\n\n"
"Decode image k, sources[which[k]][starts[k]:ends[k]], into out[k] (uint8, N x height x width x 3,\n"
"C order) in RGB or BGR order, mirrored left-right where flips[k] is non-zero. `sources` is a list\n"
"of byte buffers (a batch's row groups); which, starts and ends are int64, flips one byte per image.\n"
"Returns one status byte per image: 0 decoded, 1 left to the caller (not a plain JPEG of this size,\n"
"or a span outside its source).");

/* The buffers one call holds; released in one place whatever went wrong. */
typedef struct {
    Py_buffer *sources;
    Py_ssize_t nsources, held_sources;
    Py_buffer which, starts, ends, flips, out;
    int held; /* how many of which, starts, ends, flips, out (in that order) are held */
    JSAMPROW *rows;
    uint8_t *scratch; /* one image and a byte of padding: mirrored images are decoded here first */
} call_buffers;

static void release(call_buffers *c) {
    Py_buffer *fixed[] = {&c->which, &c->starts, &c->ends, &c->flips, &c->out};
    for (int i = 0; i < c->held; i++) PyBuffer_Release(fixed[i]);
    for (Py_ssize_t i = 0; i < c->held_sources; i++) PyBuffer_Release(&c->sources[i]);
    PyMem_Free(c->sources);
    PyMem_RawFree(c->rows);
    PyMem_RawFree(c->scratch);
}

static int hold(call_buffers *c, PyObject *obj, Py_buffer *view, int writable, const char *what) {
    if (get_buffer(obj, view, writable, what) < 0) return -1;
    c->held++;
    return 0;
}

/* The GIL-free part: every image of the batch. */
static void decode_all(call_buffers *c, Py_ssize_t count, JDIMENSION height, JDIMENSION width,
                       J_COLOR_SPACE order, uint8_t *codes) {
    const int64_t *which = c->which.buf, *first = c->starts.buf, *last = c->ends.buf;
    const uint8_t *mirror = c->flips.buf;
    size_t image_bytes = (size_t)height * width * 3;
    struct jpeg_decompress_struct cinfo;
    bail_out err;
    cinfo.err = jpeg_std_error(&err.pub);
    err.pub.error_exit = bail_on_error;
    err.pub.emit_message = bail_on_warning;
    err.pub.output_message = say_nothing;
    jpeg_create_decompress(&cinfo);
    for (Py_ssize_t k = 0; k < count; k++) {
        int64_t source = which[k], a = first[k], b = last[k];
        uint8_t *slot = (uint8_t *)c->out.buf + (size_t)k * image_bytes;
        codes[k] = LEFT_TO_PYTHON;
        if (source < 0 || source >= c->nsources || a < 0 || b < a || b > c->sources[source].len) continue;
        const uint8_t *bytes = (const uint8_t *)c->sources[source].buf + a;
        uint8_t *target = mirror[k] ? c->scratch : slot;
        codes[k] = (uint8_t)decode_one(&cinfo, &err, bytes, (size_t)(b - a), target, c->rows, height, width, order);
        if (codes[k] == DECODED && mirror[k]) mirror_image(slot, c->scratch, height, width);
    }
    jpeg_destroy_decompress(&cinfo);
}

static PyObject *decode_batch(PyObject *self, PyObject *args) {
    PyObject *sources_obj, *which_obj, *starts_obj, *ends_obj, *flips_obj, *out_obj, *status = NULL;
    Py_ssize_t height, width;
    int rgb;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOOOOOnnp", &sources_obj, &which_obj, &starts_obj, &ends_obj, &flips_obj,
                          &out_obj, &height, &width, &rgb))
        return NULL;
    if (height <= 0 || width <= 0 || height > 65500 || width > 65500) {
        PyErr_SetString(PyExc_ValueError, "height and width must be in 1..65500");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(sources_obj, "sources must be a list of byte buffers");
    if (seq == NULL) return NULL;
    call_buffers c = {0};
    c.nsources = PySequence_Fast_GET_SIZE(seq);
    c.sources = PyMem_Calloc((size_t)c.nsources + 1, sizeof(Py_buffer));
    if (c.sources == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < c.nsources; i++) {
        if (get_buffer(PySequence_Fast_GET_ITEM(seq, i), &c.sources[i], 0, "sources") < 0) goto done;
        c.held_sources++;
    }
    if (hold(&c, which_obj, &c.which, 0, "which") < 0 || hold(&c, starts_obj, &c.starts, 0, "starts") < 0 ||
        hold(&c, ends_obj, &c.ends, 0, "ends") < 0 || hold(&c, flips_obj, &c.flips, 0, "flips") < 0 ||
        hold(&c, out_obj, &c.out, 1, "out") < 0)
        goto done;

    Py_ssize_t count = c.starts.len / (Py_ssize_t)sizeof(int64_t);
    size_t image_bytes = (size_t)height * (size_t)width * 3;
    if (c.starts.len != count * (Py_ssize_t)sizeof(int64_t) || c.ends.len != c.starts.len ||
        c.which.len != c.starts.len || c.flips.len != count) {
        PyErr_SetString(PyExc_ValueError, "which, starts and ends need 8 bytes per image, flips one");
        goto done;
    }
    if ((size_t)c.out.len < (size_t)count * image_bytes) {
        PyErr_Format(PyExc_ValueError, "out holds %zd bytes, %zd images need %zu", c.out.len, count,
                     (size_t)count * image_bytes);
        goto done;
    }
    status = PyBytes_FromStringAndSize(NULL, count);
    c.rows = PyMem_RawMalloc((size_t)height * sizeof(JSAMPROW));
    c.scratch = PyMem_RawMalloc(image_bytes + 16);
    if (status == NULL || c.rows == NULL || c.scratch == NULL) {
        if (status != NULL) PyErr_NoMemory();
        goto done;
    }
    uint8_t *codes = (uint8_t *)PyBytes_AS_STRING(status);
    J_COLOR_SPACE order = rgb ? JCS_EXT_RGB : JCS_EXT_BGR;
    Py_BEGIN_ALLOW_THREADS
    decode_all(&c, count, (JDIMENSION)height, (JDIMENSION)width, order, codes);
    Py_END_ALLOW_THREADS

done:
    release(&c);
    Py_DECREF(seq);
    if (PyErr_Occurred()) {
        Py_CLEAR(status);
        return NULL;
    }
    return status;
}

static PyMethodDef methods[] = {
    {"decode_batch", decode_batch, METH_VARARGS, decode_batch_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_jpeg_batch",
    "Batch JPEG decoding into preallocated memory with the GIL released (libjpeg-turbo).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__jpeg_batch(void) {
#if MIRROR_SIMD
    __builtin_cpu_init();
    /* FACEPIPE_PLAIN_MIRROR=1 takes the plain loop that machines without SSSE3 run (tests compare both) */
    const char *plain = getenv("FACEPIPE_PLAIN_MIRROR");
    use_ssse3 = __builtin_cpu_supports("ssse3") && !(plain && plain[0] == '1');
#endif
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddIntConstant(m, "LIBJPEG_VERSION", JPEG_LIB_VERSION) < 0 ||
        PyModule_AddIntConstant(m, "SIMD_MIRROR", use_ssse3) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
