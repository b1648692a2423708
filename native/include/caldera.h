/* Caldera's native inference library: a C ABI over libtorch's AOTInductor package loader and TorchScript.
 *
 * Every call returns a status; on failure caldera_last_error() gives a one-line message (thread-local, valid until
 * the next failing call on the same thread). No call aborts the process or lets a C++ exception escape.
 * Arrays are caller-owned, C-order (row-major), contiguous. A model handle may be shared between threads: calls on
 * one handle are serialised by the library; use one handle per thread for parallel inference. */
#ifndef CALDERA_H
#define CALDERA_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define CALDERA_API __attribute__((visibility("default")))
#else
#define CALDERA_API
#endif

typedef struct caldera_model caldera_model;

typedef enum {
  CALDERA_OK = 0,
  CALDERA_ERR_ARG = 1,    /* a NULL pointer, a bad index, an unknown device string */
  CALDERA_ERR_LOAD = 2,   /* the path is missing or not a package/TorchScript file caldera can read */
  CALDERA_ERR_SHAPE = 3,  /* an input or output shape differs from the model's recorded shape */
  CALDERA_ERR_DTYPE = 4,  /* an input or output dtype differs from the model's */
  CALDERA_ERR_DEVICE = 5, /* CUDA asked of a CPU-only build, or a package compiled for another device */
  CALDERA_ERR_RUN = 6     /* the model itself failed */
} caldera_status;

typedef enum { CALDERA_FLOAT32 = 0, CALDERA_FLOAT64 = 1 } caldera_dtype;

/* path: an export directory (loads model.aoti.pt2, or model.aoti-cuda.pt2 for a CUDA device), a .pt2 AOTInductor
 * package, or a .ts TorchScript file; device: "cpu", "cuda", "cuda:N" (NULL = "cpu"). */
CALDERA_API caldera_status caldera_load(const char *path, const char *device, caldera_model **out);

/* Single input, first output. x is read in place where dtype and layout allow (no copy); y is written. */
CALDERA_API caldera_status caldera_run(caldera_model *m, const void *x, const int64_t *x_shape, int x_ndim, int x_dtype,
                           void *y, const int64_t *y_shape, int y_ndim, int y_dtype);

/* Several inputs and outputs (e.g. energy and forces); n_out may be fewer than the model's outputs. */
CALDERA_API caldera_status caldera_run_n(caldera_model *m, int n_in, const void *const *xs, const int64_t *const *x_shapes,
                             const int *x_ndims, const int *x_dtypes, int n_out, void *const *ys,
                             const int64_t *const *y_shapes, const int *y_ndims, const int *y_dtypes);

/* Counts and recorded shapes (-1 = dynamic, e.g. the batch). shape must hold 8 entries. TorchScript files carry
 * no recorded shapes: the shape calls return CALDERA_ERR_ARG for them. */
CALDERA_API int caldera_n_inputs(const caldera_model *m);
CALDERA_API int caldera_n_outputs(const caldera_model *m);
CALDERA_API caldera_status caldera_input_shape(const caldera_model *m, int i, int64_t *shape, int *ndim);
CALDERA_API caldera_status caldera_output_shape(const caldera_model *m, int i, int64_t *shape, int *ndim);

/* The package metadata value of `key`: what `caldera export` recorded, e.g. "caldera.data.steps" (the data
 * source's arguments, here the span of explicit steps the heat surrogate replaces), "caldera.config_hash",
 * "caldera.inputs". On entry *len is buf's size in bytes; on return it is the value's length without the NUL.
 * The value is copied NUL-terminated when it fits; when it does not (or buf is NULL) the call returns
 * CALDERA_ERR_ARG with *len set, so a second call with *len + 1 bytes gets it. A key the package lacks is
 * CALDERA_ERR_ARG with *len = -1. TorchScript files carry no metadata (every key is missing). */
CALDERA_API caldera_status caldera_metadata(const caldera_model *m, const char *key, char *buf, int64_t *len);

/* The message of the last failure on this thread ("" when none). */
CALDERA_API const char *caldera_last_error(void);

/* Release a model (NULL is ignored). */
CALDERA_API void caldera_free(caldera_model *m);

#define CALDERA_MAX_NDIM 8

#ifdef __cplusplus
}
#endif
#endif
