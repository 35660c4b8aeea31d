"""Linear (kernelised) attention: the shared chunked scan and the mixers built on it."""
