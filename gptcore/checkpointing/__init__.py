"""Checkpoints: single files with CRC-checked records, sharded DCP directories, and the reader of DCP's metadata."""
