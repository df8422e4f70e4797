// llama_host: a llama.cpp program in the shape of llama.cpp's own "simple" example (load a
// model, tokenize a prompt, decode it, then greedy tokens one at a time), plus the two calls
// that stream its layers through offload-engine (cpp/offload_engine_llama.hpp).
//
//   llama_host -m model.gguf [-p PROMPT] [-n N] [--vram-budget SIZE] [--prefetch N]
//              [--compute-reserve SIZE] [--kv-cache SIZE] [--device NAME] [--file-backed]
//              [--no-mmap] [--threads N] [--no-engine]
//
// --no-engine runs unmodified llama.cpp. Both ways the program prints the generated text and
// a line "checksum: <hex>" over every token and every logit bit, so two runs can be compared.
// Exit status: 0 on success, 1 on any error (with the library's or llama.cpp's message).
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "llama.h"
#include "offload_engine_llama.hpp"

namespace oe = offload_engine;

namespace {

struct Args {
    std::string model;
    std::string prompt = "The three primary colors are";
    int n_predict = 16;
    uint64_t vram_budget = 0;
    uint64_t compute_reserve = UINT64_MAX;  // estimated by the engine
    uint64_t kv_cache = UINT64_MAX;
    uint32_t prefetch = 1;
    std::string device;
    bool file_backed = false;
    bool mmap = true;
    int threads = 2;
    bool engine = true;
    uint32_t n_ctx = 256;
};

void usage(const char *argv0) {
    std::fprintf(stderr,
                 "usage: %s -m model.gguf [-p PROMPT] [-n N] [--vram-budget SIZE] [--prefetch N]\n"
                 "          [--compute-reserve SIZE] [--kv-cache SIZE] [--device NAME] [--file-backed]\n"
                 "          [--no-mmap] [--threads N] [--no-engine]\n",
                 argv0);
}

bool parse_args(int argc, char **argv, Args &args) {
    for (int i = 1; i < argc; i++) {
        std::string a = argv[i];
        auto value = [&](const char *what) -> const char * {
            if (i + 1 >= argc) {
                std::fprintf(stderr, "%s needs a value\n", what);
                return nullptr;
            }
            return argv[++i];
        };
        const char *v = nullptr;
        if (a == "-m" && (v = value("-m"))) {
            args.model = v;
        } else if (a == "-p" && (v = value("-p"))) {
            args.prompt = v;
        } else if (a == "-n" && (v = value("-n"))) {
            args.n_predict = std::atoi(v);
        } else if ((a == "--vram-budget" || a == "--compute-reserve" || a == "--kv-cache") && (v = value(a.c_str()))) {
            auto bytes = oe::parse_size(v);
            if (!bytes) {
                std::fprintf(stderr, "%s: %s\n", a.c_str(), bytes.error().message.c_str());
                return false;
            }
            (a == "--vram-budget" ? args.vram_budget : a == "--kv-cache" ? args.kv_cache : args.compute_reserve) = *bytes;
        } else if (a == "--prefetch" && (v = value("--prefetch"))) {
            args.prefetch = static_cast<uint32_t>(std::atoi(v));
        } else if (a == "--device" && (v = value("--device"))) {
            args.device = v;
        } else if (a == "--threads" && (v = value("--threads"))) {
            args.threads = std::atoi(v);
        } else if (a == "--file-backed") {
            args.file_backed = true;
        } else if (a == "--no-mmap") {
            args.mmap = false;
        } else if (a == "--no-engine") {
            args.engine = false;
        } else {
            return false;
        }
    }
    return !args.model.empty() && args.n_predict > 0;
}

// FNV-1a over bytes.
uint64_t fnv(uint64_t h, const void *data, size_t size) {
    const auto *p = static_cast<const unsigned char *>(data);
    for (size_t i = 0; i < size; i++) h = (h ^ p[i]) * 1099511628211ull;
    return h;
}

void quiet_log(ggml_log_level level, const char *text, void *) {
    if (level == GGML_LOG_LEVEL_ERROR) std::fputs(text, stderr);
}

}  // namespace

