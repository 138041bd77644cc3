"""Work that outlives a request: files and batch jobs, RAG collections and their chunking."""
