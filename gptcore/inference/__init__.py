"""Running a trained model: loading any checkpoint, KV-cache generation, and int8/int4/bf16 quantization."""
