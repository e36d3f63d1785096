"""The layer family and its arithmetic (docs/design.md §1–§3).

``LoRALinear`` / ``QuantLoRALinear`` (:mod:`.lora`, :mod:`.quant`), the :class:`~.layout.Layout`
record that declares which tensors a layer holds and trains (:mod:`.layout`), the factor
arithmetic (:mod:`.factors`), the fused autograd nodes (:mod:`.fused_lora`,
:mod:`.fused_quant_lora`), how a layer appears in a state dict and takes a saved one's structure
(:mod:`.state_dict_keys`), which modules are linear-like bases (:mod:`.base_kinds`), FSDP2
sharding helpers (:mod:`.sharded`), page release after quantizing a mapped checkpoint
(:mod:`.mapped_pages`), the marks of changed parameters (:mod:`.changed_marks`) and the one
writer of ``requires_grad`` (:mod:`.trainable_flags`).

Imports: torch, safetensors and the top-level leaves (``adaptopt.modes``); bitsandbytes only
inside functions. Nothing above it (surgery, training, formats, policies).
"""
