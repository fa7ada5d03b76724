"""One trial: run in a fresh child process through one protocol (single trials, packs, ranks)."""
