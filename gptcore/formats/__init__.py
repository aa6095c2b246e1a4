"""Models in and out: Hugging Face, nanoGPT and GGUF (llama.cpp), and the export/import commands."""
