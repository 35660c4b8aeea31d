"""LRA-era efficient attention mixers (PAPERS.md B3-B6): Linformer, Reformer (LSH), Sparse Sinkhorn, Synthesizer."""
