"""The one settings schema. Every setting the app has is declared here, once.

Names, defaults and ranges of the video_config section are the product's own (see
docs/settings.md); the rest follow OneTrainer's names where it has them.
"""

from __future__ import annotations

from typing import Any

from .fields import (
    PATH_FILE,
    PATH_FOLDER,
    PATH_MODEL,
    PATH_OUTPUT,
    Section,
    SectionList,
    boolean,
    choice,
    integer,
    number,
    path,
    string,
    string_list,
)

TRAINING_METHODS = ("LORA", "FINE_TUNE", "EMBEDDING")
MODEL_TYPES = (
    "AUTO",
    "WAN_2_1",
    "WAN_2_2_TI2V_5B",
    "WAN_2_2_A14B_T2V",
    "WAN_2_2_A14B_I2V",
    "HUNYUAN_VIDEO",
    "HUNYUAN_VIDEO_I2V",
    "COGVIDEOX",
    "COGVIDEOX_I2V",
    "HIDREAM",
)
TRAIN_DTYPES = ("FLOAT_32", "FLOAT_16", "BFLOAT_16")
WEIGHT_DTYPES = ("FLOAT_32", "BFLOAT_16", "FLOAT_16", "FLOAT_8", "INT_8", "INT_4", "NFLOAT_4")
OPTIMIZERS = ("ADAMW", "ADAMW_8BIT", "ADAFACTOR", "PRODIGY", "SGD")
LR_SCHEDULERS = ("CONSTANT", "LINEAR", "COSINE", "COSINE_WITH_RESTARTS")
DISTRIBUTED_STRATEGIES = ("DDP", "FSDP")
FSDP_SHARDINGS = ("FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD")
FRAME_SAMPLE_STRATEGIES = ("uniform", "random", "keyframe")

EXPERT_CHOICES = ("BOTH", "HIGH_NOISE", "LOW_NOISE")

LORA_ONLY = {"training_method": ("LORA",)}
# AUTO included: the folder decides, and the engine refuses these settings on a one-transformer model.
A14B_ONLY = {"model_type": ("AUTO", "WAN_2_2_A14B_T2V", "WAN_2_2_A14B_I2V")}
# AUTO included: the folder decides; the setting does nothing for a model without the part.
GUIDANCE_DISTILLED = {"model_type": ("AUTO", "HUNYUAN_VIDEO", "HUNYUAN_VIDEO_I2V")}
TWO_TEXT_ENCODERS = {"model_type": ("AUTO", "HUNYUAN_VIDEO", "HUNYUAN_VIDEO_I2V", "HIDREAM")}
FOUR_TEXT_ENCODERS = {"model_type": ("AUTO", "HIDREAM")}
MIXTURE_OF_EXPERTS = {"model_type": ("AUTO", "HIDREAM")}
EMBEDDING_ONLY = {"training_method": ("EMBEDDING",)}
NOT_EMBEDDING = {"training_method": ("LORA", "FINE_TUNE")}
FINE_TUNE_ONLY = {"training_method": ("FINE_TUNE",)}
ADAM_LIKE = {"optimizer": ("ADAMW", "ADAMW_8BIT", "PRODIGY")}  # optimizers with betas and an epsilon


def _model_part(name: str, label: str, train: bool, weight_dtype: str, what: str, role: str, extra: tuple = (),
                applies_when: dict[str, tuple[Any, ...]] | None = None) -> Section:
    return Section(
        name,
        role,
        (
            *extra,
            boolean("train", train, f"Train the {what} (LoRA layers for LORA, all weights for FINE_TUNE)."),
            number(
                "learning_rate",
                None,
                f"Learning rate of the {what}; empty uses the global learning_rate.",
                lo=0.0,
                hi=1.0,
                nullable=True,
                null_label="uses learning_rate",
                applies_when=NOT_EMBEDDING,
            ),
            choice(
                "weight_dtype",
                WEIGHT_DTYPES,
                weight_dtype,
                f"Storage type of the {what}'s weights (the trained ones too with FINE_TUNE, which takes "
                "BFLOAT_16 or FLOAT_32): FLOAT_8, INT_8, INT_4 (optimum-quanto) and NFLOAT_4 (bitsandbytes) "
                "save memory at some cost in quality.",
            ),
        ),
        label=label,
        applies_when=applies_when or {},
    )


