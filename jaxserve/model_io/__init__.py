"""What a model is made of on disk: checkpoints (safetensors, orbax, GGUF), tokenizers, chat
templates, generation defaults and the built-in models."""