int main(int argc, char **argv) {
    Args args;
    if (!parse_args(argc, argv, args)) {
        usage(argv[0]);
        return 1;
    }
    llama_log_set(quiet_log, nullptr);
    llama_backend_init();

    llama_model_params mparams = llama_model_default_params();
    mparams.load_mode = args.mmap ? LLAMA_LOAD_MODE_MMAP : LLAMA_LOAD_MODE_NONE;
    // The engine's arena keeps ggml's plain weight layout; so does the reference run.
    mparams.use_extra_bufts = false;

    // Call 1: plan from the file and fill the model parameters.
    std::unique_ptr<oe::LlamaOffload> offload;
    if (args.engine) {
        oe::LlamaOptions options;
        options.device = args.device;
        options.vram_budget = args.vram_budget;
        options.compute_reserve = args.compute_reserve;
        options.kv_cache = args.kv_cache;
        options.prefetch_depth = args.prefetch;
        options.file_backed = args.file_backed;
        options.n_ctx = args.n_ctx;
        options.n_ubatch = args.n_ctx;
        auto prepared = oe::LlamaOffload::prepare(args.model, mparams, options);
        if (!prepared) {
            std::fprintf(stderr, "offload-engine: %s\n", prepared.error().message.c_str());
            return 1;
        }
        offload = std::make_unique<oe::LlamaOffload>(std::move(*prepared));
    }

    llama_model *model = llama_model_load_from_file(args.model.c_str(), mparams);
    if (model == nullptr) {
        std::fprintf(stderr, "llama.cpp could not load %s\n", args.model.c_str());
        return 1;
    }

    llama_context_params cparams = llama_context_default_params();
    cparams.n_ctx = args.n_ctx;
    cparams.n_batch = args.n_ctx;
    cparams.n_ubatch = args.n_ctx;
    cparams.n_threads = args.threads;
    cparams.n_threads_batch = args.threads;
    cparams.no_perf = true;
    // Call 2: place the model and fill the context parameters.
    if (offload) {
        auto plan = offload->attach(model, cparams);
        if (!plan) {
            std::fprintf(stderr, "offload-engine: %s\n", plan.error().message.c_str());
            llama_model_free(model);
            return 1;
        }
        std::printf("plan: %.*s\n", static_cast<int>(plan->message().size()), plan->message().data());
    }
    llama_context *ctx = llama_init_from_model(model, cparams);
    if (ctx == nullptr) {
        std::fprintf(stderr, "llama.cpp could not make a context\n");
        llama_model_free(model);
        return 1;
    }

    const llama_vocab *vocab = llama_model_get_vocab(model);
    const int n_vocab = llama_vocab_n_tokens(vocab);
    std::vector<llama_token> tokens(args.prompt.size() + 8);
    int n = llama_tokenize(vocab, args.prompt.c_str(), static_cast<int>(args.prompt.size()), tokens.data(),
                           static_cast<int>(tokens.size()), true, true);
    if (n <= 0) {
        std::fprintf(stderr, "the prompt tokenizes to nothing\n");
        return 1;
    }
    tokens.resize(static_cast<size_t>(n));

    uint64_t checksum = 1469598103934665603ull;
    int status = 0;
    std::string text;
    llama_batch batch = llama_batch_get_one(tokens.data(), static_cast<int>(tokens.size()));
    llama_token token = 0;
    for (int i = 0; i < args.n_predict; i++) {
        if (llama_decode(ctx, batch) != 0) {
            std::fprintf(stderr, "llama_decode failed\n");
            status = 1;
            break;
        }
        if (offload) {
            if (auto ok = offload->status(); !ok) {
                std::fprintf(stderr, "offload-engine: %s\n", ok.error().message.c_str());
                status = 1;
                break;
            }
        }
        const float *logits = llama_get_logits_ith(ctx, -1);
        checksum = fnv(checksum, logits, sizeof(float) * static_cast<size_t>(n_vocab));
        token = 0;
        for (int t = 1; t < n_vocab; t++) {
            if (logits[t] > logits[token]) token = t;
        }
        if (llama_vocab_is_eog(vocab, token)) break;
        checksum = fnv(checksum, &token, sizeof token);
        char piece[128];
        int len = llama_token_to_piece(vocab, token, piece, sizeof piece, 0, false);
        if (len > 0) text.append(piece, static_cast<size_t>(len));
        batch = llama_batch_get_one(&token, 1);
    }
    std::printf("%s%s\n", args.prompt.c_str(), text.c_str());
    std::printf("checksum: %016" PRIx64 "\n", checksum);
    if (offload) {
        if (auto stats = offload->stats()) {
            std::printf("engine: %" PRIu64 " passes, %" PRIu64 " bytes streamed, %" PRIu64 " copied, prefetch hits %" PRIu64
                        " misses %" PRIu64 "\n",
                        stats->passes, stats->streamed_bytes, stats->bytes_copied, stats->prefetch_hits,
                        stats->prefetch_misses);
        }
    }

    llama_free(ctx);
    if (offload) {
        if (auto detached = offload->detach(); !detached) {
            std::fprintf(stderr, "offload-engine: %s\n", detached.error().message.c_str());
            status = 1;
        }
    }
    llama_model_free(model);
    offload.reset();
    llama_backend_free();
    return status;
}
