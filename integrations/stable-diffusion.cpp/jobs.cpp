// sd-jobs: a library host that keeps its models loaded between jobs, as sd-server does
// (free_params_immediately off), so every component's engine lives on while the next one
// runs and the pipeline keeps them all under one budget.
//
//   sd-jobs MODEL TAESD LORA|- OUTDIR JOBS [MAX_VRAM_GIB]
//
// Runs JOBS text-to-image jobs (64x64, 4 euler steps, CFG 7, seed 42) in one sd_ctx and writes
// each image's raw RGB bytes to OUTDIR/job<N>.rgb. Job 1 applies LORA at 0.5, merged into
// the weights (sd.cpp's "immediately" mode), and job 2 takes it out again. With MAX_VRAM_GIB the weights stream through offload-engine within that budget
// (--stream-layers --offload-to-cpu --max-vram); without it sd.cpp runs as it ships. Exit
// status 1 on any failure, with the reason.
#include <cstdio>
#include <cstdlib>
#include <string>

#include "stable-diffusion.h"

int main(int argc, char** argv) {
    if (argc != 6 && argc != 7) {
        std::fprintf(stderr, "usage: sd-jobs MODEL TAESD LORA|- OUTDIR JOBS [MAX_VRAM_GIB]\n");
        return 2;
    }
    const std::string lora_path = argv[3];
    const char* out_dir         = argv[4];
    const int jobs              = std::atoi(argv[5]);
    const bool streaming        = argc == 7;
    if (streaming) {
        sd_layer_streaming_params_t lp = {true, 1, -1};
        if (!sd_set_layer_streaming(&lp)) {
            std::fprintf(stderr, "sd-jobs: layer streaming refused\n");
            return 1;
        }
    }
    sd_ctx_params_t cp;
    sd_ctx_params_init(&cp);
    cp.model_path              = argv[1];
    cp.taesd_path              = argv[2];
    cp.free_params_immediately = false;
    cp.n_threads               = 2;
    cp.offload_params_to_cpu   = streaming;
    cp.max_vram                = streaming ? std::strtof(argv[6], nullptr) : 0.f;
    cp.lora_apply_mode         = LORA_APPLY_IMMEDIATELY;
    sd_ctx_t* ctx              = new_sd_ctx(&cp);
    if (ctx == nullptr) {
        std::fprintf(stderr, "sd-jobs: the model did not load\n");
        return 1;
    }
    int status = 0;
    for (int job = 0; job < jobs && status == 0; ++job) {
        sd_img_gen_params_t gp;
        sd_img_gen_params_init(&gp);
        gp.prompt                           = "a lighthouse on a cliff";
        gp.negative_prompt                  = "blurry";
        gp.width                            = 64;
        gp.height                           = 64;
        gp.seed                             = 42;
        gp.batch_count                      = 1;
        gp.sample_params.sample_method      = EULER_SAMPLE_METHOD;
        gp.sample_params.sample_steps       = 4;
        gp.sample_params.guidance.txt_cfg   = 7.f;
        sd_lora_t lora                      = {false, 0.5f, lora_path.c_str()};
        if (lora_path != "-" && job == 1) {
            gp.loras      = &lora;
            gp.lora_count = 1;
        }
        sd_image_t* image                   = generate_image(ctx, &gp);
        if (image == nullptr || image->data == nullptr) {
            const char* refusal = sd_layer_streaming_refusal();
            std::fprintf(stderr, "sd-jobs: job %d failed%s%s\n", job, refusal ? ": " : "", refusal ? refusal : "");
            status = 1;
            break;
        }
        std::string path = std::string(out_dir) + "/job" + std::to_string(job) + ".rgb";
        FILE* f          = std::fopen(path.c_str(), "wb");
        size_t bytes     = static_cast<size_t>(image->width) * image->height * image->channel;
        if (f == nullptr || std::fwrite(image->data, 1, bytes, f) != bytes) {
            std::fprintf(stderr, "sd-jobs: cannot write %s\n", path.c_str());
            status = 1;
        }
        if (f != nullptr) {
            std::fclose(f);
        }
        std::free(image->data);
        std::free(image);
    }
    free_sd_ctx(ctx);
    return status;
}
