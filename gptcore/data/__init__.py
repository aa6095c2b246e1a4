"""Text to tokens: vocabularies and corpora, streaming preparation into train.bin/val.bin, and the batches training draws."""
