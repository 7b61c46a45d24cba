"""Adapters on the frozen base: the leaf formats and how each is applied (adapters), AdaLoRA's
rank allocator as an optax transform (adalora), and tree surgery and serving layouts
(serving)."""