DATASET = Section(
    "dataset",
    "One folder of clips and captions.",
    (
        path(
            "path",
            "",
            "Folder with videos and images and their captions: a .txt with the same name beside each "
            "file, or videos/ beside captions/.",
            PATH_FOLDER,
        ),
        integer("repeats", 1, "How many times this folder's clips count per pass over the data.", lo=1, hi=10_000),
        string(
            "caption_prefix",
            "",
            "Text put before every caption of this folder, such as a trigger word, with caption_separator "
            "between; it is part of what the text encoder encodes (and of its cache key). Empty: the "
            "captions as they are.",
            label="Caption prefix",
        ),
        string(
            "caption_separator",
            ", ",
            "What goes between caption_prefix and the caption (when both are not empty).",
            label="Caption separator",
        ),
        number(
            "caption_dropout",
            0.0,
            "Probability that a sample of this folder trains on the empty caption instead of its own, "
            "drawn anew at every use (seeded: the same after a resume). Teaches the model the "
            "unconditioned prediction that classifier-free guidance uses; 0: never.",
            lo=0.0,
            hi=1.0,
        ),
        number(
            "loss_weight",
            1.0,
            "Multiplies the loss of this folder's samples: above 1 the folder counts for more in each "
            "step, below 1 for less (0: it trains nothing).",
            lo=0.0,
            hi=100.0,
        ),
    ),
)

VIDEO_CONFIG = Section(
    "video_config",
    "Video-specific data and training settings.",
    (
        integer(
            "max_frames",
            16,
            "Most frames taken from one clip (after resampling to target_fps): the window in which "
            "frame_sample_strategy places a sample's frames. Must be at least frames.",
            lo=1,
            hi=1024,
            label="Max frames",
        ),
        choice(
            "frame_sample_strategy",
            FRAME_SAMPLE_STRATEGIES,
            "uniform",
            "uniform: evenly spaced frames across the window; random: a different placement each time "
            "the clip is used; keyframe: start at the codec's keyframes or scene cuts.",
        ),
        number("target_fps", 24.0, "Frames per second that clips are resampled to before frames are picked.", lo=1.0, hi=240.0, label="Target FPS"),
        number("max_duration", 10.0, "Longest stretch of a clip that is used, in seconds.", lo=0.1, hi=3600.0),
        number(
            "temporal_consistency_weight",
            1.0,
            "Weight of a loss on frame-to-frame differences of the prediction against the target; 0 turns it off.",
            lo=0.0,
            hi=2.0,
        ),
        boolean(
            "use_temporal_attention",
            True,
            "Attend across frames. Off restricts attention to tokens of the same latent frame, which "
            "saves memory on long clips at a cost in temporal consistency.",
        ),
        choice(
            "spatial_compression_ratio",
            (4, 8, 16),
            8,
            "Spatial downscaling of the VAE (8 for Wan 2.1, Hunyuan and CogVideoX; 16 for Wan 2.2 "
            "TI2V-5B); checked against the loaded VAE and used to round frame sizes.",
        ),
        choice(
            "temporal_compression_ratio",
            (1, 2, 4, 8),
            4,
            "Temporal downscaling of the VAE (4 for the video families, 1 for image models); checked "
            "against the loaded VAE; frame counts are rounded to k * ratio + 1.",
        ),
        number(
            "video_batch_size_multiplier",
            0.5,
            "Batch size of video batches as a fraction of batch_size (images keep the full batch); at least 1.",
            lo=0.05,
            hi=1.0,
        ),
        number(
            "frame_dropout_probability",
            0.0,
            "Chance that each frame of a training sample is dropped and replaced by its neighbour, for regularisation.",
            lo=0.0,
            hi=0.3,
        ),
        boolean(
            "temporal_augmentation",
            False,
            "Random temporal crops and reversal of training clips, for robustness; costs extra caching.",
        ),
    ),
    label="Video",
)

