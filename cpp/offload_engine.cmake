# offload_engine.cmake: the imported target offload_engine::offload_engine for CMake hosts.
#
#   include(/path/to/offload-engine/cpp/offload_engine.cmake)
#   target_link_libraries(my_host PRIVATE offload_engine::offload_engine)
#
# It links liboffload_engine.a, which bundles the vendored ggml and llama.cpp (one ggml per
# process: link no other), and adds the include directories of ffi/ (the C header), cpp/
# (the C++ API) and the installed headers of that ggml and llama.cpp (ggml.h, llama.h).
#
# Cache variables:
#   OFFLOAD_ENGINE_LIB            liboffload_engine.a; default <target dir>/release/, where the
#                                 target dir is $CARGO_TARGET_DIR or <repo>/target
#   OFFLOAD_ENGINE_GGML_INCLUDE   the headers; default: found beside OFFLOAD_ENGINE_LIB
#   OFFLOAD_ENGINE_WITH_CUDA      the library was built with --features cuda
#   OFFLOAD_ENGINE_EXTRA_LIBS     anything else the archive needs
include_guard(GLOBAL)

get_filename_component(OFFLOAD_ENGINE_ROOT "${CMAKE_CURRENT_LIST_DIR}/.." ABSOLUTE)

if(DEFINED ENV{CARGO_TARGET_DIR} AND NOT "$ENV{CARGO_TARGET_DIR}" STREQUAL "")
    get_filename_component(_oe_target_dir "$ENV{CARGO_TARGET_DIR}" ABSOLUTE BASE_DIR "${OFFLOAD_ENGINE_ROOT}")
else()
    set(_oe_target_dir "${OFFLOAD_ENGINE_ROOT}/target")
endif()
set(OFFLOAD_ENGINE_LIB "${_oe_target_dir}/release/liboffload_engine.a"
    CACHE FILEPATH "liboffload_engine.a (static; it bundles the vendored ggml and llama.cpp)")
set(OFFLOAD_ENGINE_GGML_INCLUDE "" CACHE PATH "directory holding ggml.h, ggml-backend.h, gguf.h, llama.h")
set(OFFLOAD_ENGINE_EXTRA_LIBS "" CACHE STRING "extra libraries to link after the archive")
option(OFFLOAD_ENGINE_WITH_CUDA "the library was built with --features cuda: link CUDA's libraries" OFF)

if(NOT EXISTS "${OFFLOAD_ENGINE_LIB}")
    message(FATAL_ERROR "OFFLOAD_ENGINE_LIB: ${OFFLOAD_ENGINE_LIB} does not exist; build it with "
                        "`cargo build --release --lib` or point OFFLOAD_ENGINE_LIB at liboffload_engine.a")
endif()
# Cargo installs the vendored ggml and llama.cpp headers under
# <profile>/build/llama-cpp-sys-2-<hash>/out/include.
if(NOT OFFLOAD_ENGINE_GGML_INCLUDE)
    get_filename_component(_oe_profile_dir "${OFFLOAD_ENGINE_LIB}" DIRECTORY)
    file(GLOB _oe_ggml_headers "${_oe_profile_dir}/build/llama-cpp-sys-2-*/out/include/ggml-backend.h")
    if(_oe_ggml_headers)
        list(GET _oe_ggml_headers 0 _oe_first)
        get_filename_component(_oe_include "${_oe_first}" DIRECTORY)
        set(OFFLOAD_ENGINE_GGML_INCLUDE "${_oe_include}" CACHE PATH "directory holding ggml.h, ggml-backend.h, gguf.h, llama.h" FORCE)
    endif()
endif()
if(NOT EXISTS "${OFFLOAD_ENGINE_GGML_INCLUDE}/ggml-backend.h")
    message(FATAL_ERROR "OFFLOAD_ENGINE_GGML_INCLUDE: no ggml-backend.h in '${OFFLOAD_ENGINE_GGML_INCLUDE}'; "
                        "set it to the vendored ggml's include directory")
endif()
message(STATUS "offload-engine library: ${OFFLOAD_ENGINE_LIB}")
message(STATUS "ggml and llama.cpp headers: ${OFFLOAD_ENGINE_GGML_INCLUDE}")

find_package(Threads REQUIRED)
set(_oe_extra ${OFFLOAD_ENGINE_EXTRA_LIBS})
if(OFFLOAD_ENGINE_WITH_CUDA)
    find_package(CUDAToolkit REQUIRED)
    list(APPEND _oe_extra CUDA::cudart CUDA::cublas CUDA::cublasLt CUDA::cuda_driver)
endif()

add_library(offload_engine::offload_engine STATIC IMPORTED GLOBAL)
set_target_properties(offload_engine::offload_engine PROPERTIES IMPORTED_LOCATION "${OFFLOAD_ENGINE_LIB}")
target_include_directories(offload_engine::offload_engine INTERFACE
    "${OFFLOAD_ENGINE_ROOT}/ffi" "${OFFLOAD_ENGINE_ROOT}/cpp")
# SYSTEM: warnings in ggml's and llama.cpp's headers are not the host's.
target_include_directories(offload_engine::offload_engine SYSTEM INTERFACE "${OFFLOAD_ENGINE_GGML_INCLUDE}")
# What a Rust staticlib needs from the system (`rustc --print native-static-libs`), and the
# C++ runtime ggml and llama.cpp use.
target_link_libraries(offload_engine::offload_engine INTERFACE
    ${_oe_extra} Threads::Threads ${CMAKE_DL_LIBS} m rt util stdc++)
