"""LRA-era efficient attention mixers: Linformer, Reformer (LSH), Sparse Sinkhorn, Synthesizer
(docs/papers.md: #linformer, #reformer, #sinkhorn, #synthesizer)."""
