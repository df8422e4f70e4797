/* ggml's backend implementation interface (buffer types, buffers), bindgen input for the
 * llama.cpp drop-in's home buffer type. Internal to ggml: bound per ggml version. */
#include "ggml-backend-impl.h"
