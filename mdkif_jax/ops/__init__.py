"""Array-level building blocks with their own numerics and backward passes: f32-accumulating
einsums (dots), blocked causal attention, the chunked vocabulary cross-entropy and the small
layers of a Llama block. They know nothing of models, adapters or stages."""
