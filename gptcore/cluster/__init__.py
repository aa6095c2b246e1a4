"""Running as many ranks: the rank contract and process group, DDP or FSDP2, the watchdog for hung ranks, and stop signals."""