SCHEMA = Section(
    "",
    "All settings of a training run.",
    (
        choice(
            "training_method",
            TRAINING_METHODS,
            "LORA",
            "LORA trains small adapter layers; FINE_TUNE trains all weights; EMBEDDING trains new tokens (textual inversion).",
        ),
        choice(
            "model_type",
            MODEL_TYPES,
            "AUTO",
            "The model family; AUTO reads it from the model folder's own config.",
        ),
        path(
            "base_model",
            "Wan-AI/Wan2.2-TI2V-5B-Diffusers",
            "The model to train: a local diffusers folder or a Hugging Face hub id (a single-file transformer "
            "checkpoint goes in transformer.model_path).",
            PATH_MODEL,
        ),
        choice(
            "train_dtype",
            TRAIN_DTYPES,
            "BFLOAT_16",
            "Precision of the forward and backward pass; LoRA and embedding weights and their optimizer state "
            "stay in FLOAT_32 (FINE_TUNE trains the weights in their own weight_dtype).",
            label="Training precision",
        ),
        _model_part(
            "transformer", "Transformer", True, "BFLOAT_16", "transformer",
            "The denoising network: what LoRA and fine-tuning change.",
            extra=(
                path(
                    "model_path",
                    "",
                    "A single-file transformer checkpoint (.safetensors, with the original release's, ComfyUI's or "
                    "diffusers' key names) to train instead of base_model's transformer; base_model still gives "
                    "its config, VAE and text encoder. Empty uses base_model's own.",
                    PATH_FILE,
                    label="Single-file checkpoint",
                ),
                number(
                    "guidance_scale",
                    1.0,
                    "The guidance strength a guidance-distilled transformer (Hunyuan Video) is told during training: "
                    "its guidance embedding gets guidance_scale x 1000, as HunyuanVideoPipeline passes it when "
                    "sampling. It does not weight the loss or run classifier-free guidance. Trainers differ: 1.0 "
                    "trains the model told to add no guidance; a value near the one you sample with (the pipeline's "
                    "default is 6.0) trains it at that strength. Samples use sampling.guidance_scale.",
                    lo=0.0,
                    hi=50.0,
                    applies_when=GUIDANCE_DISTILLED,
                    label="Distilled guidance (training)",
                ),
                number(
                    "moe_aux_loss_weight",
                    0.0,
                    "Weight of the mixture of experts' load-balancing loss (HiDream). Each MoE gate computes, "
                    "as diffusers' MoEGate does in training mode, the sum over its experts of (the mean routing "
                    "probability of the expert) x (the share of token choices routed to it) x (the number of "
                    "experts); that times this weight, summed over the gates, is added to the training loss, "
                    "which pushes the gates to spread tokens evenly. 0 leaves it out (diffusers computes it and "
                    "drops it); 0.01 is the gate's own aux_loss_alpha. The logged loss includes it.",
                    lo=0.0,
                    hi=10.0,
                    applies_when=MIXTURE_OF_EXPERTS,
                    label="MoE load-balancing weight",
                ),
            ),
        ),
        _model_part(
            "text_encoder", "Text encoder", False, "BFLOAT_16", "text encoder",
            "Turns captions into embeddings; its outputs are cached unless it trains.",
        ),
        _model_part(
            "text_encoder_2", "Text encoder 2", False, "BFLOAT_16", "second text encoder",
            "The second text encoder of a model with several (Hunyuan Video: CLIP-L, whose pooled output "
            "conditions the transformer; HiDream: CLIP-G, pooled); its outputs are cached unless it trains.",
            applies_when=TWO_TEXT_ENCODERS,
        ),
        _model_part(
            "text_encoder_3", "Text encoder 3", False, "BFLOAT_16", "third text encoder",
            "The third text encoder of a model with several (HiDream: T5-XXL, whose token embeddings "
            "condition the transformer); its outputs are cached unless it trains.",
            applies_when=FOUR_TEXT_ENCODERS,
        ),
        _model_part(
            "text_encoder_4", "Text encoder 4", False, "BFLOAT_16", "fourth text encoder",
            "The fourth text encoder of a model with several (HiDream: Llama 3.1 8B Instruct, whose hidden "
            "states of several layers condition the transformer's blocks); its outputs are cached unless it trains "
            "or keep_loaded is on.",
            extra=(
                boolean(
                    "keep_loaded",
                    False,
                    "Keep this encoder loaded through training, stored in its weight_dtype (NFLOAT_4 or FLOAT_8 "
                    "make HiDream's Llama about 5 or 9 GB), and encode each batch's captions with it instead of "
                    "caching its outputs. HiDream's cached Llama states are the outputs of every decoder layer its "
                    "transformer reads, 128 tokens each: 32 MiB per caption in the cache for the released model, "
                    "so a large dataset fills a disk; kept loaded, they cost GPU memory and an encoder forward per "
                    "step instead. Off caches them, as the other encoders are (the estimate counts either).",
                    label="Keep loaded (no cache)",
                ),
            ),
            applies_when=FOUR_TEXT_ENCODERS,
        ),
        _model_part(
            "vae", "VAE", False, "FLOAT_32", "VAE",
            "Encodes clips into latents (cached) and decodes samples.",
        ),
        Section(
            "experts",
            "Wan 2.2 A14B's two denoisers: transformer (the high-noise expert) and transformer_2 (the low-noise one).",
            (
                choice(
                    "train",
                    EXPERT_CHOICES,
                    "BOTH",
                    "Which experts train: each step's noise levels fall on one side of the boundary and train "
                    "that side's expert; each trained expert gets its own LoRA file (_high_noise, _low_noise).",
                ),
                number(
                    "boundary",
                    None,
                    "Noise level (0 to 1 of the timestep range) where the low-noise expert takes over; empty "
                    "uses the model's own (0.875 for T2V, 0.9 for I2V).",
                    lo=0.01,
                    hi=0.99,
                    nullable=True,
                    null_label="the model's own",
                ),
            ),
            applies_when=A14B_ONLY,
            label="Experts (Wan 2.2 A14B)",
        ),
        number(
            "layer_offload_fraction",
            0.0,
            "Fraction of the transformer blocks' weights kept in CPU memory and streamed to the GPU "
            "just before use; needs gradient_checkpointing.",
            lo=0.0,
            hi=1.0,
            label="Layer offload fraction",
        ),
        choice(
            "gradient_checkpointing",
            ("OFF", "ON", "CPU_OFFLOADED"),
            "ON",
            "Recompute activations in the backward pass to save memory; CPU_OFFLOADED also keeps the "
            "saved activations in CPU memory.",
        ),
        integer("batch_size", 1, "Samples per step (video batches are scaled by video_batch_size_multiplier).", lo=1, hi=256),
        integer("gradient_accumulation_steps", 1, "Steps whose gradients add up before each optimizer step.", lo=1, hi=1024, label="Gradient accumulation steps"),
        number("learning_rate", 0.0001, "Learning rate of the trained weights.", lo=0.0, hi=1.0),
        number(
            "embedding_learning_rate",
            0.005,
            "Learning rate of the new token embeddings.",
            lo=0.0,
            hi=1.0,
            applies_when=EMBEDDING_ONLY,
            label="Embedding learning rate",
        ),
        Section(
            "objective",
            "How training noise levels are drawn and losses weighted.",
            (
                choice(
                    "timestep_distribution",
                    ("UNIFORM", "LOGIT_NORMAL", "SIGMOID", "SHIFTED"),
                    "SHIFTED",
                    "How training noise levels are drawn: UNIFORM over the range; LOGIT_NORMAL and SIGMOID favour "
                    "the middle; SHIFTED moves a SIGMOID draw towards high noise by timestep_shift, as Wan samples.",
                    label="Timestep distribution",
                ),
                number("timestep_shift", 3.0, "Shift of the SHIFTED distribution: above 1 favours high noise.", lo=0.1, hi=100.0,
                       applies_when={"objective.timestep_distribution": ("SHIFTED",)}, label="Timestep shift"),
                number("logit_mean", 0.0, "Mean of the LOGIT_NORMAL distribution's normal draw.", lo=-10.0, hi=10.0,
                       applies_when={"objective.timestep_distribution": ("LOGIT_NORMAL",)}, label="Logit mean"),
                number("logit_std", 1.0, "Standard deviation of the LOGIT_NORMAL distribution's normal draw.", lo=0.01, hi=10.0,
                       applies_when={"objective.timestep_distribution": ("LOGIT_NORMAL",)}, label="Logit std"),
                number("sigmoid_scale", 1.0, "Scale of the normal draw in SIGMOID and SHIFTED: larger spreads towards the ends.",
                       lo=0.01, hi=10.0, applies_when={"objective.timestep_distribution": ("SIGMOID", "SHIFTED")}, label="Sigmoid scale"),
                number("min_timestep", 0.0, "Lowest noise level trained, as a fraction of the timestep range.", lo=0.0, hi=1.0,
                       label="Min timestep"),
                number("max_timestep", 1.0, "Highest noise level trained, as a fraction of the timestep range.", lo=0.0, hi=1.0,
                       label="Max timestep"),
                choice(
                    "loss_weighting",
                    ("NONE", "SIGMA_SQRT", "COSMAP", "SNR"),
                    "NONE",
                    "Per-sample loss weight by noise level. NONE: 1. Flow-matching models (Wan): SIGMA_SQRT "
                    "(1 / sigma^2) or COSMAP, as in diffusers' SD3 training. v-prediction models (CogVideoX): SNR, "
                    "1 / (1 - alpha_bar_t) times the squared error of the x0 estimate alpha_t x_t - sigma_t v_pred, "
                    "as CogVideo's own training computes it; that product equals the plain squared error of v. "
                    "A weighting of the other kind is refused.",
                    label="Loss weighting",
                ),
                number(
                    "image_to_video_share",
                    0.0,
                    "Share of training samples taught image-to-video (Wan 2.2 TI2V-5B): the clip's first "
                    "frame is given clean as the conditioning image and only the frames after it are "
                    "learned; 0 teaches text-to-video only.",
                    lo=0.0,
                    hi=1.0,
                    label="Image-to-video share",
                ),
                number(
                    "offset_noise_weight",
                    0.0,
                    "Offset noise: each sample's noise gets this weight times one normal draw per latent channel, "
                    "the same over all its frames and pixels, so the model also learns to shift a whole clip's "
                    "brightness or colour (very dark or bright clips). 0 turns it off; 0.05-0.1 are usual.",
                    lo=0.0,
                    hi=1.0,
                    label="Offset noise weight",
                ),
            ),
            # Every method draws its noise levels and weighs its loss by these, textual inversion too.
        ),
        choice("stop_after", ("STEPS", "EPOCHS"), "STEPS", "Whether the run length is counted in max_steps or in epochs."),
        integer("max_steps", 2000, "Optimizer steps to train for.", lo=1, hi=10_000_000, applies_when={"stop_after": ("STEPS",)}, label="Max steps"),
        integer("epochs", 10, "Passes over the data to train for.", lo=1, hi=1_000_000, applies_when={"stop_after": ("EPOCHS",)}),
        number("max_grad_norm", 1.0, "Gradients are clipped to this total norm; 0 turns clipping off.", lo=0.0, hi=1e6, label="Max gradient norm"),
        choice(
            "optimizer",
            OPTIMIZERS,
            "ADAMW",
            "ADAMW_8BIT keeps optimizer state in 8 bits (bitsandbytes); ADAFACTOR factorises it; "
            "PRODIGY adapts the learning rate itself.",
        ),
        Section(
            "optimizer_settings",
            "The optimizer's own parameters; each applies to the optimizers that have it.",
            (
                number("weight_decay", 0.01, "Decoupled weight decay (AdamW's): each step shrinks the trained weights by "
                       "learning rate x this; SGD applies it as an L2 term. 0 turns it off.", lo=0.0, hi=1.0,
                       label="Weight decay"),
                number("beta1", 0.9, "Decay of the running mean of the gradients (Adam's first beta).", lo=0.0, hi=0.9999,
                       applies_when=ADAM_LIKE, label="Beta 1"),
                number("beta2", 0.999, "Decay of the running mean of the squared gradients (Adam's second beta); lower "
                       "values (0.99) react faster to a changing loss.", lo=0.0, hi=0.99999, applies_when=ADAM_LIKE,
                       label="Beta 2"),
                number("eps", 1e-8, "Added to the denominator of each update so a near-zero second moment cannot blow "
                       "it up.", lo=1e-12, hi=1e-3, applies_when=ADAM_LIKE, label="Epsilon"),
                number("momentum", 0.9, "SGD's momentum: the share of the last update carried into the next.", lo=0.0,
                       hi=0.999, applies_when={"optimizer": ("SGD",)}, label="Momentum"),
            ),
            label="Optimizer settings",
        ),
        boolean(
            "fused_backward",
            False,
            "Update each weight as soon as its gradient is ready, inside the backward pass, so the full set of "
            "gradients never sits in memory at once (FINE_TUNE). Needs gradient_accumulation_steps 1 and "
            "max_grad_norm 0 (a total norm needs every gradient at once), one GPU, and an optimizer other than "
            "PRODIGY; ADAFACTOR clips each update itself.",
            applies_when=FINE_TUNE_ONLY,
            label="Fused backward pass",
        ),
        choice("lr_scheduler", LR_SCHEDULERS, "CONSTANT", "How the learning rate changes over the run, after warmup.", label="LR scheduler"),
        integer("warmup_steps", 50, "Steps over which the learning rate rises linearly from 0.", lo=0, hi=1_000_000),
        integer("seed", 42, "Seed of every random choice in the run (noise, timesteps, data order).", lo=0, hi=2**31 - 1),
        integer(
            "resolution",
            512,
            "Training size: clips are scaled to about resolution x resolution pixels, keeping their aspect ratio. "
            "A multiple of the model's size step: 16 for Wan 2.1, 2.2 A14B and CogVideoX, 32 for Wan 2.2 TI2V-5B. "
            "A model that takes one size only (CogVideoX-5b-I2V: 480x720) gets every clip scaled and cropped to it.",
            lo=64,
            hi=4096,
        ),
        integer(
            "frames",
            16,
            "Frames in each video training sample, rounded down to k * temporal_compression_ratio + 1; "
            "shorter clips go to a shorter frame bucket.",
            lo=1,
            hi=1024,
        ),
        SectionList("datasets", "Folders of clips and captions to train on.", DATASET),
        boolean(
            "strict_data",
            False,
            "Refuse to start when any file is unusable or has no caption, instead of skipping it with a warning.",
        ),
        integer(
            "cache_variants",
            4,
            "Cached versions of each video clip, used when frame_sample_strategy is random or "
            "temporal_augmentation is on (otherwise one is cached); each use of a clip takes the next version.",
            lo=1,
            hi=64,
        ),
        integer(
            "dataloader_threads",
            2,
            "Background workers that load batches (and decode clips while caching) so the GPU never waits.",
            lo=0,
            hi=64,
        ),
        path("workspace_dir", "~/VideoTrainer/workspace", "Folder for this run's metrics, samples and backups.", PATH_FOLDER, label="Workspace folder"),
        path("cache_dir", "~/VideoTrainer/cache", "Folder for cached latents and text embeddings, reused across runs.", PATH_FOLDER, label="Cache folder"),
        path(
            "output_path",
            "~/VideoTrainer/output/video-lora.safetensors",
            "Where the result is saved: a .safetensors file for LORA and EMBEDDING, a folder for FINE_TUNE.",
            PATH_OUTPUT,
        ),
        choice(
            "output_format",
            ("DIFFUSERS", "COMFY"),
            "DIFFUSERS",
            "Key names of the saved LoRA: DIFFUSERS for diffusers pipelines, COMFY for ComfyUI's native loader.",
            applies_when=LORA_ONLY,
            label="Output format",
        ),
        Section(
            "lora",
            "LoRA adapter settings.",
            (
                integer("rank", 16, "Rank of the LoRA matrices: more capacity, more memory.", lo=1, hi=1024),
                number("alpha", 16.0, "LoRA alpha; the update is scaled by alpha / rank.", lo=0.0, hi=4096.0),
                number("dropout", 0.0, "Dropout on the LoRA path.", lo=0.0, hi=0.9),
                boolean(
                    "decompose",
                    False,
                    "DoRA (peft's use_dora): each adapted layer also learns a magnitude per output feature, applied "
                    "to the direction of the adapted weight; often closer to a full fine-tune at the same rank, at "
                    "some extra compute. Saved files load with the diffusers pipelines; ComfyUI decomposes on the "
                    "other axis, so output_format COMFY is refused with it.",
                    label="DoRA (weight decomposition)",
                ),
                string_list(
                    "target_layers",
                    [],
                    "Names (or name suffixes) of the layers that get LoRA; empty uses the model family's "
                    "attention and feed-forward projections.",
                ),
            ),
            applies_when=LORA_ONLY,
            label="LoRA",
        ),
        Section(
            "embedding",
            "Textual inversion settings.",
            (
                string_list(
                    "placeholder_tokens",
                    ["<concept>"],
                    "New tokens to learn; each must be in some training captions (such as 'a video of "
                    "<concept> walking'), and then in prompts; captions without one teach the tokens nothing.",
                ),
                string_list(
                    "initializer_words",
                    ["person"],
                    "Existing words whose embeddings start each new token (one per token, or one for all).",
                ),
            ),
            applies_when=EMBEDDING_ONLY,
        ),
        Section(
            "sampling",
            "Sample videos made during training to watch progress.",
            (
                integer("every_n_steps", 250, "Make samples every this many steps; 0 turns sampling off.", lo=0, hi=10_000_000, label="Every N steps"),
                string_list("prompts", [], "Prompts to sample; with none, no samples are made."),
                integer("width", 512, "Sample width in pixels; a multiple of the model's size step, as resolution.", lo=16, hi=4096),
                integer("height", 512, "Sample height in pixels; a multiple of the model's size step, as resolution.", lo=16, hi=4096),
                integer("frames", 33, "Frames per sample video (rounded to what the model accepts).", lo=1, hi=1024),
                integer("inference_steps", 30, "Denoising steps per sample.", lo=1, hi=1000, label="Inference steps"),
                number("guidance_scale", 5.0, "Classifier-free guidance scale of samples.", lo=0.0, hi=50.0),
                integer("seed", 42, "Seed of the sample noise, fixed so samples are comparable across steps.", lo=0, hi=2**31 - 1),
            ),
        ),
        Section(
            "backup",
            "Backups to continue from after an interruption.",
            (
                integer("every_n_steps", 500, "Write a backup every this many steps; 0 turns backups off.", lo=0, hi=10_000_000, label="Every N steps"),
                integer("keep", 3, "How many of the newest backups to keep.", lo=1, hi=1000),
            ),
        ),
        Section(
            "ema",
            "An exponential moving average (EMA) of the trained weights: a smoother result, used for samples "
            "and saved beside the output.",
            (
                boolean("enabled", False, "Keep an EMA of the trained weights; samples use it, and it is saved beside the output with an -ema suffix."),
                number("decay", 0.999, "Share of the old average kept at each optimizer step: 0.999 averages over about the last 1000 steps.",
                       lo=0.0, hi=0.999999),
                choice("device", ("CPU", "GPU"), "CPU",
                       "Where the average is kept: CPU saves GPU memory (the weights travel to it after every step); "
                       "GPU is faster. Without a GPU, CPU is used."),
            ),
            label="EMA",
        ),
        Section(
            "validation",
            "Validation loss on clips held out of training.",
            (
                integer("every_n_steps", 0, "Compute validation loss every this many steps; 0 turns it off.", lo=0, hi=10_000_000, label="Every N steps"),
                number("holdout_fraction", 0.0, "Fraction of the clips held out for validation (fixed by seed).", lo=0.0, hi=0.5, label="Hold-out fraction"),
                path("folder", "", "A separate folder of validation clips; when set, holdout_fraction is not used.", PATH_FOLDER),
            ),
        ),
        Section(
            "distributed",
            "Training with several processes (GPUs, machines), started with accelerate launch (docs/training.md, "
            "\"Several GPUs\"). One process trains the same whatever these say.",
            (
                choice(
                    "strategy",
                    DISTRIBUTED_STRATEGIES,
                    "DDP",
                    "How several processes share the work. DDP: every process holds the whole model and the "
                    "gradients are averaged. FSDP (torch's FSDP2 through accelerate's FSDP plugin): the "
                    "transformer's blocks are wrapped one by one and their parameters, gradients and optimizer "
                    "state are sharded across the processes, so each holds about 1/N of them (activations are not "
                    "shared); the result is gathered on the main process and saved whole, as with DDP. FSDP trains "
                    "one denoiser with LORA or FINE_TUNE, and cannot combine with layer offloading, the fused "
                    "backward pass, quantized transformer weights, trained text encoders, EMA, validation or sampling "
                    "prompts (each refused by name).",
                    label="Multi-process strategy",
                ),
                integer(
                    "processes",
                    0,
                    "How many processes (GPUs, over all machines) the run is for. Above 1, Start in the window runs "
                    "the engine under accelerate launch with that many processes on this machine, showing the main "
                    "process's loss and memory; the VRAM estimate divides what FSDP shards by it; and a run launched "
                    "with another number of processes is refused. 0: as many as accelerate launch starts (the "
                    "estimate then assumes one, the window runs one).",
                    lo=0,
                    hi=4096,
                    label="GPUs (processes)",
                ),
                integer(
                    "machines",
                    1,
                    "How many machines the processes are spread over, the same number of processes on each: "
                    "HYBRID_SHARD shards within a machine, so the VRAM estimate divides by processes / machines, "
                    "and a HYBRID_SHARD run launched on another number of machines is refused.",
                    lo=1,
                    hi=1024,
                    applies_when={"distributed.strategy": ("FSDP",)},
                ),
                choice(
                    "sharding",
                    FSDP_SHARDINGS,
                    "FULL_SHARD",
                    "What FSDP keeps sharded. FULL_SHARD: parameters are gathered for each block's forward and "
                    "backward and freed after, least memory. SHARD_GRAD_OP: gradients and optimizer state stay "
                    "sharded, but each block's gathered parameters are kept from its forward to its backward "
                    "(more memory, one all-gather less per block). HYBRID_SHARD: FULL_SHARD within each machine, "
                    "the model replicated across machines (gradients averaged between them): each process holds "
                    "1/(its machine's processes), and only the replicas' gradients cross the network.",
                    applies_when={"distributed.strategy": ("FSDP",)},
                    label="FSDP sharding",
                ),
            ),
            label="Several GPUs",
        ),
        VIDEO_CONFIG,
    ),
)
