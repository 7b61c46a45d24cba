"""The frozen base: its config and numerics, the Flax NNX Llama, weight loading (HF, GGUF,
random presets), the tokenizer and KV-cache generation. It knows no adapter format."""
