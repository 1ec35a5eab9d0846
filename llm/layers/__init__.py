"""Building blocks of our Llama-family model (one concept per file)."""
