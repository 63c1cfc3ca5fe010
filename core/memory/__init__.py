"""Fitting the GPU people have: quantized weights, block offloading, activation offloading, estimates.

- quantize.py: weight_dtype FLOAT_8 / INT_8 / INT_4 (optimum-quanto) and NFLOAT_4 (bitsandbytes)
  on the transformer blocks' Linear layers, the on-disk cache of the quantized weights, and what
  export does with a LoRA over a quantized base.
- quantize_cache.py: that cache (save, load without reading the full-precision weights).
- offload.py: the block offloader (layer_offload_fraction).
- activation_offload.py: gradient_checkpointing CPU_OFFLOADED.
- estimate.py, model_sizes.py, known_models.py: the VRAM estimator and the sizes it reads.
- probe.py: TensorMemoryProbe, the peak of live tensor bytes on any device (the CPU stand-in for
  torch.cuda.max_memory_allocated that the estimator is checked against).

Nothing here imports torch at module level except where a module is only useful with torch loaded,
so the estimator can answer without it.
"""
