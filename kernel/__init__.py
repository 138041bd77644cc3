"""What every layer stands on and that imports nothing of ours: the error tree (`errors`), the typed
engine configuration (`config`), the lazy engine loader (`engines`) and the GGUF header reader (`gguf`)."""
