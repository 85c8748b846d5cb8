"""The model: the decoder, its kernels, LoRA, decoding, checkpoints in the Hugging Face format."""
