"""Bytes in and out: source resolution (hub ids, directories, files), safetensors reading, base models read
tensor by tensor, the streaming shard writer, and atomic outputs."""
