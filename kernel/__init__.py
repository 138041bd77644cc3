"""What every layer stands on and that imports nothing of ours: the error tree (`errors`), the typed
engine configuration (`config`) and the lazy engine loader (`engines`)."""
