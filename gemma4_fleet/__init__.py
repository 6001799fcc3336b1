"""Deploy and operate llama.cpp's llama-server with Gemma 4 and its MTP drafter, with pyinfra."""
