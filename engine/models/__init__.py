"""Model implementations (one Llama-family model covers every supported architecture)."""
